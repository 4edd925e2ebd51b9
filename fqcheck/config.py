"""Project configuration: `[tool.fqcheck]` in pyproject.toml or top-level keys in fqcheck.toml.

Discovered from a start directory upward (like ruff), stopping at the filesystem root or at a
directory holding `.git`. Command-line flags win over whatever is found here.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .catalog import SEVERITIES
from .options import FAIL_ON
CONFIG_NAMES = ("fqcheck.toml", "pyproject.toml")  # fqcheck.toml wins when both exist


class ConfigError(Exception):
    """The configuration file is invalid (a usage error, exit 2)."""


@dataclass
class Config:
    """Settings read from one file; None means "not set there"."""
    source: Path | None = None
    select: list[str] | None = None
    ignore: list[str] | None = None
    severity: dict[str, str] = field(default_factory=dict)
    fail_on: str | None = None
    rules: list[Path] = field(default_factory=list)  # resolved against the config file's folder
    deep: bool | None = None
    arch: bool | None = None

    def options(self) -> dict:
        """What this file sets, as keyword arguments of fqcheck.options.build()."""
        out: dict = {"severity": dict(self.severity), "rules_dirs": list(self.rules)}
        for key in ("select", "ignore", "deep", "arch", "fail_on"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _table(path: Path) -> dict | None:
    """The fqcheck table of one file, or None when the file does not configure fqcheck."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    if path.name == "pyproject.toml":
        table = data.get("tool", {}).get("fqcheck")
        if table is not None and not isinstance(table, dict):
            raise ConfigError(f"{path}: [tool.fqcheck] must be a table")
        return table
    return data


def find_config(start: str | Path = ".") -> Path | None:
    """The nearest fqcheck.toml, or pyproject.toml with a [tool.fqcheck] table, from `start` up."""
    d = Path(start).resolve()
    if d.is_file():
        d = d.parent
    for folder in (d, *d.parents):
        for name in CONFIG_NAMES:
            p = folder / name
            if p.is_file() and (name == "fqcheck.toml" or _has_table(p)):
                return p
        if (folder / ".git").exists():
            return None
    return None


def _has_table(pyproject: Path) -> bool:
    try:
        return _table(pyproject) is not None
    except ConfigError:
        return True  # a broken pyproject.toml is reported when loaded, not skipped silently


def _codes(value, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: '{key}' must be a list of rule codes or prefixes, got {value!r}")
    return [v.strip().upper() for v in value]


def _bool(value, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


def load_config(path: str | Path) -> Config:
    """Parse and validate one config file: unknown keys, codes (its own `rules` folders count),
    severities and values are a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    table = _table(path)
    where = f"{path} [tool.fqcheck]" if path.name == "pyproject.toml" else str(path)
    cfg = Config(source=path)
    if table is None:
        return cfg
    handlers = {
        "select": lambda v: setattr(cfg, "select", _codes(v, "select", where)),
        "ignore": lambda v: setattr(cfg, "ignore", _codes(v, "ignore", where)),
        "severity": lambda v: setattr(cfg, "severity", _severity(v, where)),
        "fail-on": lambda v: setattr(cfg, "fail_on", _choice(v, "fail-on", FAIL_ON, where)),
        "rules": lambda v: setattr(cfg, "rules", _folders(v, path.parent, where)),
        "deep": lambda v: setattr(cfg, "deep", _bool(v, "deep", where)),
        "arch": lambda v: setattr(cfg, "arch", _bool(v, "arch", where)),
    }
    for key, value in table.items():
        if key not in handlers:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(handlers)})")
        handlers[key](value)
    from .catalog import CatalogError
    from .options import UsageError, build
    try:
        build(**cfg.options()).validate()
    except (UsageError, CatalogError) as e:
        raise ConfigError(f"{where}: {str(e).removeprefix('--')}") from None
    return cfg


def _choice(value, key: str, allowed, where: str) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _severity(value, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'severity' must be a table of CODE = \"error|warning|info\"")
    return {code.upper(): _choice(level, f"severity.{code}", SEVERITIES, where) for code, level in value.items()}


def _folders(value, base: Path, where: str) -> list[Path]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: 'rules' must be a list of folders, got {value!r}")
    out = []
    for v in value:
        p = (base / v).resolve()
        if not p.is_dir():
            raise ConfigError(f"{where}: 'rules' folder {v!r} does not exist ({p})")
        out.append(p)
    return out


def resolve(config_file: str | Path | None = None, start: str | Path = ".") -> Config:
    """The Config for a run: `config_file` when given, else the one discovered from `start`,
    else an empty Config."""
    if config_file is not None:
        return load_config(config_file)
    found = find_config(start)
    return load_config(found) if found else Config()

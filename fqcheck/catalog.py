"""The rule catalog: one TOML file per rule under rules/ (shipped in the wheel as fqcheck/_rules)."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SEVERITIES = ("info", "warning", "error")
LEVELS = ("header", "deep", "arch")  # header: headers/JSON only; deep: reads tensor data; arch: builds the model
FIXES = ("safe", "unsafe", "no")
MATCH_KINDS = ("tensor_pattern", "config_key", "json_schema")


class CatalogError(Exception):
    """A rule file is malformed (shown to the user as a usage error)."""


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    family: str
    severity: str
    level: str
    fix: str
    summary: str
    why: str = ""
    fix_description: str = ""
    match: dict = field(default_factory=dict, hash=False, compare=False)
    source: Path | None = None

    @property
    def fixable(self) -> bool:
        return self.fix != "no"


def rules_dir() -> Path:
    here = Path(__file__).parent
    shipped = here / "_rules"
    return shipped if shipped.is_dir() else here.parent / "rules"


def schema_path(name: str) -> Path:
    return rules_dir() / "schemas" / name


@lru_cache(maxsize=None)
def _load_dir(d: Path) -> tuple[Rule, ...]:
    if not d.is_dir():
        raise CatalogError(f"rules folder {d} does not exist")
    return tuple(load_rule(p) for p in sorted(d.glob("*.toml")))


def load_rule(p: Path) -> Rule:
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CatalogError(f"{p}: {e}") from None
    required = ("code", "name", "family", "severity", "level", "fix", "summary")
    missing = [k for k in required if not isinstance(data.get(k), str)]
    if missing:
        raise CatalogError(f"{p}: missing or non-string key(s) {', '.join(missing)}")
    for key, allowed in (("severity", SEVERITIES), ("level", LEVELS), ("fix", FIXES)):
        if data[key] not in allowed:
            raise CatalogError(f"{p}: {key} = {data[key]!r}, expected one of {', '.join(allowed)}")
    if data["code"] != p.stem:  # one file per code, named after it, as in rules/: no two files claim a code
        raise CatalogError(f"{p}: code {data['code']!r} does not match the file name; "
                           f"name the file {data['code']}.toml")
    match = data.get("match", {})
    if not isinstance(match, dict) or (match and sum(k in match for k in MATCH_KINDS) != 1):
        raise CatalogError(f"{p}: [match] must have exactly one of {', '.join(MATCH_KINDS)}")
    return Rule(
        code=data["code"], name=data["name"], family=data["family"], severity=data["severity"],
        level=data["level"], fix=data["fix"], summary=data["summary"], why=data.get("why", "").strip(),
        fix_description=data.get("fix_description", "").strip(), match=match, source=p,
    )


def load_catalog(extra_dirs=()) -> dict[str, Rule]:
    """Built-in rules plus user rule folders; a user rule may not redefine a built-in code."""
    rules = {r.code: r for r in _load_dir(rules_dir())}
    for d in extra_dirs:
        for r in _load_dir(Path(d).resolve()):
            if r.code in rules:
                raise CatalogError(f"{r.source}: code {r.code} is already defined by {rules[r.code].source}")
            if not r.match:
                raise CatalogError(f"{r.source}: user rules must be declarative (a [match] table)")
            rules[r.code] = r
    return rules

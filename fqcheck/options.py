"""One Options value for a run, resolved once from the config file and the flags.

`fqcheck lint`, `fqcheck fix`, `fqcheck rules`/`explain`, `fqcheck.lint()` and `fqcheck.fix()` all
take an Options; `resolve()` is the one place where config and flags meet, and `validate()` the one
place where codes, severities and devices are checked, so lint and fix can never disagree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable, Mapping

from .catalog import SEVERITIES

FAIL_ON = ("error", "warning", "never")
QUANT_FORMATS = ("fp8", "int8", "int4", "nvfp4")  # --quant-format: when nothing in the checkpoint says
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class UsageError(ValueError):
    """A bad option, code or config value: exit 2, never a green gate."""


@dataclass(frozen=True)
class Options:
    """What a lint or fix run does. Codes are upper case; `select` empty means every rule."""
    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    deep: bool = False
    arch: bool = False
    rules_dirs: tuple[Path, ...] = ()
    severity: Mapping[str, str] = field(default_factory=dict)
    fail_on: str = "error"
    device: str = "auto"
    quiet: bool = False
    quant_format: str | None = None
    """The weight-quantizer format (fp8, int8, int4, nvfp4) when neither the state file, the
    quantization config nor the folded weights decide it (QNT001/QNT002)."""
    jobs: int = 0
    """Workers (threads) for the deep data pass and the re-fold: N CPU threads, or one per GPU with
    device cuda (at most N); 0 is auto: the usable cores, every visible GPU (fqcheck.workers). The
    command line also reads shard headers in a forked child unless 1; the API never forks."""

    @property
    def levels(self) -> tuple[str, ...]:
        """Rule levels that run: header always, arch with --arch, deep (and arch) with --deep."""
        return ("header", "deep", "arch") if self.deep else (("header", "arch") if self.arch else ("header",))

    def catalog(self) -> dict:
        from .catalog import load_catalog
        return load_catalog(self.rules_dirs)

    def validate(self, catalog: Mapping | None = None) -> "Options":
        """Raise UsageError for an unknown code or prefix, severity, fail-on level or device."""
        catalog = self.catalog() if catalog is None else catalog
        for key in ("select", "ignore"):
            for code in getattr(self, key):
                if not any(c.startswith(code) for c in catalog):
                    raise UsageError(f"--{key}: unknown rule code or prefix {code!r} "
                                     "(`fqcheck rules` lists them)")
        for code, sev in self.severity.items():
            if code not in catalog:
                raise UsageError(f"severity override for unknown rule code {code!r}")
            if sev not in SEVERITIES:
                raise UsageError(f"severity {code} = {sev!r}: expected one of {', '.join(SEVERITIES)}")
        if self.fail_on not in FAIL_ON:
            raise UsageError(f"unknown --fail-on {self.fail_on!r}; choose from {', '.join(FAIL_ON)}")
        if self.quant_format is not None and self.quant_format not in QUANT_FORMATS:
            raise UsageError(f"unknown --quant-format {self.quant_format!r}; choose from {', '.join(QUANT_FORMATS)}")
        if not isinstance(self.jobs, int) or self.jobs < 0:
            raise UsageError(f"--jobs {self.jobs!r}: expected 0 (auto) or a positive count")
        if not _DEVICE.fullmatch(self.device):
            raise UsageError(f"unknown --device {self.device!r}; use auto, cpu or cuda[:N]")
        return self


def codes(values: Iterable[str] | str | None) -> tuple[str, ...]:
    """Codes from flags or config: comma-separated or repeated, blanks dropped, upper-cased."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(p.strip().upper() for v in values for p in str(v).split(",") if p.strip())


def build(**kw) -> Options:
    """Options from keyword arguments as the API takes them (unknown keywords are a TypeError)."""
    known = {f.name for f in fields(Options)}
    bad = set(kw) - known
    if bad:
        raise TypeError(f"unknown option(s): {', '.join(sorted(bad))}")
    for key in ("select", "ignore"):
        if key in kw:
            kw[key] = codes(kw[key])
    if "rules_dirs" in kw:
        kw["rules_dirs"] = tuple(Path(d).resolve() for d in kw["rules_dirs"] or ())
    if "severity" in kw:
        kw["severity"] = {c.upper(): s for c, s in (kw["severity"] or {}).items()}
    if kw.get("quant_format") is not None:
        kw["quant_format"] = kw["quant_format"].strip().lower()
    if "device" in kw:
        kw["device"] = (kw["device"] or "auto").strip().lower()
    return Options(**kw)


def resolve(config_file: str | Path | None = None, *, start: str | Path = ".", **flags) -> Options:
    """The Options of a command-line run: the config file (given, or found from `start` up), then
    every flag that was given (None or [] means "not given"), then validated."""
    from .config import resolve as find_config

    cfg = find_config(config_file, start)
    base = build(**cfg.options())
    given = {k: v for k, v in flags.items() if v is not None and v != [] and v != ()}
    if "rules_dirs" in given:  # folders from the config file and from --rules both count
        given["rules_dirs"] = (*base.rules_dirs, *given["rules_dirs"])
    flagged = build(**given)
    return replace(base, **{k: getattr(flagged, k) for k in given}).validate()

"""The Python API; the CLI is built on it.

    report = fqcheck.lint("./export")
    if not report.ok:
        raise SystemExit(report.to_json())
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from . import engine
from .catalog import SEVERITIES, Rule, load_catalog
from .checkpoint import BACKUP_DIR, Checkpoint
from .config import FAIL_ON
from .engine import SEVERITY_RANK, Finding

__all__ = ["FAIL_ON", "Finding", "Report", "lint"]

QUANT_FORMATS = ("fp8", "int8", "int4", "nvfp4")  # --quant-format (fqcheck.quant.resolve.FORMATS)


@dataclass
class Report:
    """What one lint found. Findings are sorted by file, then severity (errors first), then code."""
    path: str
    findings: list[Finding] = field(default_factory=list)
    rules_run: list[str] = field(default_factory=list)
    rules: dict[str, Rule] = field(default_factory=dict, repr=False, compare=False)
    """The rules that ran, with severity overrides applied (formatters describe them)."""
    notes: list[str] = field(default_factory=list)
    """E.g. an interrupted fix that was finished before linting."""

    def count(self, severity: str) -> int:
        """Number of findings of one severity ("error", "warning" or "info")."""
        return sum(f.severity == severity for f in self.findings)

    def failed(self, fail_on: str = "error") -> bool:
        """True when a finding is at or above `fail_on` ("error", "warning"; "never" never fails)."""
        if fail_on == "never":
            return False
        floor = SEVERITY_RANK[fail_on]
        return any(SEVERITY_RANK[f.severity] >= floor for f in self.findings)

    @property
    def ok(self) -> bool:
        """True when no finding is an error."""
        return not self.failed("error")

    def statistics(self) -> dict[str, int]:
        """Number of findings per rule code, codes in order."""
        return dict(sorted(Counter(f.code for f in self.findings).items()))

    def summary(self) -> dict:
        return {"path": self.path, "errors": self.count("error"), "warnings": self.count("warning"),
                "infos": self.count("info"), "fixable": sum(f.fixable != "no" for f in self.findings),
                "rules_run": len(self.rules_run), "statistics": self.statistics()}

    def as_dict(self) -> dict:
        return {"findings": [f.as_dict() for f in self.findings], "summary": self.summary()}

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON: {"findings": [...], "summary": {...}} (what `-f json` prints)."""
        return json.dumps(self.as_dict(), indent=indent)


def levels_for(deep: bool = False, arch: bool = False) -> tuple[str, ...]:
    return ("header", "deep", "arch") if deep else (("header", "arch") if arch else ("header",))


def lint(path: str | Path, *, select: Sequence[str] | None = None, ignore: Sequence[str] | None = None,
         deep: bool = False, arch: bool = False, rules_dirs: Iterable[str | Path] = (),
         device: str = "auto", severity_overrides: Mapping[str, str] | None = None,
         quiet: bool = False, recover: bool = True, quant_format: str | None = None) -> Report:
    """Lint a checkpoint directory (or one .safetensors/.bin file).

    select / ignore: rule codes or prefixes ("QNT", "IDX001"); deep: also read tensor data;
    arch: also build the model from config.json on the meta device; rules_dirs: folders of extra
    declarative rules; device: where deep checks run (auto, cpu, cuda[:N]); quiet: no progress
    bar; recover: first finish or roll back a fix that was interrupted (journal left in .fqcheck/);
    severity_overrides: {"CODE": "error"|"warning"|"info"}, applied to every
    finding of that rule (as `[tool.fqcheck.severity]` does); quant_format: fp8, int8, int4 or
    nvfp4, the weight-quantizer format when nothing in the checkpoint decides it (QNT002).

    Raises CheckpointError for a path that is not a checkpoint, CatalogError for a bad user rule,
    ValueError for an unknown code or severity in severity_overrides.
    """
    if quant_format is not None and quant_format.lower() not in QUANT_FORMATS:
        raise ValueError(f"unknown quant_format {quant_format!r}; choose from {', '.join(QUANT_FORMATS)}")
    catalog = load_catalog(tuple(rules_dirs))
    overrides = {c.upper(): s for c, s in (severity_overrides or {}).items()}
    for code, sev in overrides.items():
        if code not in catalog:
            raise ValueError(f"severity override for unknown rule code {code!r}")
        if sev not in SEVERITIES:
            raise ValueError(f"severity override {code} = {sev!r}: expected one of {', '.join(SEVERITIES)}")
    rules = engine.select_rules(catalog, select, ignore, levels_for(deep, arch))
    ckpt = Checkpoint.open(path)
    notes = []
    # the journal module is imported only when a fix left its folder behind (lint's hot path)
    if recover and ckpt._only is None and (ckpt.root / BACKUP_DIR).is_dir():
        from .fix.journal import needs_recovery
        if needs_recovery(ckpt.root):
            from .fix.journal import recover_if_needed
            try:
                done = recover_if_needed(ckpt.root)
            except Exception as e:  # noqa: BLE001 - report it, still lint what is there
                done = f"could not finish an interrupted fix: {e}"
            if done:
                notes.append(done)
                ckpt = Checkpoint.open(path)
    # quiet: no progress bar on stderr (deep pass); deep: lets a header rule add its deep half.
    findings = engine.run(ckpt, rules, {"device": device, "deep": deep, "quiet": quiet, "quant_format": quant_format},
                          severity=overrides)
    effective = {r.code: replace(r, severity=overrides[r.code]) if r.code in overrides else r for r in rules}
    return Report(str(path), findings, [r.code for r in rules], effective, notes)

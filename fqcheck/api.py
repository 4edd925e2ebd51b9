"""The Python API; the CLI is built on it.

    report = fqcheck.lint("./export")
    if not report.ok:
        raise SystemExit(report.to_json())
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from . import engine
from .catalog import Rule
from .checkpoint import BACKUP_DIR, Checkpoint, CheckpointError
from .engine import SEVERITY_RANK, Finding
from .options import FAIL_ON, Options, UsageError, build

__all__ = ["FAIL_ON", "Finding", "Options", "Report", "UsageError", "fix", "lint"]


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

    @classmethod
    def merge(cls, reports: Sequence["Report"]) -> "Report":
        """One report over several checkpoints (pre-commit passes them all): files become relative
        to the checkpoints' common folder."""
        if len(reports) == 1:
            return reports[0]
        from .report.paths import checkpoint_root

        roots = [checkpoint_root(r) for r in reports]
        common = os.path.commonpath(roots)
        findings, rules_run, rules, notes = [], [], {}, []
        for r, root in zip(reports, roots):
            for f in r.findings:
                rel = os.path.relpath(os.path.join(root, f.file) if f.file else root, common)
                findings.append(replace(f, file=Path(rel).as_posix()))
            rules_run += [c for c in r.rules_run if c not in rules_run]
            rules.update(r.rules)
            notes += r.notes
        return cls(common, findings, rules_run, rules, notes)


def lint(path: str | Path, options: Options | None = None, **kw) -> Report:
    """Lint a checkpoint directory (or one .safetensors/.bin file).

    `options` (fqcheck.options.Options), or its fields as keywords: select / ignore (rule codes or
    prefixes, "QNT", "IDX001"), deep (also read tensor data), arch (also build the model from
    config.json on the meta device), rules_dirs (folders of extra declarative rules), severity
    ({"CODE": "error"|"warning"|"info"}), device (auto, cpu, cuda[:N]), quiet (no progress bar),
    jobs (worker threads for the deep pass, or one per GPU; 0 auto; never a process).

    Raises CheckpointError for a path that is not a checkpoint or holds no weights, UsageError
    (a ValueError) for an unknown code, severity or device, CatalogError for a bad user rule.
    Never writes: an interrupted fix is reported in `notes`, not finished.
    """
    with engine.gc_paused():  # until the Checkpoint is gone
        return lint_checkpoint(Checkpoint.open(path), with_keywords(options, kw), path)


def lint_checkpoint(ckpt: Checkpoint, opts: Options, path: str | Path) -> Report:
    """lint() of an open Checkpoint (the fixer lints, plans and re-lints through it: one memo of the
    deep passes per Checkpoint)."""
    catalog = opts.catalog()
    opts.validate(catalog)
    rules = engine.select_rules(catalog, opts.select, opts.ignore, opts.levels)
    if ckpt._only is None and not (ckpt.safetensors_names or ckpt.weight_pickles or ckpt.outside):
        raise CheckpointError(f"{path}: no weights here (no .safetensors file and no pickled "
                              "state dict such as pytorch_model.bin)")
    notes = []
    if (ckpt.root / BACKUP_DIR).is_dir() and _pending(ckpt.root):
        notes.append(f"an interrupted fix is pending in {BACKUP_DIR}/: run `fqcheck fix {path}` to finish "
                     f"it or `fqcheck restore {path}` to roll it back; linted the files as they are")
    findings = engine.run(ckpt, rules, opts)
    effective = {r.code: replace(r, severity=opts.severity[r.code]) if r.code in opts.severity else r
                 for r in rules}
    return Report(str(path), findings, [r.code for r in rules], effective, notes)


def fix(path: str | Path, options: Options | None = None, *, unsafe_fixes: bool = False,
        dry_run: bool = False, output: str | Path | None = None, backup: bool = True, **kw):
    """Repair a checkpoint crash-safely (see fqcheck.fixer.runner): lint with the same options,
    apply the safe fixes (and the unsafe ones with unsafe_fixes), re-lint. Returns a FixResult.
    Raises FixRefused (unfixable errors; nothing changed), FixError (I/O failure, rolled back; or
    locked), CheckpointError, UsageError."""
    from .fixer.runner import run
    return run(path, with_keywords(options, kw), unsafe_fixes=unsafe_fixes, dry_run=dry_run,
               output=output, backup=backup)


def with_keywords(options: Options | None, kw: dict) -> Options:
    """`options` with the fields given as keywords replaced (the API's two ways of saying it)."""
    base = options or Options()
    if not kw:
        return base
    given = build(**kw)
    return replace(base, **{k: getattr(given, k) for k in kw})


def _pending(root: Path) -> bool:
    # the fixer's own test, imported only when a fix left .fqcheck/ behind (lint's hot path)
    from .fixer.recovery import pending
    return pending(root)

"""The Python API; the CLI is built on it. `lint(path) -> Report`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from . import engine
from .catalog import load_catalog
from .checkpoint import Checkpoint
from .engine import SEVERITY_RANK, Finding

FAIL_ON = ("error", "warning", "never")


@dataclass
class Report:
    path: str
    findings: list[Finding] = field(default_factory=list)
    rules_run: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. an interrupted fix finished before linting

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def failed(self, fail_on: str = "error") -> bool:
        if fail_on == "never":
            return False
        floor = SEVERITY_RANK[fail_on]
        return any(SEVERITY_RANK[f.severity] >= floor for f in self.findings)

    @property
    def ok(self) -> bool:
        """True when no finding is an error."""
        return not self.failed("error")

    def summary(self) -> dict:
        return {"path": self.path, "errors": self.count("error"), "warnings": self.count("warning"),
                "infos": self.count("info"), "fixable": sum(f.fixable != "no" for f in self.findings),
                "rules_run": len(self.rules_run)}

    def as_dict(self) -> dict:
        return {"findings": [f.as_dict() for f in self.findings], "summary": self.summary()}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)


def levels_for(deep: bool = False, arch: bool = False) -> tuple[str, ...]:
    return ("header", "deep", "arch") if deep else (("header", "arch") if arch else ("header",))


def lint(path: str | Path, *, select: Sequence[str] | None = None, ignore: Sequence[str] | None = None,
         deep: bool = False, arch: bool = False, rules_dirs: Iterable[str | Path] = (),
         device: str = "auto", quiet: bool = False, recover: bool = True) -> Report:
    """Lint a checkpoint directory (or one .safetensors/.bin file). With `recover`, a fix that was
    interrupted (journal or lock left in .fqcheck/) is first finished or rolled back.

    Raises CheckpointError for a path that is not a checkpoint, CatalogError for a bad user rule.
    """
    catalog = load_catalog(tuple(rules_dirs))
    rules = engine.select_rules(catalog, select, ignore, levels_for(deep, arch))
    ckpt = Checkpoint.open(path)
    notes = []
    if recover and ckpt._only is None:
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
    findings = engine.run(ckpt, rules, {"device": device, "deep": deep, "quiet": quiet})
    return Report(str(path), findings, [r.code for r in rules], notes)

"""The rules engine: ties each catalog rule to its check, runs the selected ones, collects findings."""
from __future__ import annotations

import contextlib
import gc
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from .catalog import SEVERITIES, Rule
from .checkpoint import Checkpoint
from .options import Options

if TYPE_CHECKING:  # the edits are plain data; the engine needs their type only for annotations
    from .fixer.edits import Fix

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    message: str
    file: str | None = None
    tensor: str | None = None
    fixable: str = "no"  # "safe", "unsafe" or "no"
    fix: Fix = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "file": self.file,
                "tensor": self.tensor, "message": self.message, "fixable": self.fixable}


@dataclass
class Hit:
    """What a check yields; the engine adds code, default severity and fixability from the catalog."""
    message: str
    file: str | None = None
    tensor: str | None = None
    severity: str | None = None  # override, for rules whose severity depends on the case
    fixable: str | None = None   # override, e.g. safe only when bytes are equal
    fix: Fix = None


@dataclass
class Context:
    """What a check is given: the checkpoint and the run's options (typed, one Options for lint and
    fix alike). Analyses several rules share are memoised on the checkpoint (`once`)."""
    ckpt: Checkpoint
    options: Options = field(default_factory=Options)

    def once(self, key: str, make):
        """make() the first time `key` is asked for in this run; the same value after."""
        return self.ckpt.once(key, make)


CheckFn = Callable[[Context], Iterable[Hit]]
_CHECKS: dict[str, CheckFn] = {}


class CheckCrashed(Exception):
    """A check raised: a bug in fqcheck, reported as an internal error (exit 2)."""

    def __init__(self, code: str, exc: BaseException):
        super().__init__(f"check {code} failed: {type(exc).__name__}: {exc}")
        self.code = code


def check(*codes: str):
    """Register a function as the check for one or more rule codes."""
    def register(fn: CheckFn) -> CheckFn:
        for c in codes:
            if c in _CHECKS:
                raise RuntimeError(f"two checks registered for {c}")
            _CHECKS[c] = fn
        return fn
    return register


def registered() -> dict[str, CheckFn]:
    _import_checks()
    return dict(_CHECKS)


_imported = False


def _import_checks() -> None:
    global _imported
    if not _imported:
        from . import checks
        for m in pkgutil.iter_modules(checks.__path__):
            importlib.import_module(f"{checks.__name__}.{m.name}")
        _imported = True


def matches(code: str, patterns: Iterable[str]) -> bool:
    return any(code.startswith(p) for p in patterns)


def select_rules(catalog: dict[str, Rule], select=None, ignore=None, levels=("header",)) -> list[Rule]:
    """Rules whose code matches a --select prefix (default all) and no --ignore prefix. A rule of
    another level (deep, arch) runs only when its level is on, or when selected by its exact code."""
    select = [s.strip().upper() for s in (select or []) if s.strip()]
    ignore = [s.strip().upper() for s in (ignore or []) if s.strip()]
    out = []
    for code, rule in sorted(catalog.items()):
        if select and not matches(code, select):
            continue
        if matches(code, ignore):
            continue
        if rule.level not in levels and code not in select:
            continue
        out.append(rule)
    return out


@contextlib.contextmanager
def gc_paused():
    """The cyclic GC off for the block, back as it was after. Parsing ~90k header entries allocates
    ~1M container objects and no cycles: the GC would re-scan them all a few times (~0.1 s on a
    DeepSeek-R1 layout), and once more when it is back while they are still alive (~3 ms; api.lint
    pauses it until its Checkpoint is gone)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run(ckpt: Checkpoint, rules: list[Rule], options: Options | None = None) -> list[Finding]:
    """Run `rules` over `ckpt`. A user's severity override (options.severity) beats the rule's
    default and any per-finding severity."""
    options = options or Options()
    with gc_paused():
        if rules:
            from .checkpoint.parallel import fork_allowed
            ckpt.read_headers(2 if options.jobs != 1 and fork_allowed() else 1)
        return _run(ckpt, rules, options)


def _run(ckpt: Checkpoint, rules: list[Rule], options: Options) -> list[Finding]:
    _import_checks()
    ctx = Context(ckpt, options)
    severity = options.severity
    findings: list[Finding] = []
    for rule in rules:
        fn = _CHECKS.get(rule.code)
        if fn is None:
            from .checks.declarative import evaluate
            hits: Iterator[Hit] = evaluate(rule, ckpt)
        else:
            hits = fn(ctx)
        try:
            for h in hits:
                findings.append(Finding(
                    code=rule.code, severity=severity.get(rule.code) or h.severity or rule.severity, message=h.message,
                    file=h.file, tensor=h.tensor, fixable=h.fixable or rule.fix, fix=h.fix))
        except Exception as e:  # noqa: BLE001 - a crashing check is our bug, never the user's traceback
            raise CheckCrashed(rule.code, e) from e
    findings.sort(key=lambda f: (f.file or "", -SEVERITY_RANK[f.severity], f.code, f.tensor or ""))
    return findings


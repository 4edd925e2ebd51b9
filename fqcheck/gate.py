"""`fqcheck lint` as a CI gate, without typer: config + flags -> lint -> report -> exit code.

Kept free of typer so that a fast entry point can call it directly; fqcheck.cli.lint is a thin
typer wrapper over lint_command.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .api import FAIL_ON, QUANT_FORMATS, Report, lint

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def _error(message: str) -> int:
    sys.stderr.write(f"fqcheck: {message}\n")
    return EXIT_ERROR


def _split(values) -> list[str]:
    return [p.strip() for v in values or [] for p in v.split(",") if p.strip()]


def lint_command(paths: Sequence[Path], *, select=None, ignore=None, fmt: str = "text", fail_on: str | None = None,
                 exit_zero: bool = False, deep: bool | None = None, arch: bool | None = None, rules=None,
                 output_file: Path | None = None, statistics: bool = False, quiet: bool = False,
                 config: Path | None = None, device: str = "auto", quant_format: str | None = None) -> int:
    """Run `fqcheck lint`, print or write the report, return the exit code. None means "not given
    on the command line": the config file's value (or the default) applies."""
    from .catalog import CatalogError
    from .checkpoint import CheckpointError
    from .config import ConfigError, resolve
    from .engine import CheckCrashed
    from .report import FORMATS, render

    if fmt not in FORMATS:
        return _error(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fail_on is not None and fail_on not in FAIL_ON:
        return _error(f"unknown --fail-on {fail_on!r}; choose from {', '.join(FAIL_ON)}")
    try:
        cfg = resolve(config)
    except ConfigError as e:
        return _error(f"config error: {e}")
    # Each flag given on the command line replaces the config file's value.
    flags = dict(select=_split(select), ignore=_split(ignore), deep=deep, arch=arch, rules_dirs=rules)
    options = {**cfg.lint_options(), **{k: v for k, v in flags.items() if v not in (None, [])}}
    bad_device = check_device(device, bool(options.get("deep")))
    if bad_device:
        return _error(bad_device)
    if quant_format is not None and quant_format.lower() not in QUANT_FORMATS:
        return _error(f"unknown --quant-format {quant_format!r}; choose from {', '.join(QUANT_FORMATS)}")
    options.update(device=device, quiet=quiet, quant_format=quant_format)
    fail_on = fail_on or cfg.fail_on or "error"
    try:
        with _progress(quiet or options.get("deep"), paths):  # deep runs draw their own bar
            reports = [lint(p, **options) for p in paths]
    except (CheckpointError, CatalogError) as e:
        return _error(str(e))
    except CheckCrashed as e:
        if os.environ.get("FQCHECK_DEBUG"):
            raise
        return _error(f"internal error: {e} (set FQCHECK_DEBUG=1 for a traceback)")
    for note in (n for r in reports for n in r.notes):
        sys.stderr.write(f"fqcheck: note: {note}\n")
    report = reports[0] if len(reports) == 1 else merge(reports)
    color = output_file is None and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    out = render(report, fmt, color=color, quiet=quiet, statistics=statistics, fail_on=fail_on)
    if output_file:
        try:
            Path(output_file).write_text(out, encoding="utf-8")
        except OSError as e:
            return _error(f"cannot write {output_file}: {e.strerror or e}")
    else:
        sys.stdout.write(out)
        sys.stdout.flush()
    return EXIT_FINDINGS if report.failed(fail_on) and not exit_zero else EXIT_CLEAN


def check_device(device: str, deep: bool) -> str | None:
    """--device auto|cpu|cuda[:N]; a CUDA device is checked (torch imported) only for deep runs."""
    import re
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device.strip().lower()):
        return f"unknown --device {device!r}; use auto, cpu or cuda[:N]"
    if deep and device.startswith("cuda"):
        try:
            import torch
        except ImportError:
            return f"--device {device}: torch is not installed"
        if not torch.cuda.is_available():
            return f"--device {device}: torch sees no CUDA GPU"
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)"
    return None


def _progress(quiet: bool, paths: Sequence[Path]):
    """A spinner on stderr while linting, only for a person at a terminal (rich is imported only then)."""
    if quiet or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    names = ", ".join(str(p) for p in paths)
    return Console(stderr=True, no_color="NO_COLOR" in os.environ).status(f"fqcheck: linting {names}", spinner="line")


def merge(reports: Sequence[Report]) -> Report:
    """One report over several checkpoints (pre-commit passes them all): files become relative
    to the checkpoints' common folder."""
    from .report.paths import checkpoint_root

    roots = [checkpoint_root(r) for r in reports]
    common = os.path.commonpath(roots)
    findings, rules_run, rules = [], [], {}
    for r, root in zip(reports, roots):
        for f in r.findings:
            rel = os.path.relpath(os.path.join(root, f.file) if f.file else root, common)
            findings.append(replace(f, file=Path(rel).as_posix()))
        rules_run += [c for c in r.rules_run if c not in rules_run]
        rules.update(r.rules)
    return Report(common, findings, rules_run, rules)

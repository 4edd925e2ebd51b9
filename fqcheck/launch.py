"""Process entry point (`fqcheck`, `python -m fqcheck`).

`fqcheck lint` is the command CI runs on every export, and typer costs ~0.25 s before it does
anything (its import plus pydantic, which it uses to convert arguments). So a plain `lint`
command line is parsed here by a small exact parser and run without importing typer or rich;
anything it does not fully understand (--help, an unknown or misspelt option, a missing value,
another command) goes to the typer app in fqcheck.cli, which prints the usual help and errors.
Both paths run `lint_command`, so they cannot drift apart in what they do.
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2

# `fqcheck lint` options: name -> (flags, kind). kind: "flag", "value", "multi" (repeatable).
# Keep in step with the typer command fqcheck.cli.lint (tests/test_launch.py checks it).
LINT_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "select": (("--select",), "multi"),
    "ignore": (("--ignore",), "multi"),
    "fmt": (("--format", "-f"), "value"),
    "fail_on": (("--fail-on",), "value"),
    "exit_zero": (("--exit-zero",), "flag"),
    "deep": (("--deep",), "flag"),
    "arch": (("--arch",), "flag"),
    "rules": (("--rules",), "multi"),
    "output_file": (("--output-file", "-o"), "value"),
    "statistics": (("--statistics",), "flag"),
    "quiet": (("--quiet", "-q"), "flag"),
    "device": (("--device",), "value"),
}
_DEFAULTS = {"fmt": "text", "fail_on": "error", "device": "auto"}
_PATH_OPTIONS = {"rules", "output_file"}


def parse_lint_args(args: list[str]) -> dict | None:
    """The keyword arguments of lint_command for `fqcheck lint ARGS`, or None when this command
    line needs typer (help, errors, anything unusual)."""
    by_flag = {f: (name, kind) for name, (flags, kind) in LINT_OPTIONS.items() for f in flags}
    out: dict = {name: ([] if kind == "multi" else False if kind == "flag" else _DEFAULTS.get(name))
                 for name, (_, kind) in LINT_OPTIONS.items()}
    paths = []
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if not a.startswith("-") or a == "-":
            paths.append(a)
            continue
        flag, eq, value = a.partition("=") if a.startswith("--") else (a, "", "")
        if flag not in by_flag:
            return None
        name, kind = by_flag[flag]
        if kind == "flag":
            if eq:
                return None
            out[name] = True
            continue
        if not eq:
            if i >= len(args) or args[i].startswith("-"):
                return None
            value = args[i]
            i += 1
        if kind == "multi":
            out[name].append(value)
        else:
            out[name] = value
    if len(paths) != 1 or not paths[0]:
        return None
    out["path"] = Path(paths[0])
    for name in _PATH_OPTIONS:
        v = out[name]
        out[name] = [Path(p) for p in v] if isinstance(v, list) else (Path(v) if v else None)
    for name, (_, kind) in LINT_OPTIONS.items():
        if kind == "multi" and not out[name]:
            out[name] = None  # as typer passes an option that was not given
    return out


def _split(values) -> list[str]:
    return [p for v in values or [] for p in v.split(",") if p.strip()]


def _error(message: str) -> int:
    sys.stderr.write(f"fqcheck: {message}\n")
    return EXIT_ERROR


def lint_command(path: Path, select=None, ignore=None, fmt: str = "text", fail_on: str = "error",
                 exit_zero: bool = False, deep: bool = False, arch: bool = False, rules=None,
                 output_file: Path | None = None, statistics: bool = False, quiet: bool = False,
                 device: str = "auto") -> int:
    """`fqcheck lint`: run, print the report, return the exit code."""
    # A CLI run is short and creates no garbage cycles worth collecting; the cyclic GC would
    # otherwise re-scan the ~1M objects of a large checkpoint's headers (~0.03 s) for nothing.
    gc.disable()
    from .api import FAIL_ON, lint as run_lint
    from .catalog import CatalogError
    from .checkpoint import CheckpointError
    from .engine import CheckCrashed
    from .report import FORMATS, render

    if fmt not in FORMATS:
        return _error(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fail_on not in FAIL_ON:
        return _error(f"unknown --fail-on {fail_on!r}; choose from {', '.join(FAIL_ON)}")
    bad_device = _check_device(device, deep)
    if bad_device:
        return _error(bad_device)
    try:
        report = run_lint(path, select=_split(select), ignore=_split(ignore), deep=deep, arch=arch,
                          rules_dirs=rules or (), quiet=quiet, device=device)
    except (CheckpointError, CatalogError) as e:
        return _error(str(e))
    except CheckCrashed as e:
        if os.environ.get("FQCHECK_DEBUG"):
            raise
        return _error(f"internal error: {e} (set FQCHECK_DEBUG=1 for a traceback)")
    for note in report.notes:
        sys.stderr.write(f"fqcheck: note: {note}\n")
    color = output_file is None and sys.stdout.isatty()
    kw = {"color": color, "quiet": quiet, "statistics": statistics} if fmt == "text" else {}
    out = render(report, fmt, **kw)
    if output_file:
        output_file.write_text(out, encoding="utf-8")
    else:
        sys.stdout.write(out)
        sys.stdout.flush()
    return EXIT_FINDINGS if report.failed(fail_on) and not exit_zero else EXIT_CLEAN


def _check_device(device: str, deep: bool) -> str | None:
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


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["lint"]:
        kwargs = parse_lint_args(args[1:])
        if kwargs is not None:
            if argv is None:
                gc.disable()  # before the imports too (see lint_command)
            code = lint_command(**kwargs)
            if argv is None and not (kwargs["deep"] or kwargs["arch"]):
                # A header-only run holds nothing to clean up; skip the interpreter's teardown,
                # which would free the ~1M objects of a large checkpoint's headers one by one.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            sys.exit(code)
    from .cli import typer_main
    typer_main()

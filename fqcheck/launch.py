"""Process entry point (`fqcheck`, `python -m fqcheck`).

`fqcheck lint` is the command CI runs on every export, and typer costs ~0.25 s before it does
anything (its import plus pydantic, which it uses to convert arguments). So a plain `lint`
command line is parsed here by a small exact parser and run without importing typer or rich;
anything it does not fully understand (--help, an unknown or misspelt option, a missing value,
another command) goes to the typer app in fqcheck.cli, which prints the usual help and errors.
Both paths run `fqcheck.gate.lint_command`, so they cannot drift apart in what they do.
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

# `fqcheck lint` options: name -> (typer's declarations, kind). kind: "flag", "switch" (--x/--no-x,
# None when absent so the config file decides), "value", "multi" (repeatable).
# Keep in step with the typer command fqcheck.cli.lint (tests/test_launch.py checks it).
LINT_OPTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "select": (("--select",), "multi"),
    "ignore": (("--ignore",), "multi"),
    "fmt": (("--format", "-f"), "value"),
    "fail_on": (("--fail-on",), "value"),
    "exit_zero": (("--exit-zero",), "flag"),
    "deep": (("--deep/--no-deep",), "switch"),
    "arch": (("--arch/--no-arch",), "switch"),
    "rules": (("--rules",), "multi"),
    "output_file": (("--output-file", "-o"), "value"),
    "statistics": (("--statistics",), "flag"),
    "quiet": (("--quiet", "-q"), "flag"),
    "config": (("--config",), "value"),
    "device": (("--device",), "value"),
    "quant_format": (("--quant-format",), "value"),
}
_DEFAULTS = {"fmt": "text", "device": "auto"}
_PATH_OPTIONS = {"rules", "output_file", "config"}


def parse_lint_args(args: list[str]) -> dict | None:
    """The keyword arguments of fqcheck.gate.lint_command for `fqcheck lint ARGS`, or None when
    this command line needs typer (help, errors, anything unusual)."""
    by_flag: dict[str, tuple[str, str, bool]] = {}
    for name, (decls, kind) in LINT_OPTIONS.items():
        for decl in decls:
            on, _, off = decl.partition("/")
            by_flag[on] = (name, kind, True)
            if off:
                by_flag[off] = (name, kind, False)
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
        name, kind, on = by_flag[flag]
        if kind in ("flag", "switch"):
            if eq:
                return None
            out[name] = on
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
    if not paths or not all(paths):
        return None
    out["paths"] = [Path(p) for p in paths]
    for name in _PATH_OPTIONS:
        v = out[name]
        out[name] = [Path(p) for p in v] if isinstance(v, list) else (Path(v) if v else None)
    for name, (_, kind) in LINT_OPTIONS.items():
        if kind == "multi" and not out[name]:
            out[name] = None  # as typer passes an option that was not given
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["lint"]:
        kwargs = parse_lint_args(args[1:])
        if kwargs is not None:
            if argv is None:
                gc.disable()  # before the imports too (see lint_command)
                if not (kwargs["deep"] or kwargs["arch"]):
                    from .checkpoint import preopen, retain_until_exit
                    retain_until_exit()  # this process ends with os._exit, below
                    if len(kwargs["paths"]) == 1:
                        preopen(kwargs["paths"][0])  # headers are read while the rest is imported
            from .gate import lint_command
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

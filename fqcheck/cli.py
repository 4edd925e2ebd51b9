"""Command line: a thin typer app over fqcheck.api."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Validate and repair quantized Hugging Face checkpoints before serving.")

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def _fail(message: str) -> "typer.Exit":
    typer.echo(f"fqcheck: {message}", err=True)
    return typer.Exit(EXIT_ERROR)


def _split(values: Optional[List[str]]) -> list[str]:
    return [p for v in values or [] for p in v.split(",") if p.strip()]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fqcheck {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


@app.command()
def lint(
    paths: List[Path] = typer.Argument(..., help="Checkpoint directories, or .safetensors/.bin files."),
    select: Optional[List[str]] = typer.Option(None, "--select", help="Codes or prefixes to run (QNT,IDX001)."),
    ignore: Optional[List[str]] = typer.Option(None, "--ignore", help="Codes or prefixes to skip."),
    fmt: str = typer.Option("text", "--format", "-f", help="text, json, sarif, github or junit."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="error (default), warning or never."),
    exit_zero: bool = typer.Option(False, "--exit-zero", help="Exit 0 even when findings fail the run."),
    deep: Optional[bool] = typer.Option(None, "--deep/--no-deep", help="Also read tensor data (slower)."),
    arch: Optional[bool] = typer.Option(None, "--arch/--no-arch", help="Also check tensors against the architecture in config.json."),
    rules: Optional[List[Path]] = typer.Option(None, "--rules", help="Extra folder of declarative rules."),
    output_file: Optional[Path] = typer.Option(None, "--output-file", "-o", help="Write the report here."),
    statistics: bool = typer.Option(False, "--statistics", help="Text: a count per code instead of the findings."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Findings only: no summary line, no progress."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config file (default: fqcheck.toml or "
                                          "pyproject.toml \\[tool.fqcheck], found from the current directory up)."),
) -> None:
    """Report what is wrong with a checkpoint. Exit 0 clean, 1 findings, 2 usage or internal error."""
    from .api import FAIL_ON, lint as run_lint
    from .catalog import CatalogError
    from .checkpoint import CheckpointError
    from .config import ConfigError, resolve
    from .engine import CheckCrashed
    from .report import FORMATS, render

    if fmt not in FORMATS:
        raise _fail(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fail_on is not None and fail_on not in FAIL_ON:
        raise _fail(f"unknown --fail-on {fail_on!r}; choose from {', '.join(FAIL_ON)}")
    try:
        cfg = resolve(config)
    except ConfigError as e:
        raise _fail(f"config error: {e}")
    # Each flag given on the command line replaces the config file's value.
    options = dict(select=_split(select) if select else cfg.select, ignore=_split(ignore) if ignore else cfg.ignore,
                   deep=bool(cfg.deep if deep is None else deep), arch=bool(cfg.arch if arch is None else arch),
                   rules_dirs=rules or cfg.rules, severity_overrides=cfg.severity)
    fail_on = fail_on or cfg.fail_on or "error"
    try:
        with _progress(quiet, paths):
            reports = [run_lint(p, **options) for p in paths]
    except (CheckpointError, CatalogError) as e:
        raise _fail(str(e))
    except CheckCrashed as e:
        if os.environ.get("FQCHECK_DEBUG"):
            raise
        raise _fail(f"internal error: {e} (set FQCHECK_DEBUG=1 for a traceback)")
    report = reports[0] if len(reports) == 1 else _merge(reports)
    color = output_file is None and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    out = render(report, fmt, color=color, quiet=quiet, statistics=statistics, fail_on=fail_on)
    if output_file:
        try:
            output_file.write_text(out, encoding="utf-8")
        except OSError as e:
            raise _fail(f"cannot write {output_file}: {e.strerror or e}")
    else:
        sys.stdout.write(out)
    raise typer.Exit(EXIT_FINDINGS if report.failed(fail_on) and not exit_zero else EXIT_CLEAN)


def _progress(quiet: bool, paths: List[Path]):
    """A spinner on stderr while linting, only for a person at a terminal."""
    import contextlib

    if quiet or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    names = ", ".join(str(p) for p in paths)
    return Console(stderr=True, no_color="NO_COLOR" in os.environ).status(f"fqcheck: linting {names}", spinner="line")


def _merge(reports):
    """One report over several checkpoints: files become relative to their common folder."""
    from dataclasses import replace

    from .api import Report
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


@app.command("rules")
def list_rules(fmt: str = typer.Option("text", "--format", "-f", help="text or json.")) -> None:
    """List the rule catalog."""
    import json

    from .catalog import load_catalog

    catalog = load_catalog()
    if fmt == "json":
        typer.echo(json.dumps([{"code": r.code, "name": r.name, "severity": r.severity, "level": r.level,
                                "fix": r.fix, "summary": r.summary} for r in catalog.values()], indent=2))
        return
    for r in sorted(catalog.values(), key=lambda r: r.code):
        level = "" if r.level == "header" else f" [{r.level}]"
        fix = "" if r.fix == "no" else f" (fix: {r.fix})"
        typer.echo(f"{r.code}  {r.severity:<7} {r.name}{level}{fix}\n        {r.summary}")


@app.command()
def explain(code: str = typer.Argument(..., help="A rule code, e.g. QNT001.")) -> None:
    """Print one rule's page: what it finds, why it matters, what the fix does."""
    from .catalog import load_catalog

    rule = load_catalog().get(code.upper())
    if rule is None:
        raise _fail(f"no rule {code!r}; `fqcheck rules` lists them")
    fix = {"safe": "safe fix", "unsafe": "unsafe fix (needs --unsafe-fixes)", "no": "not fixable"}[rule.fix]
    lines = [f"{rule.code} {rule.name}", "", rule.summary, "",
             f"Severity: {rule.severity}   Level: {rule.level}   Fix: {fix}"]
    if rule.why:
        lines += ["", "Why it matters", rule.why]
    if rule.fix_description:
        lines += ["", "What the fix does", rule.fix_description]
    typer.echo("\n".join(lines))


def main() -> None:
    app()

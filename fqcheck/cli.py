"""The command line: the one typer app over fqcheck.api.

Every command resolves its Options with fqcheck.options.resolve (config file, then flags), so
`lint`, `fix`, `rules` and `explain` read the same config and the same rule folders.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .checkpoint.parallel import forking

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Validate and repair quantized Hugging Face checkpoints "
                  "before serving.")

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2

# Options lint and fix share, declared once.
_SELECT = typer.Option(None, "--select", metavar="CODES", help="Only these rule codes or prefixes (QNT,IDX001).")
_IGNORE = typer.Option(None, "--ignore", metavar="CODES", help="Skip these rule codes or prefixes.")
_DEEP = typer.Option(None, "--deep/--no-deep", help="Also read tensor data (slower; includes --arch).")
_ARCH = typer.Option(None, "--arch/--no-arch", help="Check tensors against the model config.json declares, built on "
                     "the meta device with transformers (the default compares them from the headers).")
_RULES = typer.Option(None, "--rules", metavar="DIR", help="A folder of your own declarative rules.")
_CONFIG = typer.Option(None, "--config", metavar="FILE", help="Config file. Default: fqcheck.toml or "
                       "pyproject.toml [tool.fqcheck], found from the current directory up.")
_DEVICE = typer.Option("auto", "--device", metavar="DEVICE", help="Where deep checks run: auto, cpu or cuda[:N].")
_FAIL_ON = typer.Option(None, "--fail-on", metavar="LEVEL", help="Fail on error (default), warning or never.")
_QUANT_FORMAT = typer.Option(None, "--quant-format", metavar="FORMAT", help="fp8, int8, int4 or nvfp4: the "
                             "weight-quantizer format when neither the state file, the quantization config nor "
                             "the folded weights decide it.")
_JOBS = typer.Option(0, "--jobs", "-j", metavar="N", help="Workers for the deep pass and the re-fold: N CPU "
                     "threads, or one per GPU with --device cuda (0: auto, every core or GPU); not 1: shard headers are "
                     "also read by a second process.")


def _say(message: str) -> None:
    from .report.escape import printable
    sys.stderr.write(f"fqcheck: {printable(message)}\n")


def _fail(message: str) -> typer.Exit:
    _say(message)
    return typer.Exit(EXIT_ERROR)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fqcheck {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def _options(config, **flags):
    """Config file + flags -> validated Options; a bad value is a usage error (exit 2)."""
    from .catalog import CatalogError
    from .config import ConfigError
    from .options import UsageError, resolve
    try:
        return resolve(config, **flags)
    except ConfigError as e:
        raise _fail(f"config error: {e}") from None
    except (UsageError, CatalogError) as e:
        raise _fail(str(e)) from None


@contextlib.contextmanager
def _errors():
    """What a run can raise, as one-line errors with exit 2 (a traceback only with FQCHECK_DEBUG)."""
    from .catalog import CatalogError
    from .checkpoint import CheckpointError
    from .engine import CheckCrashed
    from .fixer.errors import FixError, FixRefused
    from .options import UsageError
    try:
        yield
    except FixRefused as e:  # one line, then the blocking findings as lint prints them (or the reasons)
        from .report.escape import printable
        from .report.text import finding_line
        head, *rest = str(e).splitlines() or [""]
        _say(head)
        details = [finding_line(f) for f in e.findings] or [printable(line.strip()) for line in rest]
        sys.stderr.write("".join(f"  {line}\n" for line in details if line))
        raise typer.Exit(EXIT_ERROR) from None
    except (FixError, CheckpointError, CatalogError, UsageError) as e:
        raise _fail(str(e)) from None
    except CheckCrashed as e:
        if os.environ.get("FQCHECK_DEBUG"):
            raise
        raise _fail(f"internal error: {e} (set FQCHECK_DEBUG=1 for a traceback)") from None


@app.command(short_help="Report what is wrong with a checkpoint.")
def lint(
    paths: List[Path] = typer.Argument(..., metavar="PATH", hidden=True),
    select: Optional[List[str]] = _SELECT,
    ignore: Optional[List[str]] = _IGNORE,
    fmt: str = typer.Option("text", "--format", "-f", metavar="FORMAT", help="text, json, sarif, github or junit."),
    fail_on: Optional[str] = _FAIL_ON,
    exit_zero: bool = typer.Option(False, "--exit-zero", help="Exit 0 even when findings fail the run."),
    deep: Optional[bool] = _DEEP,
    arch: Optional[bool] = _ARCH,
    rules: Optional[List[Path]] = _RULES,
    output_file: Optional[Path] = typer.Option(None, "--output-file", "-o", metavar="FILE", help="Write the report here."),
    statistics: bool = typer.Option(False, "--statistics", help="Text: a count per code instead of the findings."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Text: every finding on its own line, none grouped."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Findings only: no summary line, no progress."),
    config: Optional[Path] = _CONFIG,
    device: str = _DEVICE,
    quant_format: Optional[str] = _QUANT_FORMAT,
    jobs: int = _JOBS,
) -> None:
    """Report what is wrong with checkpoints (folders, or .safetensors/.bin files).

    Exit 0 when clean, 1 on findings at or above --fail-on, 2 on a usage or internal error.
    """
    from .api import Report
    from .api import lint as run_lint
    from .report import FORMATS, render

    if fmt not in FORMATS:
        raise _fail(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    opts = _options(config, select=select, ignore=ignore, deep=deep, arch=arch, rules_dirs=rules,
                    fail_on=fail_on, device=device, quiet=quiet, quant_format=quant_format, jobs=_jobs(jobs))
    with _errors():
        _check_device(opts)
        with _spinner(quiet or opts.deep, paths), forking():  # deep runs draw their own bar
            reports = [run_lint(p, opts) for p in paths]
    report = Report.merge(reports)
    for note in report.notes:
        _say(f"note: {note}")
    color = output_file is None and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    out = render(report, fmt, color=color, quiet=quiet, statistics=statistics, verbose=verbose,
                 fail_on=opts.fail_on)
    if output_file:
        try:
            Path(output_file).write_text(out, encoding="utf-8")
        except OSError as e:
            raise _fail(f"cannot write {output_file}: {e.strerror or e}") from None
    else:
        sys.stdout.write(out)
    raise typer.Exit(EXIT_FINDINGS if report.failed(opts.fail_on) and not exit_zero else EXIT_CLEAN)


@app.command(short_help="Repair it in place, crash-safely.")
def fix(
    path: Path = typer.Argument(..., metavar="PATH", hidden=True),
    unsafe_fixes: bool = typer.Option(False, "--unsafe-fixes", help="Also apply fixes that change behaviour."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; change nothing."),
    output: Optional[Path] = typer.Option(None, "--output", metavar="DIR", help="Write a repaired copy here; leave PATH untouched."),
    no_backup: bool = typer.Option(False, "--no-backup", help="Do not keep the originals in .fqcheck/backup/."),
    select: Optional[List[str]] = _SELECT,
    ignore: Optional[List[str]] = _IGNORE,
    deep: Optional[bool] = typer.Option(None, "--deep/--no-deep", help="Also run the data-reading checks and the re-fold (includes --arch)."),
    arch: Optional[bool] = _ARCH,
    rules: Optional[List[Path]] = _RULES,
    fail_on: Optional[str] = _FAIL_ON,
    config: Optional[Path] = _CONFIG,
    device: str = _DEVICE,
    quant_format: Optional[str] = _QUANT_FORMAT,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List every finding, none grouped."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only a summary line and what remains; no progress bar."),
    jobs: int = _JOBS,
) -> None:
    """Repair a checkpoint (a folder, or one .safetensors file) crash-safely, with the same config as lint.

    Exit 0 when nothing at or above --fail-on remains, 1 when findings remain (or, with --dry-run,
    when there is something to fix), 2 when refused (unfixable errors; nothing changed) or on a
    usage or internal error.
    """
    from .api import fix as run_fix
    from .report.fixes import describe

    opts = _options(config, select=select, ignore=ignore, deep=deep, arch=arch, rules_dirs=rules,
                    fail_on=fail_on, device=device, quiet=quiet, quant_format=quant_format, jobs=_jobs(jobs))
    with _errors():
        _check_device(opts)
        with forking():
            res = run_fix(path, opts, unsafe_fixes=unsafe_fixes, dry_run=dry_run, output=output,
                          backup=not no_backup)
    sys.stdout.write(describe(res, path, quiet=quiet, verbose=verbose, filtered=bool(opts.select or opts.ignore)))
    if dry_run:
        raise typer.Exit(EXIT_CLEAN if res.plan.empty else EXIT_FINDINGS)
    raise typer.Exit(EXIT_FINDINGS if res.remaining.failed(opts.fail_on) else EXIT_CLEAN)


@app.command("rules", short_help="List the rule catalog.")
def list_rules(
    fmt: str = typer.Option("text", "--format", "-f", metavar="FORMAT", help="text or json."),
    rules: Optional[List[Path]] = _RULES,
    config: Optional[Path] = _CONFIG,
) -> None:
    """List the rule catalog, your own rules (--rules or the config file) included."""
    import json

    catalog = _catalog(config, rules)
    if fmt == "json":
        typer.echo(json.dumps([{"code": r.code, "name": r.name, "severity": r.severity, "level": r.level,
                                "fix": r.fix, "summary": r.summary} for r in catalog.values()], indent=2))
        return
    if fmt != "text":
        raise _fail(f"unknown --format {fmt!r}; choose from text, json")
    for r in sorted(catalog.values(), key=lambda r: r.code):
        level = "" if r.level == "header" else f" [{r.level}]"
        fix_ = "" if r.fix == "no" else f" (fix: {r.fix})"
        typer.echo(f"{r.code}  {r.severity:<7} {r.name}{level}{fix_}\n        {r.summary}")


@app.command(short_help="Explain one rule.")
def explain(
    code: str = typer.Argument(..., metavar="CODE", hidden=True),
    rules: Optional[List[Path]] = _RULES,
    config: Optional[Path] = _CONFIG,
) -> None:
    """Print rule CODE's page (e.g. QNT001): what it finds, why it matters, what the fix does."""
    rule = _catalog(config, rules).get(code.strip().upper())
    if rule is None:
        raise _fail(f"no rule {code!r}; `fqcheck rules` lists them")
    fix_ = {"safe": "safe fix", "unsafe": "unsafe fix (needs --unsafe-fixes)", "no": "not fixable"}[rule.fix]
    lines = [f"{rule.code} {rule.name}", "", rule.summary, "",
             f"Severity: {rule.severity}   Level: {rule.level}   Fix: {fix_}"]
    if rule.why:
        lines += ["", "Why it matters", rule.why]
    if rule.fix_description:
        lines += ["", "What the fix does", rule.fix_description]
    if rule.source and rule.source.parent != _builtin_rules():
        lines += ["", f"Defined in {rule.source}"]
    typer.echo("\n".join(lines))


@app.command(short_help="Undo the last fix.")
def restore(path: Path = typer.Argument(..., metavar="PATH", hidden=True)) -> None:
    """Undo the last in-place fix of PATH: put the originals from .fqcheck/backup/ back."""
    from .fixer.runner import restore as run_restore
    from .report.escape import printable

    with _errors():
        backup, names = run_restore(path)
    typer.echo(printable(f"restored {len(names)} file(s) from {backup}: {', '.join(names)}"))


def _jobs(n: int) -> int:
    if n < 0:
        raise _fail(f"--jobs {n}: expected 0 (auto) or a positive count")
    return n


def _catalog(config, rules):
    opts = _options(config, rules_dirs=rules)
    with _errors():
        return opts.catalog()


def _builtin_rules() -> Path:
    from .catalog import rules_dir
    return rules_dir()


def _check_device(opts) -> None:
    """A CUDA device is checked (torch imported) only for runs that compute on it."""
    if not (opts.deep and opts.device.startswith("cuda")):
        return
    from .options import UsageError
    try:
        import torch
    except ImportError:
        raise UsageError(f"--device {opts.device}: torch is not installed") from None
    if not torch.cuda.is_available():
        raise UsageError(f"--device {opts.device}: torch sees no CUDA GPU")
    idx = int(opts.device.split(":")[1]) if ":" in opts.device else 0
    if idx >= torch.cuda.device_count():
        raise UsageError(f"--device {opts.device}: only {torch.cuda.device_count()} CUDA device(s)")


def _spinner(quiet: bool, paths):
    """A spinner on stderr while linting, only for a person at a terminal."""
    if quiet or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    from .report.escape import printable
    names = printable(", ".join(str(p) for p in paths))
    return Console(stderr=True, no_color="NO_COLOR" in os.environ).status(f"fqcheck: linting {names}", spinner="line")


def main() -> None:
    """Console-script entry (`fqcheck`, `python -m fqcheck`)."""
    app()

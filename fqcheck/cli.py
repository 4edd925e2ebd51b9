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
QUANT_FORMAT_HELP = ("fp8, int8, int4 or nvfp4: the weight-quantizer format when neither the state file, "
                     "the quantization config nor the folded weights decide it.")


def _fail(message: str) -> "typer.Exit":
    typer.echo(f"fqcheck: {message}", err=True)
    return typer.Exit(EXIT_ERROR)


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
    device: str = typer.Option("auto", "--device", help="Where deep checks run: auto, cpu or cuda[:N]."),
    quant_format: Optional[str] = typer.Option(None, "--quant-format", help=QUANT_FORMAT_HELP),
) -> None:
    """Report what is wrong with a checkpoint. Exit 0 clean, 1 findings, 2 usage or internal error."""
    from .gate import lint_command

    raise typer.Exit(lint_command(paths, select=select, ignore=ignore, fmt=fmt, fail_on=fail_on,
                                  exit_zero=exit_zero, deep=deep, arch=arch, rules=rules, output_file=output_file,
                                  statistics=statistics, quiet=quiet, config=config,
                                  device=device, quant_format=quant_format))


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


@app.command()
def fix(
    path: Path = typer.Argument(..., help="Checkpoint directory (or one .safetensors file)."),
    unsafe_fixes: bool = typer.Option(False, "--unsafe-fixes", help="Also apply fixes that change behaviour."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; change nothing."),
    output: Optional[Path] = typer.Option(None, "--output", help="Write a repaired copy here; leave PATH untouched."),
    no_backup: bool = typer.Option(False, "--no-backup", help="Do not keep the originals in .fqcheck/backup/."),
    select: Optional[List[str]] = typer.Option(None, "--select", help="Codes or prefixes to fix."),
    ignore: Optional[List[str]] = typer.Option(None, "--ignore", help="Codes or prefixes to leave alone."),
    deep: bool = typer.Option(False, "--deep", help="Also run the data-reading checks and the re-fold (includes --arch)."),
    arch: bool = typer.Option(False, "--arch", help="Also drop tensors the architecture in config.json does not have (ARC001)."),
    device: str = typer.Option("auto", "--device", help="Where --deep runs: auto, cpu or cuda:N."),
    rules: Optional[List[Path]] = typer.Option(None, "--rules", help="Extra folder of declarative rules."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    quant_format: Optional[str] = typer.Option(None, "--quant-format", help=QUANT_FORMAT_HELP),
) -> None:
    """Repair what can be repaired, crash-safely. Exit 0 when no error remains, 1 when findings
    remain, 2 when refused (unfixable errors; nothing changed) or on usage/internal errors."""
    from .catalog import CatalogError
    from .checkpoint import CheckpointError
    from .engine import CheckCrashed
    from .fix.runner import FixError, FixRefused, fix as run_fix
    from .gate import _split

    try:
        res = run_fix(path, unsafe_fixes=unsafe_fixes, dry_run=dry_run, output=output,
                      backup=not no_backup, select=_split(select), ignore=_split(ignore), deep=deep, arch=arch,
                      rules_dirs=rules or (), device=device, quiet=quiet, quant_format=quant_format)
    except FixRefused as e:
        typer.echo(f"fqcheck: {e}", err=True)
        raise typer.Exit(EXIT_ERROR)
    except (FixError, CheckpointError, CatalogError) as e:
        raise _fail(str(e))
    except CheckCrashed as e:
        if os.environ.get("FQCHECK_DEBUG"):
            raise
        raise _fail(f"internal error: {e} (set FQCHECK_DEBUG=1 for a traceback)")
    echo = typer.echo
    if res.recovered:
        echo(f"note: {res.recovered}")
    plan = res.plan
    if plan.empty:
        echo("nothing to fix")
    else:
        echo("plan (dry run, nothing changed):" if dry_run else
             (f"wrote a repaired copy to {res.output}:" if res.output else "fixed:"))
        for line in plan.describe():
            echo(f"  {line}")
        if len(plan.applied) <= 20:
            for f in plan.applied:
                echo(f"  [{f.code}] {f.file or ''}{':' + f.tensor if f.tensor else ''} {f.message}")
        else:
            from collections import Counter
            for code, n in sorted(Counter(f.code for f in plan.applied).items()):
                echo(f"  [{code}] {n} finding(s)")
        if res.backup:
            echo(f"originals kept in {path / res.backup}; undo with `fqcheck restore {path}`")
    for f in plan.skipped:
        why = "needs --unsafe-fixes" if f.fixable == "unsafe" else "no automatic edit"
        echo(f"  skipped [{f.code}] {f.file or ''}{':' + f.tensor if f.tensor else ''} ({why})")
    if dry_run:
        raise typer.Exit(EXIT_CLEAN if plan.empty else EXIT_FINDINGS)
    rem = res.remaining
    if rem.findings:
        from .report import render
        echo("remaining:")
        sys.stdout.write(render(rem, "text", color=False, quiet=False, statistics=False))
    else:
        echo("no findings remain" + (" (among the selected rules)" if select or ignore else ""))
    raise typer.Exit(EXIT_CLEAN if rem.ok else EXIT_FINDINGS)


@app.command()
def restore(path: Path = typer.Argument(..., help="Checkpoint directory fixed in place earlier.")) -> None:
    """Undo the last in-place fix: put the originals from .fqcheck/backup/ back."""
    from .checkpoint import CheckpointError
    from .fix.runner import FixError, restore as run_restore

    try:
        backup, names = run_restore(path)
    except (FixError, CheckpointError) as e:
        raise _fail(str(e))
    typer.echo(f"restored {len(names)} file(s) from {backup}: {', '.join(names)}")


def main() -> None:
    """Console-script entry; plain `fqcheck lint` command lines skip typer (see fqcheck.launch)."""
    from .launch import main as launch_main
    launch_main()


def typer_main() -> None:
    app()

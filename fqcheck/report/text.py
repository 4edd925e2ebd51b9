"""Terminal output: findings grouped by file, then a one-line summary."""
from __future__ import annotations

import io
import os
from itertools import groupby

from ..api import Report

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def render(report: Report, *, color: bool | None = None, quiet: bool = False, statistics: bool = False) -> str:
    from rich.console import Console
    from rich.markup import escape

    if color is None:
        color = False
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=color, no_color=not color or "NO_COLOR" in os.environ,
                  width=int(os.environ.get("COLUMNS", 120)), highlight=False, soft_wrap=True)
    if not quiet:
        for fname, group in groupby(report.findings, key=lambda f: f.file or ""):
            con.print(f"[bold]{escape(fname or report.path)}[/bold]")
            for f in group:
                where = f"{escape(f.tensor)}: " if f.tensor else ""
                fix = " [dim]\\[fixable][/dim]" if f.fixable == "safe" else (" [dim]\\[unsafe fix][/dim]" if f.fixable == "unsafe" else "")
                con.print(f"  [{_STYLE[f.severity]}]{f.code}[/] {f.severity:<7} {where}{escape(f.message)}{fix}")
    s = report.summary()
    if statistics and report.findings:
        counts: dict[str, int] = {}
        for f in report.findings:
            counts[f.code] = counts.get(f.code, 0) + 1
        for code, n in sorted(counts.items()):
            con.print(f"{n:>6}  {code}")
    if not report.findings:
        con.print(f"[green]✓[/green] {escape(report.path)}: no findings ({s['rules_run']} rules)")
    else:
        fixable = f", {s['fixable']} fixable with `fqcheck fix`" if s["fixable"] else ""
        con.print(f"{escape(report.path)}: {s['errors']} error(s), {s['warnings']} warning(s), "
                  f"{s['infos']} info{fixable} ({s['rules_run']} rules)")
    return buf.getvalue()

"""Terminal output: findings grouped by file, then a one-line summary (ruff's layout)."""
from __future__ import annotations

import io
import os
from itertools import groupby

from ..api import Report

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def render(report: Report, *, color: bool = False, quiet: bool = False, statistics: bool = False, **_) -> str:
    """quiet: findings only, no summary (nothing at all when clean); statistics: a count per code
    instead of the findings; color: ANSI styles, never when NO_COLOR is set."""
    from rich.console import Console
    from rich.markup import escape

    color = color and "NO_COLOR" not in os.environ
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=color, no_color=not color, color_system="standard" if color else None,
                  width=int(os.environ.get("COLUMNS", 120)), highlight=False, soft_wrap=True)
    if statistics:
        for code, n in report.statistics().items():
            rule = report.rules.get(code)
            fix = " [*]" if any(f.fixable == "safe" for f in report.findings if f.code == code) else ""
            con.print(f"{n:>6}  {code}{fix}  {escape(rule.name) if rule else ''}".rstrip())
    else:
        for fname, group in groupby(report.findings, key=lambda f: f.file or ""):
            con.print(f"[bold]{escape(fname or report.path)}[/bold]")
            for f in group:
                where = f"{escape(f.tensor)}: " if f.tensor else ""
                fix = {"safe": " [dim]\\[fixable][/dim]", "unsafe": " [dim]\\[unsafe fix][/dim]"}.get(f.fixable, "")
                con.print(f"  [{_STYLE[f.severity]}]{f.code}[/] {f.severity:<7} {where}{escape(f.message)}{fix}")
    if not quiet:
        s = report.summary()
        if not report.findings:
            con.print(f"[green]✓[/green] {escape(report.path)}: no findings ({s['rules_run']} rules)")
        else:
            fixable = f", {s['fixable']} fixable with `fqcheck fix`" if s["fixable"] else ""
            con.print(f"{escape(report.path)}: {s['errors']} error(s), {s['warnings']} warning(s), "
                      f"{s['infos']} info{fixable} ({s['rules_run']} rules)")
    return buf.getvalue()

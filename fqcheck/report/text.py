"""Terminal output: findings grouped by file, then a one-line summary.

With colour (a terminal) it is drawn by rich. Without (a pipe, CI logs, --output-file) the same
lines are written directly: importing rich costs ~50 ms, a tenth of a large lint's budget.
"""
from __future__ import annotations

import io
import os
from itertools import groupby

from ..api import Report

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
# rich drops these control characters from printed text; the plain writer does the same.
_STRIP = dict.fromkeys((7, 8, 11, 12, 13))


def render(report: Report, *, color: bool | None = None, quiet: bool = False, statistics: bool = False) -> str:
    if color:
        return _render_rich(report, quiet, statistics)
    return _render_plain(report, quiet, statistics)


def _lines(report: Report, quiet: bool, statistics: bool, mark, esc):
    """The report as lines; `mark(style, text)` applies a style, `esc` escapes plain text."""
    if not quiet:
        for fname, group in groupby(report.findings, key=lambda f: f.file or ""):
            yield mark("bold", esc(fname or report.path))
            for f in group:
                where = f"{esc(f.tensor)}: " if f.tensor else ""
                fix = (" " + mark("dim", esc("[fixable]")) if f.fixable == "safe" else
                       " " + mark("dim", esc("[unsafe fix]")) if f.fixable == "unsafe" else "")
                yield f"  {mark(_STYLE[f.severity], f.code)} {f.severity:<7} {where}{esc(f.message)}{fix}"
    s = report.summary()
    if statistics and report.findings:
        counts: dict[str, int] = {}
        for f in report.findings:
            counts[f.code] = counts.get(f.code, 0) + 1
        for code, n in sorted(counts.items()):
            yield f"{n:>6}  {code}"
    if not report.findings:
        yield f"{mark('green', '✓')} {esc(report.path)}: no findings ({s['rules_run']} rules)"
    else:
        fixable = f", {s['fixable']} fixable with `fqcheck fix`" if s["fixable"] else ""
        yield (f"{esc(report.path)}: {s['errors']} error(s), {s['warnings']} warning(s), "
               f"{s['infos']} info{fixable} ({s['rules_run']} rules)")


def _render_plain(report: Report, quiet: bool, statistics: bool) -> str:
    lines = _lines(report, quiet, statistics, lambda style, text: text, lambda text: text)
    return "".join(line.translate(_STRIP) + "\n" for line in lines)


def _render_rich(report: Report, quiet: bool, statistics: bool) -> str:
    from rich.console import Console
    from rich.markup import escape

    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, no_color="NO_COLOR" in os.environ, width=int(os.environ.get("COLUMNS", 120)),
                  highlight=False, soft_wrap=True, emoji=False)
    for line in _lines(report, quiet, statistics, lambda style, text: f"[{style}]{text}[/]", escape):
        con.print(line)
    return buf.getvalue()

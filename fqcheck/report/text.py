"""Terminal output: findings grouped by file, then a one-line summary (ruff's layout).

rich draws it only with colour (a terminal without NO_COLOR); otherwise the same lines are
written directly, since importing rich costs ~50 ms of a large lint's one-second budget.
"""
from __future__ import annotations

import io
import os
from itertools import groupby
from typing import Callable, Iterator

from ..api import Report
from .escape import printable as _printable

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_FIX = {"safe": "[fixable]", "unsafe": "[unsafe fix]"}


def render(report: Report, *, color: bool = False, quiet: bool = False, statistics: bool = False, **_) -> str:
    """quiet: findings only, no summary (nothing at all when clean); statistics: a count per code
    instead of the findings; color: ANSI styles, never when NO_COLOR is set."""
    if color and "NO_COLOR" not in os.environ:
        return _render_rich(report, quiet, statistics)
    lines = _lines(report, quiet, statistics, lambda style, text: text, _printable)
    return "".join(line + "\n" for line in lines)


def _lines(report: Report, quiet: bool, statistics: bool, mark: Callable[[str, str], str],
           esc: Callable[[str], str]) -> Iterator[str]:
    """The report as lines; `mark(style, text)` styles text, `esc` escapes what came from the file."""
    if statistics:
        for code, n in report.statistics().items():
            rule = report.rules.get(code)
            fix = " [*]" if any(f.fixable == "safe" for f in report.findings if f.code == code) else ""
            yield f"{n:>6}  {code}{esc(fix)}  {rule.name if rule else ''}".rstrip()
    else:
        for fname, group in groupby(report.findings, key=lambda f: f.file or ""):
            yield mark("bold", esc(fname or report.path))
            for f in group:
                where = f"{esc(f.tensor)}: " if f.tensor else ""
                fix = " " + mark("dim", esc(_FIX[f.fixable])) if f.fixable in _FIX else ""
                yield f"  {mark(_STYLE[f.severity], f.code)} {f.severity:<7} {where}{esc(f.message)}{fix}"
    if quiet:
        return
    s = report.summary()
    if not report.findings:
        yield f"{mark('green', '✓')} {esc(report.path)}: no findings ({s['rules_run']} rules)"
    else:
        fixable = f", {s['fixable']} fixable with `fqcheck fix`" if s["fixable"] else ""
        yield (f"{esc(report.path)}: {s['errors']} error(s), {s['warnings']} warning(s), "
               f"{s['infos']} info{fixable} ({s['rules_run']} rules)")


def _render_rich(report: Report, quiet: bool, statistics: bool) -> str:
    from rich.console import Console
    from rich.markup import escape

    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=int(os.environ.get("COLUMNS", 120)),
                  highlight=False, soft_wrap=True, emoji=False)
    for line in _lines(report, quiet, statistics, lambda style, text: f"[{style}]{text}[/]",
                       lambda text: escape(_printable(text))):
        con.print(line)
    return buf.getvalue()

"""Terminal output: findings under their file, repeated ones grouped, then a one-line summary.

rich draws it only with colour (a terminal without NO_COLOR); otherwise the same lines are
written directly, since importing rich costs ~50 ms of a large lint's budget.
"""
from __future__ import annotations

import io
import os
from itertools import groupby
from typing import Callable, Iterator

from ..api import Report
from .escape import printable

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_FIX = {"safe": "[fixable]", "unsafe": "[unsafe fix]"}
GROUP_AT = 4   # this many findings of one rule in one file become one line
EXAMPLES = 3   # names shown on a grouped line


def render(report: Report, *, color: bool = False, quiet: bool = False, statistics: bool = False,
           verbose: bool = False, **_) -> str:
    """quiet: findings only, no summary (nothing at all when clean); statistics: a count per code
    instead of the findings; verbose: no grouping; color: ANSI styles, never when NO_COLOR is set."""
    if color and "NO_COLOR" not in os.environ:
        return _render_rich(report, quiet, statistics, verbose)
    lines = _lines(report, quiet, statistics, verbose, lambda style, text: text, printable)
    return "".join(line + "\n" for line in lines)


def finding_line(f, mark: Callable[[str, str], str] = lambda s, t: t, esc: Callable[[str], str] = printable) -> str:
    """One finding: code, severity, the tensor (unless the message names it), the message."""
    where = f"{esc(f.tensor)}: " if f.tensor and f.tensor not in f.message else ""
    fix = " " + mark("dim", esc(_FIX[f.fixable])) if f.fixable in _FIX else ""
    return f"{mark(_STYLE[f.severity], f.code)} {f.severity:<7} {where}{esc(f.message)}{fix}"


def grouped(findings, verbose: bool = False):
    """Runs of one rule and severity in one file, as lists: split into singles unless a run
    reaches GROUP_AT (or verbose is set)."""
    for _, run in groupby(findings, key=lambda f: (f.file, f.code, f.severity)):
        run = list(run)
        if verbose or len(run) < GROUP_AT:
            yield from ([f] for f in run)
        else:
            yield run


def group_line(run, rule, mark: Callable[[str, str], str] = lambda s, t: t, esc: Callable[[str], str] = printable) -> str:
    """One line for a run of findings of one rule: how many, what, a few examples."""
    f = run[0]
    names = [x.tensor or x.message for x in run]
    more = f" (+{len(names) - EXAMPLES} more; --verbose lists all)" if len(names) > EXAMPLES else ""
    fix = " " + mark("dim", esc(_FIX[f.fixable])) if all(x.fixable == f.fixable for x in run) and f.fixable in _FIX else ""
    what = rule.summary if rule is not None else f.message
    return (f"{mark(_STYLE[f.severity], f.code)} {f.severity:<7} {len(run)}× {esc(what)}: "
            f"{esc(', '.join(names[:EXAMPLES]))}{more}{fix}")


def _lines(report: Report, quiet: bool, statistics: bool, verbose: bool, mark: Callable[[str, str], str],
           esc: Callable[[str], str]) -> Iterator[str]:
    """The report as lines; `mark(style, text)` styles text, `esc` escapes what came from the file."""
    if statistics:
        for code, n in report.statistics().items():
            rule = report.rules.get(code)
            fix = " [*]" if any(f.fixable == "safe" for f in report.findings if f.code == code) else ""
            yield f"{n:>6}  {code}{fix}  {rule.name if rule else ''}".rstrip()
    else:
        for fname, group in groupby(report.findings, key=lambda f: f.file or ""):
            yield mark("bold", esc(fname or report.path))
            for run in grouped(group, verbose):
                if len(run) == 1:
                    yield "  " + finding_line(run[0], mark, esc)
                else:
                    yield "  " + group_line(run, report.rules.get(run[0].code), mark, esc)
    if quiet:
        return
    s = report.summary()
    if not report.findings:
        yield f"{mark('green', '✓')} {esc(report.path)}: no findings ({s['rules_run']} rules)"
    else:
        fixable = f", {s['fixable']} fixable with `fqcheck fix`" if s["fixable"] else ""
        yield (f"{esc(report.path)}: {s['errors']} error(s), {s['warnings']} warning(s), "
               f"{s['infos']} info{fixable} ({s['rules_run']} rules)")


def _render_rich(report: Report, quiet: bool, statistics: bool, verbose: bool) -> str:
    from rich.console import Console
    from rich.markup import escape

    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=int(os.environ.get("COLUMNS", 120)),
                  highlight=False, soft_wrap=True, emoji=False)
    for line in _lines(report, quiet, statistics, verbose, lambda style, text: f"[{style}]{text}[/]",
                       lambda text: escape(printable(text))):
        con.print(line)
    return buf.getvalue()

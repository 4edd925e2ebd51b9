"""GitHub Actions workflow commands: one `::error file=...,title=CODE name::message` line per
finding, which the runner turns into annotations on the run and the pull request (the code once, in
the title; the message says what is wrong)."""
from __future__ import annotations

from ..api import Report
from .escape import printable
from .paths import locator

COMMAND = {"error": "error", "warning": "warning", "info": "notice"}


def escape_data(s: str) -> str:
    """Escape a command's message as @actions/core does, after making it one printable line: no
    name can end the command and start another (`::error ...` injection) or hide in bidi text."""
    return printable(s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"))


def escape_property(s: str) -> str:
    """Escape a property value (file=, title=): also ':' and ','."""
    return escape_data(s).replace(":", "%3A").replace(",", "%2C")


def render(report: Report, **_) -> str:
    lines, locate = [], locator(report)
    for f in report.findings:
        where = f"{f.tensor}: " if f.tensor and f.tensor not in f.message else ""
        rule = report.rules.get(f.code)
        title = f"{f.code} {rule.name}" if rule is not None else f.code
        props = f"file={escape_property(locate(f))},title={escape_property(title)}"
        lines.append(f"::{COMMAND[f.severity]} {props}::{escape_data(where + f.message)}")
    return "".join(line + "\n" for line in lines)

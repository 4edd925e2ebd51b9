"""Formatters: each turns a Report into text for one audience (terminal, machines, CI systems).

Every formatter is `render(report, **options) -> str`; options a formatter does not use are
ignored (text: color, quiet, statistics; junit: fail_on)."""
from __future__ import annotations

import importlib
from typing import Callable

from ..api import Report


def _lazy(module: str) -> Callable[..., str]:
    def render(report: Report, **kw) -> str:
        return importlib.import_module(f"{__name__}.{module}").render(report, **kw)
    return render


def _json(report: Report, **kw) -> str:
    return report.to_json() + "\n"


FORMATS: dict[str, Callable[..., str]] = {
    "text": _lazy("text"),
    "json": _json,
    "sarif": _lazy("sarif"),
    "github": _lazy("github"),
    "junit": _lazy("junit"),
}


def render(report: Report, fmt: str, **kw) -> str:
    return FORMATS[fmt](report, **kw)

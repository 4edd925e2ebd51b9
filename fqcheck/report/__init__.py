"""Formatters: each turns a Report into text for one audience (terminal, machines, CI systems)."""
from __future__ import annotations

from typing import Callable

from ..api import Report


def _text(report: Report, **kw) -> str:
    from .text import render
    return render(report, **kw)


def _json(report: Report, **kw) -> str:
    return report.to_json() + "\n"


FORMATS: dict[str, Callable[..., str]] = {"text": _text, "json": _json}


def render(report: Report, fmt: str, **kw) -> str:
    return FORMATS[fmt](report, **kw)

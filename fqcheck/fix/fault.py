"""Fault injection for crash tests: FQCHECK_FAULT=<point>[:<n>] makes the process SIGKILL itself the
n-th time (default 1st) it reaches <point>. Points: after-temp-write, after-fsync, after-journal,
after-rename, before-journal-commit, after-journal-commit. Unset, this costs one dict lookup."""
from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def fault(point: str) -> None:
    spec = os.environ.get("FQCHECK_FAULT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == (int(n) if n else 1):
        os.kill(os.getpid(), signal.SIGKILL)

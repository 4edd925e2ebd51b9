"""Fault injection for crash tests: FQCHECK_FAULT=<point>[:<n>[:enospc]] makes the process SIGKILL
itself the n-th time (default 1st) it reaches <point> (`any`: the n-th point of any name), or with
`enospc` raise OSError(ENOSPC) there instead, as a full disk would. Points: after-temp-write,
after-fsync, after-journal, after-rename, before-journal-commit, after-journal-commit.
Unset, this costs one dict lookup."""
from __future__ import annotations

import errno
import os
import signal

_counts: dict[str, int] = {}


def fault(point: str) -> None:
    spec = os.environ.get("FQCHECK_FAULT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name not in (point, "any"):
        return
    n, _, action = rest.partition(":")
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] == (int(n) if n else 1):
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), signal.SIGKILL)

"""A byte progress bar on stderr for the long passes (deep scan, fix): shown only to a person at a
terminal, only when there is enough to do, never under --quiet. rich is imported only then."""
from __future__ import annotations

import os
import sys

MIN_BYTES = 1 << 30  # below this a pass takes about a second: a bar would only flicker


class Bar:
    def __init__(self, label: str, total: int, files: int = 0):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._label, self._files, self._done = label, files, 0
        self._p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                           TransferSpeedColumn(), TimeRemainingColumn(),
                           console=Console(stderr=True, no_color="NO_COLOR" in os.environ), transient=True)
        self._task = self._p.add_task(self._describe(), total=total)
        self._p.start()

    def _describe(self) -> str:
        return f"{self._label} {self._done}/{self._files} files" if self._files else self._label

    def advance(self, nbytes: int) -> None:
        self._p.advance(self._task, nbytes)

    def file_done(self) -> None:
        self._done += 1
        self._p.update(self._task, description=self._describe())

    def stop(self) -> None:
        self._p.stop()


def bar(label: str, total: int, enabled: bool | None = None, files: int = 0) -> Bar | None:
    """A Bar, or None when none should show. enabled: False (--quiet), True (forced), None (auto:
    a terminal on stderr and at least MIN_BYTES to go)."""
    if enabled is None:
        enabled = total >= MIN_BYTES and sys.stderr.isatty()
    return Bar(label, total, files) if enabled and total else None

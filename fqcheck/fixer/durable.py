"""Durable, link-proof file operations in a checkpoint folder: every write goes to a fresh temp
file (O_EXCL, unpredictable name, never through a link), is fsynced and renamed into place."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

TMP_PREFIX = ".fqcheck-tmp."
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
MAX_STATE_BYTES = 16 << 20  # a journal, lock or manifest larger than this is not fqcheck's


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data, off: int | None = None) -> None:
    """Write every byte of `data` (os.write may write less than asked); at `off` with pwrite."""
    mv = memoryview(data).cast("B")
    while mv:
        k = os.write(fd, mv) if off is None else os.pwrite(fd, mv, off)
        mv = mv[k:]
        if off is not None:
            off += k


def write_or_close(fd: int, data) -> None:
    """write_all, closing fd when it fails (on success the caller hands fd on to be synced)."""
    try:
        write_all(fd, data)
    except BaseException:
        os.close(fd)
        raise


def create_new(path: Path, mode: int = 0o644) -> int:
    """Open a file that did not exist (O_EXCL: a planted file or link there is an error)."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)


def temp_name(stem: str) -> str:
    return f"{stem}.{secrets.token_hex(8)}"


def write_durable(path: Path, data: bytes) -> None:
    """Replace `path` by a file holding `data`, atomically (temp + fsync + rename + fsync dir).
    On an error the temp file is removed and `path` is as it was."""
    tmp = path.with_name(temp_name(f"{path.name}.tmp"))
    fd = create_new(tmp)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def read_small(path: Path, limit: int = MAX_STATE_BYTES) -> bytes:
    """Read a state file of fqcheck's own, refusing a link or anything but a small regular file."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000 == 0o100000):
            raise OSError(0, "not a regular file", str(path))
        if st.st_size > limit:
            raise OSError(0, f"larger than {limit >> 20} MiB", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)


def move(src: Path, dst: Path) -> None:
    """Rename src to dst (replacing dst). A symlink is re-created so that it still points at the same
    target from its new folder (relative links would dangle otherwise); its target is never touched.
    The re-created link's temp name is fixed per destination, so a recovery knows it as fqcheck's."""
    if src.is_symlink():
        target = os.path.normpath(os.path.join(src.parent, os.readlink(src)))
        tmp = link_temp(dst)
        if os.path.islink(tmp):
            os.unlink(tmp)  # left by a run killed between the symlink and the rename below
        os.symlink(os.path.relpath(target, dst.parent), tmp)
        os.rename(tmp, dst)
        os.unlink(src)
    else:
        os.rename(src, dst)


def link_temp(dst: Path) -> Path:
    return dst.with_name(f"{TMP_PREFIX}link.{dst.name}")


class Syncs:
    """fsync + close of written files on one background thread, so that the disk writes one file
    while the next is written; wait() before anything relies on them (it raises the first error).
    `after`: called after each file's fsync and close (the crash tests' fault point)."""

    def __init__(self, after=None):
        self._after = after
        self._pool = None
        self._pending: list = []

    def finish(self, fd: int) -> None:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fqcheck-fsync")
        self._pending.append(self._pool.submit(self._sync_close, fd))

    def _sync_close(self, fd: int) -> None:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._after is not None:
            self._after()

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        error = None
        for f in pending:
            try:
                f.result()
            except OSError as e:
                error = error or e
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if error is not None:
            raise error

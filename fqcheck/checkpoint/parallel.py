"""Read many shard headers on two CPU cores.

A large checkpoint's headers are mostly JSON to parse and validate (90k entries on DeepSeek-R1),
which CPython does on one core. Here a forked child takes shards from the back of the list while
this process does other work (imports, parsing the index, which no header needs) and then takes
shards from the front; they meet wherever their speeds put them, so no cost model is needed.

Each shard is claimed in a shared byte array before it is read. Both sides may claim the one shard
they meet at (the claim is not atomic): then it is read twice, never missed. The child sends each
shard it read as a length-prefixed marshal frame of the header's columns (the names and a few dtype
and shape kinds: little to rebuild here), which this process takes in between its own shards;
whatever the child does not deliver (a damaged header, or it crashed, was killed, got stuck) this
process reads itself, so the outcome never depends on the child.
"""
from __future__ import annotations

import gc
import marshal
import mmap
import os
import select
import signal
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from .safetensors import SafetensorsHeader, columns, from_columns, read_header

MIN_SHARDS = 8  # below this, headers are small and a fork saves nothing
_FORK = ContextVar("fqcheck_fork", default=False)  # set only by the command line (never by the API)


@contextmanager
def forking():
    """Inside this block a lint may read shard headers in a forked child: the `fqcheck` command
    opens it around its run; fqcheck.lint() and fqcheck.fix() never do, so the API never forks."""
    token = _FORK.set(True)
    try:
        yield
    finally:
        _FORK.reset(token)


def fork_allowed() -> bool:
    return _FORK.get()


def can_fork() -> bool:
    """Forking is safe only where it is the platform's own model (Linux) and this process runs one
    thread: no other thread, Python's or native (an OpenMP pool, a library's I/O thread), could
    hold a lock the child needs."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork") and threading.active_count() == 1
            and native_threads() == 1)


def native_threads() -> int:
    """Threads of this process as the kernel counts them (Python's and every library's)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0  # cannot tell: do not fork


class HeaderPrefetch:
    """Shard headers being read by a forked child from now on; finish() returns them all. Only
    one process reads when there are few shards or forking is not safe."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._pid = None
        if len(paths) < MIN_SHARDS or not can_fork():
            return
        try:
            self._claims = mmap.mmap(-1, len(paths))  # anonymous: shared with the child after fork
            rfd, wfd = os.pipe()
        except OSError:
            return  # out of memory maps or descriptors: one process reads
        _widen(wfd)
        try:
            pid = os.fork()
        except OSError:  # e.g. a process limit: one process reads
            os.close(rfd)
            os.close(wfd)
            return
        if pid == 0:  # the child: never returns, never runs the parent's cleanup or flushes its buffers
            code = 1
            try:
                os.close(rfd)
                _detach_stdio()
                os.closerange(3, wfd)  # the child holds only the pipe it writes and what it opens
                os.closerange(wfd + 1, 1 << 16)
                _child(paths, self._claims, wfd)
                code = 0
            finally:
                os._exit(code)
        os.close(wfd)
        os.set_blocking(rfd, False)  # taken in between our own shards: never wait for it there
        self._pid, self._rfd, self._start = pid, rfd, time.monotonic()
        self._inbox = _Inbox(rfd)
        self._child = [pid]  # emptied once reaped: a reaped pid may belong to another process
        # finish() runs it; so does dropping this unfinished (an error on the way): no child left
        self._cleanup = weakref.finalize(self, _abandon, rfd, self._child)

    def finish(self) -> list[SafetensorsHeader]:
        if self._pid is None:
            return [read_header(p) for p in self.paths]
        got: dict[int, SafetensorsHeader] = {}
        inbox = self._inbox
        try:
            for i in range(len(self.paths)):
                if self._claims[i]:
                    break  # the child has it, and everything after it
                self._claims[i] = 1
                got[i] = read_header(self.paths[i])
                self._take(inbox.read(), got)
            # The child normally finishes with us; a stuck one is given up on after many times
            # the time so far, and its shards are read here.
            deadline = time.monotonic() + 2.0 + 10 * (time.monotonic() - self._start)
            while not inbox.closed and select.select([self._rfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                self._take(inbox.read(), got)
            if inbox.closed:
                _reap(self._child.pop(), kill=False)
        finally:
            self._cleanup()  # closes the pipe; kills and reaps the child if it is still there
        return [got[i] if i in got else read_header(p) for i, p in enumerate(self.paths)]

    def _take(self, frames: list[bytes], got: dict) -> None:
        for frame in frames:
            try:
                i, packed = marshal.loads(frame)
            except (EOFError, ValueError, TypeError):
                continue  # cannot happen with our own child; its shard is then read here
            got.setdefault(i, _unpack(self.paths[i], packed))


def _detach_stdio() -> None:
    """The child never prints: let go of the terminal or pipes it inherited, so that whoever
    reads this process's output sees it end when this process does."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _abandon(rfd: int, child: list[int]) -> None:
    os.close(rfd)
    if child:
        _reap(child.pop(), kill=True)


def _child(paths: list[Path], claims: mmap.mmap, wfd: int) -> None:
    gc.disable()  # nothing here makes cycles
    for i in range(len(paths) - 1, -1, -1):
        if claims[i]:
            break
        claims[i] = 1
        packed = _pack(read_header(paths[i]))
        if packed is None:
            continue  # the parent reads it
        blob = marshal.dumps((i, packed))
        view = memoryview(len(blob).to_bytes(8, "little") + blob)
        while view:
            view = view[os.write(wfd, view):]
    os.close(wfd)


class _Inbox:
    """The child's frames as they arrive on a non-blocking pipe: whole frames only, so a child
    that dies mid-write leaves nothing half-read behind."""

    def __init__(self, rfd: int):
        self._rfd, self._buf, self.closed = rfd, bytearray(), False

    def read(self) -> list[bytes]:
        while True:
            try:
                chunk = os.read(self._rfd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                self.closed = True
                break
            self._buf += chunk
        frames, buf, pos = [], self._buf, 0
        while len(buf) - pos >= 8:
            end = pos + 8 + int.from_bytes(buf[pos:pos + 8], "little")
            if end > len(buf):
                break
            frames.append(bytes(buf[pos + 8:end]))
            pos = end
        del buf[:pos]
        return frames


def _widen(fd: int) -> None:
    """A bigger pipe buffer: the child's few MB cross in a few writes, not a hundred 64 KiB ones."""
    try:
        import fcntl
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # the unprivileged maximum by default
    except (ImportError, AttributeError, OSError):
        pass


def _reap(pid: int, kill: bool) -> int:
    """Wait for the child (killing it first if asked); its exit status, -1 when unknown."""
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    except ChildProcessError:
        return -1


# What crosses the pipe: a header the fast path read, as plain columns (marshal takes no classes;
# one object per distinct dtype and shape, which marshal sends once). columns() is None for any
# other header: a damaged header is rare, and this process reads it again rather than ship it.
_pack, _unpack = columns, from_columns

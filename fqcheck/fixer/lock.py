"""The fix lock: an O_EXCL file in .fqcheck/ holding pid, host and process start time; a lock
whose process is gone is stale and taken over."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..checkpoint import BACKUP_DIR
from .durable import create_new, read_small, write_all
from .errors import FixError
from .journal import LOCK, state_dir


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # another machine's process: we cannot tell, assume it runs
    pid = info.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    st = _start_time(pid)
    return st is None or info.get("start") in (None, st)  # a recycled pid has another start time


def _mtime(p: Path) -> float:
    try:
        return os.lstat(p).st_mtime
    except OSError:
        return 0.0


def _rmdir(p: Path) -> None:
    try:
        os.rmdir(p)
    except OSError:
        pass  # not empty: a backup or journal lives there


class Lock:
    def __init__(self, root: Path):
        self.root = root
        self.path = root / BACKUP_DIR / LOCK
        self.held = False

    def holder(self) -> dict | None:
        """The lock's content; {} when it is unreadable or not fqcheck's (then judged by its age)."""
        try:
            info = json.loads(read_small(self.path, 1 << 16))
            return info if isinstance(info, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError):
            return {}

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as e:
            raise FixError(f"{self.root}: cannot take the fix lock: {e.strerror or e}") from e

    def _acquire(self) -> None:
        state_dir(self.root, create=True)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
                         "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        for _ in range(3):
            try:
                fd = create_new(self.path)
            except FileExistsError:
                info = self.holder()
                if info is None:
                    continue
                if info and _alive(info):
                    raise FixError(f"{self.root}: another fqcheck fix is running "
                                   f"(pid {info.get('pid')} since {info.get('since')}; lock {self.path})")
                if info == {} and time.time() - _mtime(self.path) < 5:
                    time.sleep(0.2)  # being written right now
                    continue
                os.unlink(self.path)  # stale: its process is gone (unlink never follows a link)
                continue
            try:
                write_all(fd, me)
                os.fsync(fd)
            except OSError:
                os.unlink(self.path)  # e.g. a full disk: an empty lock must not block the next run
                _rmdir(self.path.parent)
                raise
            finally:
                os.close(fd)
            self.held = True
            return
        raise FixError(f"{self.root}: cannot take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False
            _rmdir(self.path.parent)  # leave no trace on a checkpoint that needed nothing

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

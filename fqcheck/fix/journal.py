"""Crash-safe multi-file change of a checkpoint directory.

Protocol: take the lock; write every new file to a temp file in the same directory and fsync it;
write the journal (the list of renames) and fsync it; then, per file, move the original into the
stash folder (the backup, or a scratch folder with --no-backup) and rename the new file into place;
fsync the directory; mark the journal done; drop the scratch folder. A run that finds an unfinished
journal rolls it forward when every new file is still there, else back, so the directory ends
all-old or all-new. Renames never follow links: a symlinked file (Hugging Face cache snapshot) is
replaced by a regular file and the blob it pointed to is left alone.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from ..checkpoint import BACKUP_DIR
from .fault import fault

JOURNAL = "journal.json"
LOCK = "lock"
MANIFEST = "manifest.json"
TMP_PREFIX = ".fqcheck-tmp."


class FixError(Exception):
    """A fix could not be carried out; the directory was left (or put back) as it was."""


# ---------- small durable-file helpers ----------

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp + fsync + rename + fsync dir)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def move(src: Path, dst: Path) -> None:
    """Rename src to dst (replacing dst). A symlink is re-created so that it still points at the same
    target from its new folder (relative links would dangle otherwise); its target is never touched."""
    if src.is_symlink():
        target = os.path.normpath(os.path.join(src.parent, os.readlink(src)))
        tmp = dst.with_name(f"{TMP_PREFIX}link.{dst.name}.{os.getpid()}")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(os.path.relpath(target, dst.parent), tmp)
        os.rename(tmp, dst)
        os.unlink(src)
    else:
        os.rename(src, dst)


# ---------- the lock ----------

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
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    st = _start_time(pid)
    return st is None or info.get("start") in (None, st)  # a recycled pid has another start time


class Lock:
    """O_EXCL lock file in .fqcheck/ holding pid, host and process start time; a lock whose process
    is gone is stale and taken over."""

    def __init__(self, root: Path):
        self.dir = root / BACKUP_DIR
        self.path = self.dir / LOCK
        self.held = False

    def holder(self) -> dict | None:
        try:
            info = json.loads(self.path.read_text())
            return info if isinstance(info, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        try:
            self._acquire()
        except OSError as e:
            raise FixError(f"{self.dir.parent}: cannot take the fix lock: {e.strerror or e}") from e

    def _acquire(self) -> None:
        self.dir.mkdir(exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = self.holder()
                if info is None:
                    continue
                if info and _alive(info):
                    raise FixError(f"{self.dir.parent}: another fqcheck fix is running "
                                   f"(pid {info.get('pid')} since {info.get('since')}; lock {self.path})")
                if info == {} and time.time() - _mtime(self.path) < 5:
                    time.sleep(0.2)  # being written right now
                    continue
                os.unlink(self.path)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise FixError(f"{self.dir.parent}: cannot take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False
            try:
                self.dir.rmdir()  # leave no trace on a checkpoint that needed nothing
            except OSError:
                pass

    def __enter__(self) -> "Lock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


# ---------- the transaction ----------

def _stamp(root: Path, parent: str) -> str:
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, i = base, 1
    while (root / BACKUP_DIR / parent / name).exists():
        i += 1
        name = f"{base}-{i}"
    return f"{BACKUP_DIR}/{parent}/{name}"


class Transaction:
    """Collects new files (temp files in the checkpoint dir) and retirements, then commits them all
    or none. Paths in the journal are relative to the checkpoint dir."""

    def __init__(self, root: Path, keep: bool = True, label: str = "fix"):
        self.root = root
        self.keep = keep
        self.stash = _stamp(root, "backup" if keep else "tx")
        self.ops: list[dict] = []
        self.cleanup: list[str] = []  # paths removed once committed (restore drops the used backup)
        self.label = label
        self.temps: list[Path] = []
        self._syncs: list = []  # pending fsyncs: they overlap the writing of the next file
        self._pool = None

    def new_file(self, name: str) -> tuple[int, str]:
        """Open a fresh temp file that will replace (or create) `name`; returns (fd, temp name)."""
        tmp = f"{TMP_PREFIX}{name}.{os.getpid()}"
        p = self.root / tmp
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.temps.append(p)
        self.ops.append({"name": name, "incoming": tmp, "existed": os.path.lexists(self.root / name)})
        return fd, tmp

    def finish_file(self, fd: int) -> None:
        """Hand a written temp file to the background fsync (done before the journal is written)."""
        fault("after-temp-write")
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fqcheck-fsync")
        self._syncs.append(self._pool.submit(_fsync_close, fd))

    def _wait_syncs(self) -> None:
        syncs, self._syncs = self._syncs, []
        error = None
        for f in syncs:
            try:
                f.result()
            except OSError as e:
                error = error or e
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if error is not None:
            raise error

    def write_file(self, name: str, data: bytes) -> None:
        fd, _ = self.new_file(name)
        try:
            mv = memoryview(data)
            while mv:
                mv = mv[os.write(fd, mv):]
        except BaseException:
            os.close(fd)
            raise
        self.finish_file(fd)

    def bring(self, name: str, incoming: str) -> None:
        """Put an existing file (e.g. from a backup) in place of `name`."""
        self.ops.append({"name": name, "incoming": incoming, "existed": os.path.lexists(self.root / name)})

    def retire(self, name: str) -> None:
        self.ops.append({"name": name, "incoming": None, "existed": True})

    def journal(self, state: str) -> dict:
        return {"version": 1, "label": self.label, "state": state, "stash": self.stash, "keep": self.keep,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "ops": self.ops, "cleanup": self.cleanup}

    def commit(self) -> None:
        """Write the journal, apply it, mark it done. On an error before the journal is durable,
        everything is removed; after it, the journal is rolled back in-process (or by the next run)."""
        stash = self.root / self.stash
        j = self.journal("prepared")
        try:
            self._wait_syncs()  # every new file is durable before the journal names it
            stash.mkdir(parents=True)
            fsync_dir(self.root)
            write_durable(self.root / BACKUP_DIR / JOURNAL, json.dumps(j).encode())
        except OSError as e:  # the journal is not durable: nothing has been renamed yet
            self.abort()
            _drop_journal(self.root)
            raise FixError(f"{self.root}: {e.strerror or e} while preparing; rolled back, nothing changed") from e
        fault("after-journal")
        try:
            forward(self.root, j)
        except BaseException as e:
            try:
                rollback(self.root, j)
            except OSError:
                pass  # the journal stays; the next run finishes the roll-back
            if isinstance(e, OSError):
                raise FixError(f"{self.root}: {e.strerror or e} while committing; rolled back, nothing changed") from e
            raise
        mark_done(self.root, j)

    def abort(self) -> None:
        """Before commit: remove the temp files and the stash; the directory is untouched."""
        try:
            self._wait_syncs()
        except OSError:
            pass
        for p in self.temps:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.root / self.stash, ignore_errors=True)
        _prune(self.root)
        for p in (self.root / BACKUP_DIR).glob(f"*.tmp{os.getpid()}"):
            p.unlink()


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fault("after-fsync")


def _forward_op(root: Path, stash: Path, op: dict) -> None:
    name, inc = root / op["name"], op["incoming"]
    saved = stash / op["name"]
    if inc is not None and not os.path.lexists(root / inc):
        return  # already in place
    if op["existed"] and os.path.lexists(name):
        if not os.path.lexists(saved):
            move(name, saved)
        elif inc is None:
            os.unlink(name)  # a link whose move into the stash was cut short
    if inc is not None:
        move(root / inc, name)
    fault("after-rename")


def _backward_op(root: Path, stash: Path, op: dict) -> None:
    name, inc = root / op["name"], op["incoming"]
    saved = stash / op["name"]
    if inc is not None:
        if not os.path.lexists(root / inc) and os.path.lexists(name):
            move(name, root / inc)  # take the new file back out
        elif os.path.lexists(root / inc) and os.path.lexists(name) and os.path.lexists(saved):
            os.unlink(name)  # a half-moved link copy; the original is in the stash
        elif os.path.lexists(root / inc) and os.path.lexists(name) and not op["existed"]:
            os.unlink(name)
    if op["existed"] and os.path.lexists(saved):
        move(saved, name)


def forward(root: Path, j: dict) -> None:
    """Apply every op (idempotent: ops already done are skipped) and make the renames durable."""
    stash = root / j["stash"]
    stash.mkdir(parents=True, exist_ok=True)
    for op in j["ops"]:
        _forward_op(root, stash, op)
    if j.get("keep"):  # the backup is restorable only once complete: its manifest comes last
        manifest = {"label": j.get("label"), "created": j.get("created"),
                    "originals": [o["name"] for o in j["ops"] if o["existed"]],
                    "created_files": [o["name"] for o in j["ops"] if not o["existed"]]}
        write_durable(stash / MANIFEST, json.dumps(manifest, indent=2).encode())
    fsync_dir(root)
    fsync_dir(stash)


def mark_done(root: Path, j: dict) -> None:
    fault("before-journal-commit")
    write_durable(root / BACKUP_DIR / JOURNAL, json.dumps({**j, "state": "done"}).encode())
    fault("after-journal-commit")
    _finish(root, {**j, "state": "done"})


def rollback(root: Path, j: dict) -> None:
    stash = root / j["stash"]
    for op in reversed(j["ops"]):
        _backward_op(root, stash, op)
    fsync_dir(root)
    for op in j["ops"]:  # temp files that never made it
        inc = op["incoming"]
        if inc is not None and inc.startswith(TMP_PREFIX) and os.path.lexists(root / inc):
            os.unlink(root / inc)
    shutil.rmtree(stash, ignore_errors=True)
    _drop_journal(root)
    _prune(root)


def _finish(root: Path, j: dict) -> None:
    if not j.get("keep"):
        shutil.rmtree(root / j["stash"], ignore_errors=True)
    for rel in j.get("cleanup", []):
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.unlink(p)
    _drop_journal(root)
    _prune(root)


def _prune(root: Path) -> None:
    for sub in ("tx", "backup"):  # empty folders left by the stash or a consumed backup
        try:
            (root / BACKUP_DIR / sub).rmdir()
        except OSError:
            pass


def _drop_journal(root: Path) -> None:
    try:
        os.unlink(root / BACKUP_DIR / JOURNAL)
    except FileNotFoundError:
        pass


def _sweep_temps(root: Path) -> list[str]:
    gone = []
    with os.scandir(root) as it:
        for e in it:
            if e.name.startswith(TMP_PREFIX):
                os.unlink(e.path)
                gone.append(e.name)
    return gone


def recover(root: Path, prefer: str = "auto") -> str | None:
    """Finish or undo an interrupted fix (caller holds the lock). prefer: auto (forward when every
    new file is present), back. Returns a one-line description of what it did, or None."""
    jp = root / BACKUP_DIR / JOURNAL
    what = None
    if jp.exists():
        try:
            j = json.loads(jp.read_text())
            ops, state = j["ops"], j["state"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FixError(f"{jp}: unreadable journal ({e}); inspect {root / BACKUP_DIR} by hand") from e
        if state == "done":
            _finish(root, j)
            what = "finished cleaning up a completed fix"
        else:
            # forward is possible when every new file is either still waiting or already in place
            complete = all(o["incoming"] is None or os.path.lexists(root / o["incoming"])
                           or os.path.lexists(root / o["name"]) for o in ops)
            if prefer == "auto" and complete:
                forward(root, j)
                mark_done(root, j)
                what = f"completed an interrupted {j.get('label', 'fix')} (rolled forward)"
            else:
                rollback(root, j)
                what = f"undid an interrupted {j.get('label', 'fix')} (rolled back)"
    swept = _sweep_temps(root)
    if swept and what is None:
        what = f"removed {len(swept)} temp file(s) of an interrupted fix (nothing had been changed)"
    tx = root / BACKUP_DIR / "tx"
    if tx.is_dir():
        shutil.rmtree(tx, ignore_errors=True)
    _drop_unfinished_backups(root)
    _prune(root)
    return what


def _drop_unfinished_backups(root: Path) -> None:
    """A backup folder without its manifest belongs to a fix killed before its journal existed."""
    b = root / BACKUP_DIR / "backup"
    if b.is_dir():
        for d in b.iterdir():
            if d.is_dir() and not (d / MANIFEST).exists() and not any(d.iterdir()):
                d.rmdir()


def needs_recovery(root: Path) -> bool:
    d = root / BACKUP_DIR
    return (d / JOURNAL).exists() or (d / LOCK).exists()


def recover_if_needed(root: Path) -> str | None:
    """Called by lint: cheap when nothing is pending; skips when a live fix holds the lock."""
    root = Path(root)
    if not needs_recovery(root):
        return None
    lock = Lock(root)
    try:
        lock.acquire()
    except FixError as e:  # a live fix holds it, or the directory is read-only
        return f"did not check for an interrupted fix: {e}"
    try:
        return recover(root)
    finally:
        lock.release()


# ---------- restore ----------

def latest_backup(root: Path) -> Path | None:
    b = root / BACKUP_DIR / "backup"
    if not b.is_dir():
        return None
    done = sorted(d for d in b.iterdir() if (d / MANIFEST).is_file())
    return done[-1] if done else None


def restore(root: Path) -> tuple[str, list[str]]:
    """Put the last backup back (itself as one transaction); returns (backup folder, files restored)."""
    root = Path(root)
    with Lock(root):
        recover(root)
        b = latest_backup(root)
        if b is None:
            raise FixError(f"{root}: no backup to restore in {root / BACKUP_DIR / 'backup'}")
        try:
            m = json.loads((b / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise FixError(f"{b / MANIFEST}: unreadable ({e})") from e
        tx = Transaction(root, keep=False, label="restore")
        rel = os.path.relpath(b, root)
        names = []
        for name in m.get("originals", []):
            if os.path.lexists(b / name):
                tx.bring(name, f"{rel}/{name}")
                names.append(name)
        for name in m.get("created_files", []):
            if os.path.lexists(root / name):
                tx.retire(name)
                names.append(name)
        tx.cleanup.append(rel)
        tx.commit()
        return str(b), names

"""Crash-safe multi-file change of a checkpoint directory.

Protocol: take the lock (lock.py); before each new temp file is created, the journal (state
"writing") names it, so that a recovery removes exactly the files fqcheck created; write and fsync
the temp files; write the journal "prepared" (the list of renames) and fsync it; then, per file,
move the original into the stash folder (the backup, or a scratch folder with --no-backup) and
rename the new file into place; fsync the directory; mark the journal done; drop the scratch
folder. recovery.py finishes or undoes what a killed run left. Renames never follow links: a
symlinked file (Hugging Face cache snapshot) is replaced by a regular file and the blob it pointed
to is left alone.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

from ..checkpoint import BACKUP_DIR
from .durable import (TMP_PREFIX, Syncs, create_new, fsync_dir, link_temp, move, temp_name, write_durable,
                      write_or_close)
from .fault import fault
from .errors import FixError, StateError
from .journal import MANIFEST, drop_journal, real_subdir, write_journal


def _stamp(root: Path, parent: str) -> str:
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name, i = base, 1
    while os.path.lexists(root / BACKUP_DIR / parent / name):
        i += 1
        name = f"{base}-{i}"
    return f"{BACKUP_DIR}/{parent}/{name}"


def make_dirs(root: Path, rel: str) -> Path:
    """Create root/rel level by level, each a real directory: a planted link is refused."""
    p = root
    for part in rel.split("/"):
        p = p / part
        try:
            os.mkdir(p)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(p).st_mode):
            raise StateError(f"{p}: not a directory (a link?); fqcheck writes nothing through it")
    return p


def _in_root(root: Path, rel: str) -> Path:
    """root/rel for a journal path already validated; a multi-level one must run through real dirs."""
    head = rel.rpartition("/")[0]
    if head and real_subdir(root, *head.split("/")) is None:
        raise StateError(f"{root / head}: not a directory (a link?); fqcheck reads nothing through it")
    return root / rel


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
        self.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._syncs = Syncs(after=lambda: fault("after-fsync"))  # they overlap the writing of the next file

    def new_file(self, name: str) -> tuple[int, str]:
        """Open a fresh temp file that will replace (or create) `name`; returns (fd, temp name)."""
        tmp = temp_name(f"{TMP_PREFIX}{name}")
        self.ops.append({"name": name, "incoming": tmp, "existed": os.path.lexists(self.root / name)})
        write_journal(self.root, self.journal("writing"))  # named before it exists: recovery removes it
        fd = create_new(self.root / tmp)
        self.temps.append(self.root / tmp)
        return fd, tmp

    def finish_file(self, fd: int) -> None:
        """Hand a written temp file to the background fsync (done before the journal is written)."""
        fault("after-temp-write")
        self._syncs.finish(fd)

    def write_file(self, name: str, data: bytes) -> None:
        fd, _ = self.new_file(name)
        write_or_close(fd, data)
        self.finish_file(fd)

    def bring(self, name: str, incoming: str) -> None:
        """Put an existing file (e.g. from a backup) in place of `name`."""
        self.ops.append({"name": name, "incoming": incoming, "existed": os.path.lexists(self.root / name)})

    def retire(self, name: str) -> None:
        self.ops.append({"name": name, "incoming": None, "existed": True})

    def journal(self, state: str) -> dict:
        return {"version": 1, "label": self.label, "state": state, "stash": self.stash, "keep": self.keep,
                "created": self.created, "ops": self.ops, "cleanup": self.cleanup}

    def commit(self) -> None:
        """Write the journal, apply it, mark it done. On an error before the journal is durable,
        everything is removed; after it, the journal is rolled back in-process (or by the next run)."""
        j = self.journal("prepared")
        try:
            self._syncs.wait()  # every new file is durable before the journal names it
            make_dirs(self.root, self.stash)
            fsync_dir(self.root)
            write_journal(self.root, j)
        except (OSError, StateError) as e:  # the journal is not durable: nothing has been renamed yet
            self.abort()
            if isinstance(e, StateError):
                raise
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
            self._syncs.wait()
        except OSError:
            pass
        for p in self.temps:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        if real_subdir(self.root, *self.stash.split("/")):
            shutil.rmtree(self.root / self.stash, ignore_errors=True)
        drop_journal(self.root)
        prune(self.root)


def _forward_op(root: Path, stash: Path, op: dict) -> None:
    name, inc = root / op["name"], op["incoming"]
    saved = stash / op["name"]
    if inc is not None and not os.path.lexists(_in_root(root, inc)):
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
        incoming = _in_root(root, inc)
        if not os.path.lexists(incoming) and os.path.lexists(name):
            move(name, incoming)  # take the new file back out
        elif os.path.lexists(incoming) and os.path.lexists(name) and os.path.lexists(saved):
            os.unlink(name)  # a half-moved link copy; the original is in the stash
        elif os.path.lexists(incoming) and os.path.lexists(name) and not op["existed"]:
            os.unlink(name)
    if op["existed"] and os.path.lexists(saved):
        move(saved, name)


def forward(root: Path, j: dict) -> None:
    """Apply every op (idempotent: ops already done are skipped) and make the renames durable."""
    stash = make_dirs(root, j["stash"])
    for op in j["ops"]:
        _forward_op(root, stash, op)
    if j["keep"]:  # the backup is restorable only once complete: its manifest comes last
        manifest = {"label": j["label"], "created": j.get("created"),
                    "originals": [o["name"] for o in j["ops"] if o["existed"]],
                    "created_files": [o["name"] for o in j["ops"] if not o["existed"]]}
        write_durable(stash / MANIFEST, json.dumps(manifest, indent=2).encode())
    fsync_dir(root)
    fsync_dir(stash)


def mark_done(root: Path, j: dict) -> None:
    try:
        fault("before-journal-commit")
        write_journal(root, {**j, "state": "done"})
    except OSError:
        pass  # e.g. a full disk: the renames are durable already; finishing drops the journal all the same
    fault("after-journal-commit")
    finish(root, j)


def rollback(root: Path, j: dict) -> None:
    stash = root / j["stash"]
    if j["state"] != "writing":  # "writing": nothing was renamed yet, only temp files exist
        for op in reversed(j["ops"]):
            _backward_op(root, stash, op)
        fsync_dir(root)
    remove_temps(root, j)
    if real_subdir(root, *j["stash"].split("/")):
        shutil.rmtree(stash, ignore_errors=True)
    drop_journal(root)
    prune(root)


def remove_temps(root: Path, j: dict) -> None:
    """The temp files the journal says fqcheck created, and nothing else."""
    for op in j["ops"]:
        inc = op["incoming"]
        if inc is not None and inc.startswith(TMP_PREFIX) and os.path.lexists(root / inc):
            os.unlink(root / inc)
        lt = link_temp(root / op["name"])
        if os.path.islink(lt):
            os.unlink(lt)


def finish(root: Path, j: dict) -> None:
    if not j["keep"] and real_subdir(root, *j["stash"].split("/")):
        shutil.rmtree(root / j["stash"], ignore_errors=True)
    for rel in j["cleanup"]:
        if real_subdir(root, *rel.split("/")):
            shutil.rmtree(root / rel, ignore_errors=True)
    drop_journal(root)
    prune(root)


def prune(root: Path) -> None:
    for sub in ("tx", "backup", ""):  # empty folders left by the stash or a consumed backup
        try:
            (root / BACKUP_DIR / sub).rmdir()
        except OSError:
            pass

"""fqcheck's own state files (journal, manifests) as untrusted input: a checkpoint may ship a
planted `.fqcheck/`, so every file is read without following links and validated against its
schema, and every name in it must be a plain file name of the checkpoint folder."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..checkpoint import BACKUP_DIR
from .durable import TMP_PREFIX, read_small, write_durable
from .errors import StateError

JOURNAL = "journal.json"
LOCK = "lock"
MANIFEST = "manifest.json"
STATES = ("writing", "prepared", "done")
LABELS = ("fix", "restore")


def plain_name(x) -> bool:
    """A file name of the checkpoint folder itself: no separator, no `..`, not fqcheck's folder."""
    return (isinstance(x, str) and x not in ("", ".", "..", BACKUP_DIR) and "/" not in x
            and "\\" not in x and "\0" not in x)


def state_dir(root: Path, create: bool = False) -> Path | None:
    """`.fqcheck` of `root` when it is a real directory (None when absent); a link or a file
    there is refused, so that nothing is written or read through it."""
    d = root / BACKUP_DIR
    for attempt in (0, 1):
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            if not create or attempt:
                return None
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise StateError(f"{d}: not a directory of the checkpoint (a link or a file); fqcheck keeps "
                             "its journal and backups there and touches nothing while it is not one: "
                             "remove it by hand")
        return d
    return None


def real_subdir(base: Path, *parts: str) -> Path | None:
    """base/parts... when each level is a real directory (not a link), else None."""
    p = base
    for part in parts:
        p = p / part
        try:
            if not stat.S_ISDIR(os.lstat(p).st_mode):
                return None
        except OSError:
            return None
    return p


def _stash_ok(s) -> bool:
    parts = s.split("/") if isinstance(s, str) else []
    return len(parts) == 3 and parts[0] == BACKUP_DIR and parts[1] in ("backup", "tx") and plain_name(parts[2])


def _incoming_ok(inc, label: str) -> bool:
    if inc is None:
        return True
    if plain_name(inc) and inc.startswith(TMP_PREFIX):
        return True  # a temp file fqcheck created beside the checkpoint's files
    parts = inc.split("/") if label == "restore" and isinstance(inc, str) else []
    return (len(parts) == 4 and parts[:2] == [BACKUP_DIR, "backup"] and plain_name(parts[2])
            and plain_name(parts[3]))  # restore brings a file back from a backup folder


def _problem(j) -> str | None:
    if not isinstance(j, dict):
        return "not a JSON object"
    if j.get("version") != 1 or j.get("label") not in LABELS or j.get("state") not in STATES:
        return "unknown version, label or state"
    if not _stash_ok(j.get("stash")) or type(j.get("keep")) is not bool:
        return "bad stash folder"
    ops, cleanup = j.get("ops"), j.get("cleanup")
    if not isinstance(ops, list) or not isinstance(cleanup, list):
        return "ops/cleanup are not lists"
    for op in ops:
        if not isinstance(op, dict) or not plain_name(op.get("name")) or type(op.get("existed")) is not bool:
            return f"bad op {op!r:.80}"
        if not _incoming_ok(op.get("incoming"), j["label"]):
            return f"bad incoming file in op {op!r:.80}"
    names = [op["name"] for op in ops]
    if len(set(names)) != len(names):
        return "an op names a file twice"
    for c in cleanup:
        parts = c.split("/") if isinstance(c, str) else []
        if not (len(parts) == 3 and parts[:2] == [BACKUP_DIR, "backup"] and plain_name(parts[2])):
            return f"bad cleanup entry {c!r:.80}"
    return None


def load_journal(root: Path) -> dict | None:
    """The pending journal, validated; None when there is none. StateError when it is not one
    fqcheck wrote (then nothing may be done with it)."""
    d = state_dir(root)
    if d is None or not os.path.lexists(d / JOURNAL):
        return None
    jp = d / JOURNAL
    try:
        j = json.loads(read_small(jp))
    except (OSError, ValueError, RecursionError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise StateError(f"{jp}: unreadable journal ({why}); nothing was touched: inspect "
                         f"{d} by hand") from e
    why = _problem(j)
    if why:
        raise StateError(f"{jp}: not a journal fqcheck wrote ({why}); nothing was touched: inspect {d} by hand")
    return j


def write_journal(root: Path, j: dict) -> None:
    write_durable(state_dir(root, create=True) / JOURNAL, json.dumps(j).encode())


def drop_journal(root: Path) -> None:
    try:
        os.unlink(root / BACKUP_DIR / JOURNAL)
    except FileNotFoundError:
        pass
    sweep_journal_temps(root)


def sweep_journal_temps(root: Path) -> None:
    """Temp files of fqcheck's own journal writes in `.fqcheck/` (a kill or a full disk mid-write)."""
    for p in (root / BACKUP_DIR).glob(f"{JOURNAL}.tmp.*"):
        try:
            os.unlink(p)
        except OSError:
            pass


def load_manifest(path: Path) -> dict:
    try:
        m = json.loads(read_small(path))
    except (OSError, ValueError, RecursionError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise StateError(f"{path}: unreadable ({why})") from e
    ok = (isinstance(m, dict) and all(isinstance(m.get(k), list) and all(map(plain_name, m[k]))
                                      for k in ("originals", "created_files")))
    if not ok:
        raise StateError(f"{path}: not a manifest fqcheck wrote (every name must be a plain file "
                         "name of the checkpoint); nothing was touched")
    return m

"""Finishing or undoing what a killed fix (or restore) left: the journal in .fqcheck/ says which
files fqcheck created and which renames it had planned; only those are touched."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..checkpoint import BACKUP_DIR
from .journal import JOURNAL, MANIFEST, load_journal, real_subdir, state_dir, sweep_journal_temps
from .transaction import finish, forward, mark_done, prune, rollback


def pending(root: Path) -> bool:
    """A journal is there: a fix or restore was interrupted (lint reports it, never acts on it)."""
    return os.path.lexists(root / BACKUP_DIR / JOURNAL)


def recover(root: Path, prefer: str = "auto") -> str | None:
    """Finish or undo an interrupted fix (caller holds the lock). prefer: auto (forward when every
    new file is present), back. Returns a one-line description of what it did, or None.
    Raises StateError (nothing touched) when the journal is not one fqcheck wrote."""
    j = load_journal(root)
    what = None
    if j is not None:
        label = j["label"]
        if j["state"] == "done":
            finish(root, j)
            what = f"finished cleaning up a completed {label}"
        else:
            # forward is possible when every new file is either still waiting or already in place
            complete = j["state"] == "prepared" and all(
                o["incoming"] is None or os.path.lexists(root / o["incoming"]) or os.path.lexists(root / o["name"])
                for o in j["ops"])
            if prefer == "auto" and complete:
                forward(root, j)
                mark_done(root, j)
                what = f"completed an interrupted {label} (rolled forward)"
            else:
                rollback(root, j)
                what = (f"removed the temp files of an interrupted {label} (nothing had been changed)"
                        if j["state"] == "writing" else f"undid an interrupted {label} (rolled back)")
    if state_dir(root) is not None:
        sweep_journal_temps(root)
        tx = real_subdir(root, BACKUP_DIR, "tx")
        if tx is not None:
            shutil.rmtree(tx, ignore_errors=True)
        _drop_unfinished_backups(root)
        prune(root)
    return what


def _drop_unfinished_backups(root: Path) -> None:
    """A backup folder without its manifest belongs to a fix killed before its journal existed."""
    b = real_subdir(root, BACKUP_DIR, "backup")
    if b is None:
        return
    for d in b.iterdir():
        if real_subdir(b, d.name) is None:
            continue  # not a real directory: not fqcheck's
        for t in d.glob(f"{MANIFEST}.tmp.*"):
            t.unlink()  # a manifest write cut short
        if not os.path.lexists(d / MANIFEST) and not any(d.iterdir()):
            d.rmdir()

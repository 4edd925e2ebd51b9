"""`fqcheck restore`: put the last backup back, itself as one transaction; or, when a fix was
interrupted, roll that fix back."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..checkpoint import BACKUP_DIR
from .errors import FixError
from .journal import MANIFEST, load_journal, load_manifest, plain_name, real_subdir
from .lock import Lock
from .recovery import recover
from .transaction import Transaction


def latest_backup(root: Path) -> Path | None:
    b = real_subdir(root, BACKUP_DIR, "backup")
    if b is None:
        return None
    done = sorted(d for d in b.iterdir() if plain_name(d.name) and real_subdir(b, d.name) is not None
                  and _is_file(d / MANIFEST))
    return done[-1] if done else None


def _is_file(p: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(p).st_mode)
    except OSError:
        return False


def restore(root: Path) -> tuple[str, list[str]]:
    """Returns (what was put back: a backup folder or the interrupted fix, files restored)."""
    root = Path(root)
    with Lock(root):
        j = load_journal(root)
        if j is not None and j["state"] != "done":
            # an interrupted fix is rolled back; an interrupted restore is finished
            recover(root, prefer="back" if j["label"] == "fix" else "auto")
            return f"the interrupted {j['label']} ({BACKUP_DIR}/journal.json)", [o["name"] for o in j["ops"]]
        recover(root)  # a completed fix's clean-up, temp debris
        b = latest_backup(root)
        if b is None:
            raise FixError(f"{root}: no backup to restore in {root / BACKUP_DIR / 'backup'}")
        m = load_manifest(b / MANIFEST)
        tx = Transaction(root, keep=False, label="restore")
        rel = os.path.relpath(b, root)
        names = []
        for name in m["originals"]:
            if os.path.lexists(b / name):
                tx.bring(name, f"{rel}/{name}")
                names.append(name)
        for name in m["created_files"]:
            if os.path.lexists(root / name) and name not in names:
                tx.retire(name)
                names.append(name)
        tx.cleanup.append(rel)
        tx.commit()
        return str(b), names

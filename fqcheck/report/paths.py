"""Where a finding points, as CI systems want it: a path relative to the repository checkout."""
from __future__ import annotations

import os
from pathlib import Path, PurePath

from ..api import Report
from ..engine import Finding


def checkpoint_root(report: Report) -> str:
    """The folder that findings' `file` names are relative to."""
    p = os.path.abspath(report.path)  # abspath, not resolve: never follow a cache snapshot's links
    return p if os.path.isdir(p) else os.path.dirname(p)


def base_dir(report: Report) -> str:
    """The current directory when the checkpoint lies inside it (CI runs from the checkout root),
    else the checkpoint folder's parent, so paths keep the checkpoint's own name."""
    root, cwd = checkpoint_root(report), os.getcwd()
    return cwd if root == cwd or root.startswith(cwd.rstrip(os.sep) + os.sep) else os.path.dirname(root)


def relative(report: Report, finding: Finding, base: str | None = None) -> str:
    """POSIX path of the finding's file (or of the checkpoint folder) relative to `base`."""
    root = checkpoint_root(report)
    target = os.path.join(root, finding.file) if finding.file else root
    rel = os.path.relpath(target, base or base_dir(report))
    return PurePath(rel).as_posix() if rel != "." else "."


def base_uri(base: str) -> str:
    return Path(base).as_uri().rstrip("/") + "/"

"""Where a finding points, as CI systems want it: a path relative to the repository checkout."""
from __future__ import annotations

import os
from pathlib import Path, PurePath
from typing import Callable

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


def locator(report: Report, base: str | None = None) -> Callable[[Finding], str]:
    """A function giving a finding's POSIX path relative to `base` (default: base_dir): its file,
    or the checkpoint folder for a finding about the whole checkpoint. Paths are computed once
    per report, not per finding (a broken export can have 100,000 findings)."""
    root = checkpoint_root(report)
    prefix = PurePath(os.path.relpath(root, base or base_dir(report))).as_posix()
    head = "" if prefix == "." else prefix + "/"

    def locate(finding: Finding) -> str:
        return head + finding.file if finding.file else prefix
    return locate


def base_uri(base: str) -> str:
    return Path(base).as_uri().rstrip("/") + "/"

"""Run a command with its stderr on a pseudo-terminal (as a person at a terminal sees it)."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stderr_on_a_terminal(argv: list, env: dict | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """Run `python3 ARGV...` from the repo root, stdout a pipe, stderr a terminal; return the
    process and what reached the terminal."""
    master, slave = pty.openpty()
    p = subprocess.run([sys.executable, *map(str, argv)], stdout=subprocess.PIPE, stderr=slave, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    os.close(slave)
    data = b""
    while select.select([master], [], [], 0.5)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    return p, data.decode(errors="replace")

"""Crash safety: kill `fqcheck fix` (SIGKILL) at every commit point and at random times, and make
writes fail (RLIMIT_FSIZE); the next fqcheck run must leave exactly the old or the new checkpoint."""
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from builders import save_tiny_model
from fixhelp import damage, leak_rules, loads_cleanly, run_cli, state

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A damaged sharded checkpoint (4 files to rewrite), its state, and the state after a clean fix."""
    base = tmp_path_factory.mktemp("crash") / "base"
    save_tiny_model(base, shards=3)
    damage(base)
    rules = leak_rules(base.parent / "rules")
    fixed = base.parent / "fixed"
    shutil.copytree(base, fixed)
    out = run_cli("fix", fixed, "--rules", rules)
    assert out.returncode == 0, out.stderr
    return base, rules, state(base), state(fixed)


def fresh(world, tmp_path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(world[0], d)
    return d


def assert_old_or_new(d: Path, world) -> str:
    _, _, old, new = world
    now = state(d)
    assert now in (old, new), "directory holds a mix of old and new files"
    leftovers = [n for n in os.listdir(d) if n.startswith(".fqcheck-tmp")]
    assert not leftovers
    assert not (d / ".fqcheck" / "journal.json").exists() and not (d / ".fqcheck" / "lock").exists()
    return "old" if now == old else "new"


POINTS = ([f"after-temp-write:{i}" for i in range(1, 5)] + [f"after-fsync:{i}" for i in range(1, 5)]
          + ["after-journal"] + [f"after-rename:{i}" for i in range(1, 5)]
          + ["before-journal-commit", "after-journal-commit"])


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_point_then_lint_recovers(world, tmp_path, point):
    d = fresh(world, tmp_path)
    rules = world[1]
    out = run_cli("fix", d, "--rules", rules, env={"FQCHECK_FAULT": point})
    assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr)
    if point == "after-rename:2":
        assert state(d) not in (world[2], world[3])  # really killed mid-commit: a mix before recovery
    lint = run_cli("lint", d, "--rules", rules)  # lint never writes: it says a fix is pending
    assert lint.returncode in (0, 1), lint.stderr
    if not point.startswith(("after-temp-write", "after-fsync")) and point != "after-journal-commit":
        assert "an interrupted fix is pending" in lint.stderr, lint.stderr
    recover(d)  # what the next `fqcheck fix` does first
    which = assert_old_or_new(d, world)
    if point.startswith(("after-temp-write", "after-fsync")):
        assert which == "old"  # no journal yet: nothing had been changed
    if point.startswith("after-rename") or point.endswith("journal-commit"):
        assert which == "new"  # journal durable: rolled forward
    if point in ("after-fsync:2", "after-rename:2"):  # and a fix afterwards gives the new state
        again = run_cli("fix", d, "--rules", rules)
        assert again.returncode == 0, again.stdout + again.stderr
        assert state(d) == world[3]


@pytest.mark.parametrize("point", ["after-fsync:2", "after-rename:2"])
def test_kill_then_restore_gives_old(world, tmp_path, point):
    d = fresh(world, tmp_path)
    run_cli("fix", d, "--rules", world[1], env={"FQCHECK_FAULT": point})
    out = run_cli("restore", d)
    if point.startswith("after-fsync"):
        assert out.returncode == 2 and "no backup" in out.stderr  # nothing had been committed
    else:
        assert out.returncode == 0, out.stderr
    assert assert_old_or_new(d, world) == "old"


@pytest.mark.parametrize("seed", range(6))
def test_kill_at_random_time(world, tmp_path, seed):
    d = fresh(world, tmp_path)
    rng = random.Random(seed)
    p = subprocess.Popen([sys.executable, "-m", "fqcheck", "fix", str(d), "--rules", str(world[1])],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.05, 0.6))
    p.send_signal(signal.SIGKILL)
    p.wait()
    recover(d)
    assert_old_or_new(d, world)
    loads_cleanly(d) if state(d) == world[3] else None


def _limit_file_size(limit):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("limit", [100, 12_000])
def test_write_failure_rolls_back(world, tmp_path, limit):
    d = fresh(world, tmp_path)
    out = subprocess.run([sys.executable, "-m", "fqcheck", "fix", str(d), "--rules", str(world[1])],
                         cwd=ROOT, capture_output=True, text=True, preexec_fn=_limit_file_size(limit))
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "rolled back" in lines[0], out.stderr
    assert assert_old_or_new(d, world) == "old"
    assert not (d / ".fqcheck").exists()


def test_write_failure_in_output_mode(world, tmp_path):
    d = fresh(world, tmp_path)
    out = subprocess.run([sys.executable, "-m", "fqcheck", "fix", str(d), "--rules", str(world[1]),
                          "--output", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True,
                         preexec_fn=_limit_file_size(12_000))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "o").exists() and not [p for p in tmp_path.iterdir() if "fqcheck-tmp" in p.name]
    assert assert_old_or_new(d, world) == "old"


@pytest.mark.parametrize("point", ["after-rename:1", "after-rename:3", "before-journal-commit"])
def test_kill_during_restore(world, tmp_path, point):
    d = fresh(world, tmp_path)
    assert run_cli("fix", d, "--rules", world[1]).returncode == 0
    out = run_cli("restore", d, env={"FQCHECK_FAULT": point})
    assert out.returncode == -signal.SIGKILL
    recover(d)
    assert assert_old_or_new(d, world) == "old"  # the restore's journal is rolled forward


def recover(d):
    """Finish or roll back an interrupted fix as `fqcheck fix` does first (lint never writes)."""
    from fqcheck.fix.journal import Lock, recover as finish
    with Lock(d):
        finish(d)

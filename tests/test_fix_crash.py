"""Crash safety: kill `fqcheck fix` (SIGKILL) at every commit point and at random times, and make
writes fail (RLIMIT_FSIZE); the next fqcheck run must leave exactly the old or the new checkpoint."""
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
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


def _bytes(d: Path) -> dict:
    """Every file under d (.fqcheck included) and its bytes, links as their target."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(d))] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(d))] = p.read_bytes()
    return out


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_point_then_fix_recovers(world, tmp_path, point):
    d = fresh(world, tmp_path)
    rules = world[1]
    out = run_cli("fix", d, "--rules", rules, env={"FQCHECK_FAULT": point})
    assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr)
    if point == "after-rename:2":
        assert state(d) not in (world[2], world[3])  # really killed mid-commit: a mix before recovery
    if point in ("after-temp-write:1", "after-rename:2", "after-journal-commit"):
        before = _bytes(d)
        lint = run_cli("lint", d, "--rules", rules)  # lint reports the interrupted fix and writes nothing
        assert lint.returncode in (0, 1), lint.stderr
        assert "interrupted fix" in lint.stderr and "fqcheck restore" in lint.stderr, lint.stderr
        assert _bytes(d) == before
    again = run_cli("fix", d, "--rules", rules)  # the next fix finishes (or undoes) it, then fixes
    assert again.returncode == 0, again.stdout + again.stderr
    note = again.stdout.splitlines()[0]
    if point.startswith(("after-temp-write", "after-fsync")):
        assert "nothing had been changed" in note  # no journal yet: the temp files are removed
    elif point.startswith("after-rename") or point.endswith("journal-commit") or point == "after-journal":
        assert "rolled forward" in note or "completed" in note, note
    assert assert_old_or_new(d, world) == "new"


@pytest.mark.parametrize("point", ["after-fsync:2", "after-rename:2"])
def test_kill_then_restore_gives_old(world, tmp_path, point):
    d = fresh(world, tmp_path)
    run_cli("fix", d, "--rules", world[1], env={"FQCHECK_FAULT": point})
    out = run_cli("restore", d)  # rolls the interrupted fix back
    assert out.returncode == 0, out.stderr
    assert "interrupted fix" in out.stdout
    assert assert_old_or_new(d, world) == "old"
    assert not (d / ".fqcheck").exists()


def test_kill_during_the_recovery_fix_performs(world, tmp_path):
    d = fresh(world, tmp_path)
    assert run_cli("fix", d, "--rules", world[1], env={"FQCHECK_FAULT": "after-rename:2"}).returncode == -signal.SIGKILL
    # the next fix rolls the journal forward: killed again after the first rename of that recovery
    again = run_cli("fix", d, "--rules", world[1], env={"FQCHECK_FAULT": "after-rename:1"})
    assert again.returncode == -signal.SIGKILL
    assert state(d) not in (world[2], world[3])  # still mid-way
    again = run_cli("fix", d, "--rules", world[1])
    assert again.returncode == 0 and "rolled forward" in again.stdout, again.stdout + again.stderr
    assert assert_old_or_new(d, world) == "new"


@pytest.mark.parametrize("seed", range(4))
def test_kill_at_random_point(world, tmp_path, seed):
    """Killed at the n-th fault point of any kind (n random among the len(POINTS) a fix of the world
    passes: temp writes, fsyncs, journal, renames, commit), then killed again at a random point of
    the recovery the next fix performs."""
    d = fresh(world, tmp_path)
    rng = random.Random(seed)
    out = run_cli("fix", d, "--rules", world[1], env={"FQCHECK_FAULT": f"any:{rng.randint(1, len(POINTS))}"})
    assert out.returncode == -signal.SIGKILL
    out = run_cli("fix", d, "--rules", world[1], env={"FQCHECK_FAULT": f"after-rename:{rng.randint(1, 3)}"})
    assert out.returncode in (0, -signal.SIGKILL)
    out = run_cli("fix", d, "--rules", world[1])
    assert out.returncode == 0, out.stdout + out.stderr
    assert assert_old_or_new(d, world) == "new"
    loads_cleanly(d) if seed == 0 else None


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
    assert "interrupted fix" in run_cli("lint", d).stderr  # reported, not acted on
    again = run_cli("restore", d, env={"FQCHECK_FAULT": "after-rename:1"})  # killed again, recovering
    if again.returncode == -signal.SIGKILL:
        again = run_cli("restore", d)
    assert again.returncode == 0 and "interrupted restore" in again.stdout, again.stderr  # finished
    assert assert_old_or_new(d, world) == "old"

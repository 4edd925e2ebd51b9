"""Reading shard headers on two cores (fqcheck.checkpoint.parallel): the same headers as reading
them one by one, whatever the child does (works, crashes, hangs), and no child left behind."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from pathlib import Path

import fqcheck
import fqcheck.checkpoint
from builders import raw_safetensors, save_tiny_model
from fqcheck.checkpoint import parallel
from fqcheck.checkpoint.safetensors import read_header

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the two-core reader forks (Linux only)")
SHARDS = 12


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """A tiny Llama in 12 shards saved by save_pretrained, four of them damaged."""
    d = save_tiny_model(tmp_path_factory.mktemp("many") / "ckpt", shards=SHARDS)
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) >= parallel.MIN_SHARDS
    raw_safetensors(shards[1], b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]')  # bad JSON
    raw_safetensors(shards[-2], {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8)
    raw_safetensors(shards[-3], {"__metadata__": None, "\ud800x": {"dtype": "F8_E4M3", "shape": [2 ** 40, 0],
                                                                   "data_offsets": [0, 0]}})
    raw_safetensors(shards[5], b'{"t": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1], "dtype": "U8"}}', b"\0")
    return d


@pytest.fixture(autouse=True)
def _single_threaded(monkeypatch):
    """tqdm (used by save_pretrained) leaves a monitor thread running, and fqcheck rightly does
    not fork while another thread runs: stop it, as a CLI process never has it. torch's native
    thread pools (this test process imports torch; a header-only `fqcheck lint` never does) are
    idle here: count them out, so that the child's behaviour can be tested at all."""
    from tqdm._monitor import TMonitor
    for t in threading.enumerate():
        if isinstance(t, TMonitor):
            t.exit()  # its tqdm class starts a new one when next needed
    assert threading.active_count() == 1
    monkeypatch.setattr(parallel, "native_threads", lambda: 1)


def test_native_threads_forbid_the_fork(monkeypatch):
    monkeypatch.undo()
    import torch
    torch.ones(256, 256) @ torch.ones(256, 256)  # starts an OpenMP pool
    if parallel.native_threads() > 1:
        assert not parallel.can_fork()
        assert parallel.HeaderPrefetch([Path("/nonexistent")] * 10)._pid is None


def read_headers(paths, first=lambda: None):
    pending = parallel.HeaderPrefetch(paths)  # the child starts now
    first()  # this process's other work
    return pending.finish()


def _paths(d):
    return sorted(d.glob("*.safetensors"))


def _no_children():
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)


def test_same_headers_as_one_by_one(many_shards, monkeypatch):
    delivered = []
    unpack = parallel._unpack
    monkeypatch.setattr(parallel, "_unpack", lambda p, packed: delivered.append(p) or unpack(p, packed))
    paths = _paths(many_shards)
    serial = [read_header(p) for p in paths]
    assert sum(bool(h.problems) for h in serial) == 4
    # first() holds this process back, so the child gets to read the shards (tiny headers take
    # less time than the fork itself otherwise)
    assert read_headers(paths, first=lambda: time.sleep(0.5)) == serial
    assert delivered, "the child read no shard"
    # Headers the fast path reads cross the pipe, problems included (an overlap); one it cannot
    # read (a lone surrogate) is read again here, by the exact slow path.
    assert paths[-2] in delivered and serial[-2].problems
    assert paths[-3] not in delivered and not serial[-3].readable
    _no_children()


@pytest.mark.parametrize("failure", ["crash", "exit"])
def test_a_failing_child_changes_nothing(many_shards, monkeypatch, failure):
    def broken(h):
        if failure == "exit":
            os._exit(3)
        raise RuntimeError("child failure")
    monkeypatch.setattr(parallel, "_pack", broken)  # what the forked child runs on every shard
    paths = _paths(many_shards)
    assert read_headers(paths, first=lambda: time.sleep(0.2)) == [read_header(p) for p in paths]
    _no_children()


def test_a_stuck_child_is_killed_and_its_shards_read_here(many_shards, monkeypatch):
    monkeypatch.setattr(parallel, "_pack", lambda h: time.sleep(600))
    paths = _paths(many_shards)
    t = time.monotonic()
    assert read_headers(paths, first=lambda: time.sleep(0.2)) == [read_header(p) for p in paths]
    assert time.monotonic() - t < 30
    _no_children()


def test_an_error_in_first_kills_the_child(many_shards):
    def first():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        read_headers(_paths(many_shards), first=first)
    _no_children()  # the unfinished HeaderPrefetch was dropped: its finalizer killed and reaped the child


def test_no_fork_while_other_threads_run(many_shards):
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not parallel.can_fork()
        paths = _paths(many_shards)
        assert read_headers(paths) == [read_header(p) for p in paths]
    finally:
        stop.set()
        t.join()
    assert parallel.can_fork()


def test_lint_finds_the_same_either_way(many_shards, monkeypatch):
    forks = []
    fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or fork())
    with parallel.forking():  # what the command line opens around its run
        two_cores = fqcheck.lint(many_shards, jobs=2)
    assert forks == [1]
    one_core = fqcheck.lint(many_shards, jobs=1)
    assert two_cores.findings == one_core.findings
    assert {f.code for f in one_core.findings} >= {"SFT001", "SFT002", "SFT003", "SFT006"}


def test_the_api_never_forks(many_shards, monkeypatch):
    def no_fork():
        raise AssertionError("the API forked")
    monkeypatch.setattr(os, "fork", no_fork)
    for jobs in (0, 1, 2):  # --jobs spreads work over threads in the API, never processes
        assert {f.code for f in fqcheck.lint(many_shards, jobs=jobs, deep=True).findings} >= {"SFT001", "SFT003"}


def test_the_cli_reports_what_the_api_does(many_shards):
    # `fqcheck lint` reads headers on two cores; the child must not hold the output pipe
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fqcheck", "lint", str(many_shards), "-f", "json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    cli = json.loads(out.stdout)["findings"]
    api = [f.as_dict() for f in fqcheck.lint(many_shards).findings]
    assert cli == api and {f["code"] for f in cli} >= {"SFT001", "SFT003"}
    assert time.monotonic() - t < 60


def test_no_fork_available_means_one_process_reads(many_shards, monkeypatch):
    def refuse():
        raise BlockingIOError(11, "Resource temporarily unavailable")  # what fork says at RLIMIT_NPROC
    monkeypatch.setattr(os, "fork", refuse)
    paths = _paths(many_shards)
    assert read_headers(paths) == [read_header(p) for p in paths]


def test_what_a_dying_child_delivered_is_kept(many_shards, monkeypatch):
    pack, packed = parallel._pack, []

    def dies_on_the_third(h):
        if len(packed) == 2:
            os._exit(9)  # killed mid-way, after sending two whole frames
        packed.append(h)
        return pack(h)
    delivered = []
    unpack = parallel._unpack
    monkeypatch.setattr(parallel, "_pack", dies_on_the_third)
    monkeypatch.setattr(parallel, "_unpack", lambda p, x: delivered.append(p) or unpack(p, x))
    paths = _paths(many_shards)
    assert read_headers(paths, first=lambda: time.sleep(0.5)) == [read_header(p) for p in paths]
    assert delivered == paths[-2:][::-1]  # the child's two, from the back; the rest read here
    _no_children()

"""--jobs: the deep pass and the re-folds on several workers (CPU threads, or one thread per GPU) give
the same bytes as one worker; and the fix's re-lint, which takes the first lint's results for
tensors copied verbatim (fqcheck/carry.py), still sees what is really in the output."""
import math
import os
import shutil

import pytest
import torch

import fqcheck
from builders import load_shard, save_shard
from fixhelp import run_cli
from fqbuild import fq_export
from fqcheck.api import UsageError, lint_checkpoint, with_keywords
from fqcheck.checkpoint import Checkpoint
from fqcheck.fixer.plan import make_plan
from fqcheck.fixer.runner import _relint, _stamps, _write_copy
from fqcheck.carry import Carry

RAW = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
       "model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.up_proj.weight")
ZERO = "model.layers.1.mlp.gate_proj.weight"  # not quantized in this export: a TEN005 warning stays
OPTS = dict(deep=True, ignore=["ARC"], quiet=True)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A FakeQuant FP8 export in 3 shards, weight amax leaked, four weights left unquantized, and an
    all-zero weight that is not quantized (its quantizer entry dropped: a warning the fix keeps)."""
    d = fq_export(tmp_path_factory.mktemp("jobs") / "x", unfolded=set(RAW), shards=3)
    for shard in sorted(d.glob("*.safetensors")):
        t = load_shard(shard)
        if ZERO in t:
            t[ZERO] = torch.zeros_like(t[ZERO])
            t.pop(ZERO.replace(".weight", ".weight_quantizer._amax"), None)
            save_shard(shard, t)
    return d


def _files(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if (d / n).is_file()}


def _fix(src, out, **kw):
    res = fqcheck.fix(src, output=out, **OPTS, **kw)
    assert sorted(f.tensor for f in res.applied if f.code == "QNT002") == sorted(RAW)
    assert res.ok and [f.code for f in res.remaining.findings] == ["TEN005"]
    return _files(out)


def test_jobs_2_fix_is_byte_identical_to_jobs_1(export, tmp_path):
    one = _fix(export, tmp_path / "one", device="cpu", jobs=1)
    two = _fix(export, tmp_path / "two", device="cpu", jobs=2)
    assert one == two and len([n for n in one if n.endswith(".safetensors")]) == 4
    # in place, through the transaction: the same shards
    inplace = tmp_path / "inplace"
    shutil.copytree(export, inplace)
    res = fqcheck.fix(inplace, device="cpu", jobs=2, **OPTS)
    assert res.ok and {n: b for n, b in _files(inplace).items() if n in one} == one


def test_jobs_2_lint_finds_what_jobs_1_finds(export):
    one = fqcheck.lint(export, device="cpu", jobs=1, **OPTS).findings
    two = fqcheck.lint(export, device="cpu", jobs=2, **OPTS).findings
    assert [f.as_dict() for f in one] == [f.as_dict() for f in two]
    assert sorted(f.tensor for f in one if f.code == "QNT002") == sorted(RAW)


def test_cli_fix_takes_jobs(export, tmp_path):
    api = _fix(export, tmp_path / "api", device="cpu", jobs=1)
    out = run_cli("fix", export, "--deep", "--ignore", "ARC", "--device", "cpu", "--jobs", "2",
                  "--output", tmp_path / "cli")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _files(tmp_path / "cli") == api
    with pytest.raises(UsageError, match="--jobs -1"):
        fqcheck.lint(export, jobs=-1)


def test_relint_with_carry_equals_a_fresh_lint(export, tmp_path):
    res = fqcheck.fix(export, output=tmp_path / "o", device="cpu", **OPTS)
    fresh = fqcheck.lint(tmp_path / "o", device="cpu", **OPTS)
    assert [f.as_dict() for f in res.remaining.findings] == [f.as_dict() for f in fresh.findings]
    assert [(f.code, f.tensor) for f in fresh.findings] == [("TEN005", ZERO)]


def _nan_into(path, tensor):
    """Write a NaN over the first element of `tensor`, in place (same size; mtime and ctime move)."""
    h = Checkpoint.open(path.parent).header(path.name)
    e = h.tensors[tensor]
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, torch.tensor([math.nan], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes(),
                  h.data_start + e.begin)
    finally:
        os.close(fd)


def _steps(src, out, between_lint_and_write=None, after_write=None):
    """The --output fix, step by step (fixer/runner.py), with a hook between the steps."""
    opts = with_keywords(None, dict(device="cpu", **OPTS))
    ckpt = Checkpoint.open(src)
    before = _stamps(ckpt)
    report = lint_checkpoint(ckpt, opts, src)
    plan = make_plan(ckpt, report.findings)
    if between_lint_and_write:
        between_lint_and_write()
    carry = Carry(ckpt)
    _write_copy(ckpt, plan, out, False, [], carry, before)
    if after_write:
        after_write()
    return carry, _relint(out, opts, carry)


def _where(d, tensor):
    return next(n for n in sorted(os.listdir(d)) if n.endswith(".safetensors") and tensor in load_shard(d / n))


def test_carry_is_taken_only_while_source_and_output_are_unchanged(export, tmp_path):
    copied = "model.layers.0.self_attn.k_proj.weight"  # folded: copied verbatim into the output
    # unchanged: the re-lint takes the first lint's results for the copied tensors, and is clean
    carry, report = _steps(export, tmp_path / "a")
    shard = _where(export, copied)
    assert carry.source(shard, copied) is not None and carry.source(shard, RAW[0]) is None
    assert [f.code for f in report.findings] == ["TEN005"]
    # the source changes between the first lint and the copy: its tensors are read again
    src = tmp_path / "src"
    shutil.copytree(export, src)
    carry, report = _steps(src, tmp_path / "b", between_lint_and_write=lambda: _nan_into(src / shard, copied))
    assert carry.source(shard, copied) is None
    assert ("TEN003", copied) in [(f.code, f.tensor) for f in report.findings]
    # the output changes after it was written: read again as well
    out = tmp_path / "c"
    carry, report = _steps(export, out, after_write=lambda: _nan_into(out / shard, copied))
    assert ("TEN003", copied) in [(f.code, f.tensor) for f in report.findings]


# ---- two GPUs: one worker per GPU, the same bytes as the CPU ---------------------------------------
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA GPUs")


@pytest.mark.cuda
@two_gpus
def test_two_gpu_fix_is_byte_identical_to_cpu_and_uses_both(export, tmp_path):
    cpu = _fix(export, tmp_path / "cpu", device="cpu", jobs=1)
    one = _fix(export, tmp_path / "one", device="cuda", jobs=1)
    allocs = [torch.cuda.memory_stats(i).get("allocation.all.allocated", 0) for i in range(2)]
    two = _fix(export, tmp_path / "two", device="cuda", jobs=2)
    after = [torch.cuda.memory_stats(i).get("allocation.all.allocated", 0) for i in range(2)]
    assert cpu == one == two
    assert all(b > a for a, b in zip(allocs, after)), (allocs, after)

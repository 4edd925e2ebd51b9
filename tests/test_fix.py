"""fqcheck fix: real damaged checkpoints repaired in place, checked with safe_open and transformers."""
import json
import os
import shutil
import struct

import pytest
import torch
from safetensors import safe_open

import fqcheck
from builders import leak_quantizer_state, read_index
from fixhelp import damage, files_stat, leak_rules, loads_cleanly, run_cli, state, strip_metadata
from fqcheck.checkpoint import BACKUP_DIR, Checkpoint
from fqcheck.engine import Finding
from fqcheck.fixer import edits as E
from fqcheck.fixer import shard as shardmod
from fqcheck.fixer.errors import FixError
from fqcheck.fixer.errors import FixRefused
from fqcheck.fixer.plan import make_plan
from fqcheck.api import fix


def without(st: dict, names) -> dict:
    """`st` with the leaked tensors removed (what the fixed checkpoint must hold)."""
    return {f: ({k: v for k, v in t.items() if k not in names} if isinstance(t, dict) else t) for f, t in st.items()}


def test_sft006_fixed_in_place_bytes_identical(sharded_llama):
    d = sharded_llama
    shards = sorted(d.glob("*.safetensors"))
    before = state(d)
    strip_metadata(shards[0])
    strip_metadata(shards[2], {"producer": "exporter"})
    untouched = files_stat(d)
    res = fqcheck.fix(d)
    assert sorted(res.written) == [shards[0].name, shards[2].name]
    assert [f.code for f in res.applied] == ["SFT006", "SFT006"]
    assert res.remaining.findings == [] and res.ok
    after = state(d)
    assert after[shards[0].name] == before[shards[0].name]  # every tensor byte-identical, format pt
    assert after[shards[2].name]["__metadata__"] == {"producer": "exporter", "format": "pt"}
    assert {k: v for k, v in after[shards[2].name].items() if k != "__metadata__"} == \
        {k: v for k, v in before[shards[2].name].items() if k != "__metadata__"}
    now = files_stat(d)
    for name in (shards[1].name, shards[3].name, "config.json", "model.safetensors.index.json"):
        assert now[name] == untouched[name]  # not rewritten: same inode, mtime, bytes
    loads_cleanly(d)
    assert (d / res.backup / shards[0].name).exists()


def test_leak_dropped_from_shard_and_index(sharded_llama, tmp_path):
    d = sharded_llama
    clean_index = read_index(d)
    before = state(d)
    leaked = damage(d)
    rules = leak_rules(tmp_path / "rules")
    res = fix(d, rules_dirs=[rules])
    assert {f.code for f in res.applied} >= {"USR900", "USR901", "SFT006"}  # built-in rules may join
    assert res.remaining.findings == []
    after = state(d)
    new_cfg = json.loads(after.pop("config.json"))
    assert new_cfg == json.loads(before.pop("config.json"))
    idx = json.loads(after.pop("model.safetensors.index.json"))
    before.pop("model.safetensors.index.json")
    assert idx["weight_map"] == clean_index["weight_map"]
    assert idx["metadata"] == clean_index["metadata"]  # total_size as huggingface_hub computes it
    assert after == without(before, leaked)
    loads_cleanly(d)


def test_leak_end_to_end_cli(sharded_llama, tmp_path):
    d = sharded_llama
    leaked = damage(d)
    rules = leak_rules(tmp_path / "rules")
    dry = run_cli("fix", d, "--rules", rules, "--dry-run")
    assert dry.returncode == 1, dry.stderr
    assert "drop 2 tensor(s)" in dry.stdout and leaked[0] in dry.stdout and "drop key 'stray_key'" in dry.stdout
    out = run_cli("fix", d, "--rules", rules)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "no findings remain" in out.stdout and "fqcheck restore" in out.stdout
    assert run_cli("lint", d, "--rules", rules).returncode == 0
    loads_cleanly(d)


def test_idempotent(sharded_llama, tmp_path):
    d = sharded_llama
    damage(d)
    rules = leak_rules(tmp_path / "rules")
    fix(d, rules_dirs=[rules])
    once = files_stat(d)
    res = fix(d, rules_dirs=[rules])
    assert res.plan.empty and not res.changed
    assert files_stat(d) == once


def test_clean_checkpoint_untouched(sharded_llama):
    d = sharded_llama
    before = files_stat(d)
    listing = sorted(os.listdir(d))
    res = fix(d)
    assert res.plan.empty and res.written == [] and res.remaining.findings == []
    assert files_stat(d) == before and sorted(os.listdir(d)) == listing  # not even .fqcheck/


def test_dry_run_changes_nothing(sharded_llama, tmp_path):
    d = sharded_llama
    damage(d)
    before, listing = files_stat(d), sorted(os.listdir(d))
    res = fix(d, dry_run=True, rules_dirs=[leak_rules(tmp_path / "rules")])
    assert res.dry_run and len(res.plan.shards) == 2 and res.written == []
    assert files_stat(d) == before and sorted(os.listdir(d)) == listing


def test_output_copy_leaves_source(sharded_llama, tmp_path):
    d = sharded_llama
    before_state = state(d)
    leaked = damage(d)
    before, listing = files_stat(d), sorted(os.listdir(d))
    out = tmp_path / "fixed"
    res = fix(d, output=out, rules_dirs=[leak_rules(tmp_path / "rules")])
    assert files_stat(d) == before and sorted(os.listdir(d)) == listing
    assert res.remaining.findings == []
    got, want = state(out), without(before_state, leaked)
    assert {k: v for k, v in got.items() if k.endswith(".safetensors")} == \
        {k: v for k, v in want.items() if k.endswith(".safetensors")}
    assert not (out / BACKUP_DIR).exists()
    loads_cleanly(out)
    with pytest.raises(FixError, match="new or empty"):
        fix(d, output=out)


def test_refuses_unfixable_and_changes_nothing(sharded_llama):
    d = sharded_llama
    shards = sorted(d.glob("*.safetensors"))
    strip_metadata(shards[0])  # fixable
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[:-64])  # truncated: SFT004, not fixable
    before, listing = files_stat(d), sorted(os.listdir(d))
    with pytest.raises(FixRefused) as e:
        fix(d)
    assert [f.code for f in e.value.findings] == ["SFT004"]
    out = run_cli("fix", d)
    assert out.returncode == 2
    assert "SFT004" in out.stderr and "nothing was changed" in out.stderr and "Traceback" not in out.stderr
    assert files_stat(d) == before and sorted(os.listdir(d)) == listing


def test_refuses_to_rewrite_corrupt_shard_even_when_ignored(sharded_llama):
    d = sharded_llama
    shards = sorted(d.glob("*.safetensors"))
    strip_metadata(shards[0])
    shards[0].write_bytes(shards[0].read_bytes() + b"junk")  # SFT004 trailing bytes in the same shard
    before = files_stat(d)
    with pytest.raises(FixRefused, match="cannot be rewritten safely"):
        fix(d, ignore=["SFT004"])
    assert files_stat(d) == before


def test_restore_puts_originals_back(sharded_llama, tmp_path):
    d = sharded_llama
    damage(d)
    before = files_stat(d)
    fix(d, rules_dirs=[leak_rules(tmp_path / "rules")])
    out = run_cli("restore", d)
    assert out.returncode == 0, out.stderr
    assert "restored 4 file(s)" in out.stdout
    now = files_stat(d)
    assert {n: v[2] for n, v in now.items()} == {n: v[2] for n, v in before.items()}
    assert not (d / BACKUP_DIR).exists() or not list((d / BACKUP_DIR / "backup").iterdir())
    assert run_cli("restore", d).returncode == 2  # nothing left to restore


def test_no_backup_keeps_nothing(sharded_llama, tmp_path):
    d = sharded_llama
    damage(d)
    res = fix(d, backup=False, rules_dirs=[leak_rules(tmp_path / "rules")])
    assert res.backup is None and res.written
    assert not (d / BACKUP_DIR).exists()
    loads_cleanly(d)


def test_unsafe_fix_needs_flag(sharded_llama, tmp_path):
    d = sharded_llama
    damage(d)
    rules = leak_rules(tmp_path / "rules", fix="unsafe")
    res = fix(d, rules_dirs=[rules], select=["USR"])
    assert res.plan.empty and {f.code for f in res.plan.skipped} == {"USR900", "USR901"}
    res = fix(d, rules_dirs=[rules], select=["USR"], unsafe_fixes=True)
    assert "config.json" in res.written and res.remaining.findings == []


def test_lock_held_by_live_process_refuses(sharded_llama, tmp_path):
    d = sharded_llama
    strip_metadata(sorted(d.glob("*.safetensors"))[0])
    from fqcheck.fixer.lock import Lock
    holder = Lock(d)
    holder.acquire()  # this process holds it, as a concurrent fix would
    try:
        with pytest.raises(FixError, match="another fqcheck fix is running"):
            fix(d)
    finally:
        holder.release()
    (d / BACKUP_DIR).mkdir()
    (d / BACKUP_DIR / "lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename}))
    assert fix(d).written  # a stale lock (dead pid) is taken over


def hf_cache(tmp_path, base):
    """models--org--m/{blobs,snapshots/rev1,snapshots/rev2}: both revisions link to the same blobs."""
    repo = tmp_path / "models--org--m"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    revs = [repo / "snapshots" / r for r in ("rev1", "rev2")]
    for r in revs:
        r.mkdir(parents=True)
    for i, p in enumerate(sorted(base.iterdir())):
        blob = blobs / f"blob{i:02d}"
        shutil.copy(p, blob)
        for r in revs:
            os.symlink(os.path.relpath(blob, r), r / p.name)
    return repo, revs


def test_hf_cache_other_revision_and_blobs_untouched(sharded_llama, tmp_path):
    base = sharded_llama
    for s in sorted(base.glob("*.safetensors"))[:2]:
        strip_metadata(s)
    repo, (rev1, rev2) = hf_cache(tmp_path, base)
    blobs_before = files_stat(repo / "blobs")
    rev2_before = state(rev2)
    res = fix(rev1)
    assert len(res.written) == 2 and res.remaining.findings == []
    assert files_stat(repo / "blobs") == blobs_before
    assert state(rev2) == rev2_before
    for name in res.written:
        assert not (rev1 / name).is_symlink() and (rev1 / name).is_file()
    assert all((rev1 / n).is_symlink() for n in os.listdir(rev1) if n not in res.written and n != BACKUP_DIR)
    loads_cleanly(rev1)
    # the backup keeps links to the blobs; restore puts the links back as they were
    run = run_cli("restore", rev1)
    assert run.returncode == 0, run.stderr
    assert all((rev1 / n).is_symlink() for n in os.listdir(rev1) if n != BACKUP_DIR)
    assert state(rev1) == rev2_before
    assert files_stat(repo / "blobs") == blobs_before


@pytest.mark.parametrize("mode", ["copy_file_range", "sendfile", "buffer"])
def test_rewriter_copy_paths_and_replace(tiny_llama, tmp_path, mode, monkeypatch):
    d = tiny_llama
    name = "model.safetensors"
    leak_quantizer_state(d)
    ckpt = Checkpoint.open(d)
    h = ckpt.header(name)
    target = "model.layers.1.mlp.up_proj.weight"
    amax = [t for t in h.tensors if t.endswith("_amax")]
    findings = [Finding("X", "error", "leak", name, t, "safe", E.DropTensor(name, t)) for t in amax]
    findings.append(Finding("Y", "error", "refold", name, target, "safe",
                            E.ReplaceTensor(name, target, lambda b: bytes(len(b)))))
    plan = make_plan(ckpt, findings)
    sp = plan.shards[name]
    monkeypatch.setitem(shardmod._mode, "m", mode)
    out = tmp_path / "new.safetensors"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        size = shardmod.write_shard(h, fd, sp.drop, sp.replace, sp.metadata)
    finally:
        os.close(fd)
    assert size == out.stat().st_size == sp.new_size
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b"}")  # space-padded like the reference writer
    with safe_open(str(out), framework="pt") as new, safe_open(str(d / name), framework="pt") as old:
        assert set(new.keys()) == set(old.keys()) - set(amax)
        assert new.metadata() == {"format": "pt"}
        for k in new.keys():
            if k == target:
                assert torch.count_nonzero(new.get_tensor(k)) == 0
            else:
                assert torch.equal(new.get_tensor(k).view(torch.uint8) if new.get_tensor(k).dim() else new.get_tensor(k),
                                   old.get_tensor(k).view(torch.uint8) if old.get_tensor(k).dim() else old.get_tensor(k))


def test_planner_merges_edits_and_rebuilds_index(sharded_llama):
    d = sharded_llama
    leaked = leak_quantizer_state(d)
    ckpt = Checkpoint.open(d)
    shard = ckpt.tensor_files[leaked[0]][0]
    findings = [Finding("X", "error", "leak", shard, t, "safe", E.DropTensor(shard, t)) for t in leaked]
    findings.append(Finding("Z", "warning", "stale", "model-00004-of-00004.safetensors", None, "safe",
                            E.RetireFile("model-00004-of-00004.safetensors")))
    plan = make_plan(ckpt, findings)
    assert list(plan.shards) == [shard] and plan.shards[shard].drop == set(leaked)
    assert plan.retire == ["model-00004-of-00004.safetensors"]
    idx = json.loads(plan.json_files["model.safetensors.index.json"])
    assert not set(leaked) & set(idx["weight_map"])
    assert "model-00004-of-00004.safetensors" not in idx["weight_map"].values()
    assert any("retire" in line for line in plan.describe())
    with pytest.raises(FixRefused, match="cannot be fixed safely"):
        make_plan(ckpt, [Finding("SFT004", "error", "truncated", shard)])


def test_fix_is_cheap_to_import():
    import subprocess
    import sys
    code = "import fqcheck, fqcheck.fixer.edits, sys; print(any(m.startswith(('torch', 'transformers')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_failure_during_commit_rolls_back(sharded_llama, tmp_path, monkeypatch):
    from fqcheck.fixer import durable, transaction
    d = sharded_llama
    damage(d)
    before = state(d)
    real, calls = durable.move, []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 4:  # two files already swapped in, then the disk says no
            raise OSError(28, "No space left on device")
        real(src, dst)
    monkeypatch.setattr(transaction, "move", flaky)
    with pytest.raises(FixError, match="No space left on device.*rolled back"):
        fix(d, rules_dirs=[leak_rules(tmp_path / "rules")])
    monkeypatch.setattr(transaction, "move", real)
    assert state(d) == before
    assert not [n for n in os.listdir(d) if n.startswith(".fqcheck-tmp")]
    assert not (d / BACKUP_DIR).exists()


def test_single_file_path(tiny_llama):
    p = tiny_llama / "model.safetensors"
    before = state(tiny_llama)["model.safetensors"]
    strip_metadata(p)
    res = fix(p)
    assert res.written == ["model.safetensors"] and res.remaining.findings == []
    assert state(tiny_llama)["model.safetensors"] == before
    loads_cleanly(tiny_llama)


def test_restore_without_backup_is_a_clear_error(sharded_llama):
    strip_metadata(sorted(sharded_llama.glob("*.safetensors"))[0])
    fix(sharded_llama, backup=False)
    out = run_cli("restore", sharded_llama)
    assert out.returncode == 2 and out.stderr.startswith("fqcheck: ") and "no backup" in out.stderr


def test_failing_producer_rolls_back(tiny_llama):
    d = tiny_llama
    strip_metadata(d / "model.safetensors")
    ckpt = Checkpoint.open(d)
    before = files_stat(d)

    def boom(raw):
        raise RuntimeError("CUDA error: out of memory")
    t = "model.layers.0.mlp.up_proj.weight"
    findings = [Finding("Y", "error", "refold", "model.safetensors", t, "safe", E.ReplaceTensor("model.safetensors", t, boom))]
    plan = make_plan(ckpt, findings)
    from fqcheck.fixer.transaction import Transaction
    from fqcheck.fixer.runner import _write_new_files
    tx = Transaction(d)
    with pytest.raises(OSError, match="computing the new data failed: RuntimeError: CUDA error"):
        try:
            _write_new_files(ckpt, plan, tx.new_file, tx.finish_file, tx.write_file)
        except BaseException:
            tx.abort()
            raise
    assert files_stat(d) == before and sorted(os.listdir(d)) == sorted(before)


def test_planner_refuses_to_lose_last_copy(sharded_llama):
    d = sharded_llama
    shards = sorted(d.glob("*.safetensors"))
    stale = d / "model-00001-of-00002.safetensors"
    shutil.copy(shards[0], stale)  # an earlier export's shard holding the same tensors
    ckpt = Checkpoint.open(d)
    t = next(iter(ckpt.header(shards[0].name).tensors))
    bad = [Finding("A", "error", "dup", shards[0].name, t, "safe", E.DropTensor(shards[0].name, t)),
           Finding("B", "error", "stale", stale.name, None, "safe", E.RetireFile(stale.name))]
    with pytest.raises(FixRefused, match="would be lost"):
        make_plan(ckpt, bad)
    good = [Finding("A", "error", "dup", stale.name, t, "safe", E.DropTensor(stale.name, t)), bad[1]]
    assert make_plan(ckpt, good).retire == [stale.name]


def test_output_from_hf_cache_holds_real_files(sharded_llama, tmp_path):
    strip_metadata(sorted(sharded_llama.glob("*.safetensors"))[0])
    repo, (rev1, _) = hf_cache(tmp_path, sharded_llama)
    blobs_before = files_stat(repo / "blobs")
    out = tmp_path / "copy"
    res = fix(rev1, output=out)
    assert res.remaining.findings == [] and files_stat(repo / "blobs") == blobs_before
    assert all((rev1 / n).is_symlink() for n in os.listdir(rev1))
    assert not any((out / n).is_symlink() for n in os.listdir(out))
    loads_cleanly(out)

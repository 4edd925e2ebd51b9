"""fix end to end with the built-in fixable rules (QNT001, IDX*, CFG002, QNT002) on real damaged
exports: the fixed checkpoint loads in transformers, and every tensor not meant to change keeps its bytes."""
import json
import shutil

import pytest

from builders import leak_quantizer_state, read_config, read_index, write_config, write_index
from fixhelp import loads_cleanly, run_cli, state
from builders import load_shard, save_shard
from fqcheck.api import fix
from fqcheck.fixer.runner import FixRefused



def tensors(st: dict) -> dict:
    """name -> (dtype, shape, bytes) over all shards, wherever a tensor is stored."""
    return {k: v for f, t in st.items() if f.endswith(".safetensors") for k, v in t.items() if k != "__metadata__"}


def test_qnt001_leak_dropped(sharded_llama):
    d = sharded_llama
    before = tensors(state(d))
    clean_index = read_index(d)
    leaked = leak_quantizer_state(d, modules=("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"))
    res = fix(d)
    assert {f.code for f in res.applied} >= {"QNT001"}
    assert {f.tensor for f in res.applied if f.code == "QNT001"} == set(leaked)
    assert res.remaining.findings == []
    assert tensors(state(d)) == before
    assert read_index(d) == clean_index
    loads_cleanly(d)


def test_stale_shard_retired(sharded_llama):
    d = sharded_llama
    before = state(d)
    stale = d / "model-00001-of-00002.safetensors"
    shutil.copy(sorted(d.glob("*.safetensors"))[0], stale)
    res = fix(d)
    assert stale.name in res.retired and not stale.exists()
    assert (d / res.backup / stale.name).exists()
    assert state(d) == before
    loads_cleanly(d)


def test_broken_index_rebuilt(sharded_llama):
    d = sharded_llama
    before = state(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    res = fix(d)
    assert "model.safetensors.index.json" in res.written and res.remaining.findings == []
    assert tensors(state(d)) == tensors(before)
    assert json.loads(state(d)["model.safetensors.index.json"])["weight_map"] == \
        json.loads(before["model.safetensors.index.json"])["weight_map"]
    loads_cleanly(d)


def test_index_missing_entry_and_wrong_total_rebuilt(sharded_llama):
    d = sharded_llama
    idx = read_index(d)
    clean = json.loads(json.dumps(idx))
    idx["weight_map"].pop("model.norm.weight")
    idx["metadata"]["total_size"] = 1
    write_index(d, idx)
    res = fix(d)
    assert res.remaining.findings == []
    assert read_index(d) == clean
    loads_cleanly(d)


def test_auto_map_with_missing_code_dropped(sharded_llama):
    d = sharded_llama
    cfg = read_config(d)
    clean = dict(cfg)
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    write_config(d, cfg)
    out = run_cli("fix", d)
    assert out.returncode == 0, out.stdout + out.stderr
    assert read_config(d) == clean
    loads_cleanly(d)


def test_deep_fix_refolds_and_drops_leak_in_one_pass(tmp_path):
    fqbuild = pytest.importorskip("fqbuild")
    raw = "model.layers.1.mlp.down_proj.weight"
    d = fqbuild.fq_export(tmp_path / "x", unfolded={raw}, shards=3)
    before = tensors(state(d))
    res = fix(d, deep=True, device="cpu")
    assert {"QNT001", "QNT002"} <= {f.code for f in res.applied}
    assert res.remaining.findings == []
    after = tensors(state(d))
    assert set(before) - set(after) == {k for k in before if k.endswith("_quantizer._amax")}
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {raw}  # only the re-folded weight changed; everything else byte-identical
    loads_cleanly(d)


def test_missing_index_rebuilt(sharded_llama):
    d = sharded_llama
    before, saved = tensors(state(d)), read_index(d)
    (d / "model.safetensors.index.json").unlink()
    res = fix(d)
    assert [f.code for f in res.applied] == ["IDX001"] and res.remaining.findings == []
    rebuilt = read_index(d)  # what save_pretrained wrote, less transformers 5's total_parameters
    assert rebuilt["weight_map"] == saved["weight_map"]
    assert rebuilt["metadata"]["total_size"] == saved["metadata"]["total_size"]
    assert tensors(state(d)) == before
    loads_cleanly(d)


def test_entry_pointing_at_the_wrong_shard_rebuilt(sharded_llama):
    d = sharded_llama
    before = state(d)
    idx = read_index(d)
    shards = sorted(set(idx["weight_map"].values()))
    t = next(k for k, f in idx["weight_map"].items() if f == shards[0])
    idx["weight_map"][t] = shards[1]
    write_index(d, idx)
    res = fix(d)
    assert [(f.code, f.tensor) for f in res.applied] == [("IDX004", t)] and res.remaining.findings == []
    assert state(d) == before
    loads_cleanly(d)


def _duplicate(d, change: bool = False) -> tuple[str, str]:
    """Copy one tensor of the last shard into the first (optionally with other values)."""
    idx = read_index(d)
    first, last = sorted(set(idx["weight_map"].values()))[::2]
    t = next(k for k, f in idx["weight_map"].items() if f == last)
    src, dst = load_shard(d / last), load_shard(d / first)
    dst[t] = src[t] + 1 if change else src[t]
    save_shard(d / first, dst)
    return t, first


def test_identical_duplicate_dropped_from_the_shard_the_index_does_not_name(sharded_llama):
    d = sharded_llama
    before = tensors(state(d))
    t, where = _duplicate(d)
    res = fix(d)
    assert [(f.code, f.file, f.tensor) for f in res.applied if f.code == "IDX006"] == [("IDX006", where, t)]
    assert res.remaining.findings == [] and tensors(state(d)) == before
    loads_cleanly(d)


def test_differing_duplicate_is_refused_and_nothing_changes(sharded_llama):
    d = sharded_llama
    _duplicate(d, change=True)
    damaged = state(d)
    with pytest.raises(FixRefused, match="IDX006"):
        fix(d)
    assert state(d) == damaged and not (d / ".fqcheck" / "backup").exists()

"""fix end to end with the built-in fixable rules (QNT001, IDX*, CFG002) on real damaged exports.
Each test runs once its rule is in the catalog (the rules land from other branches)."""
import json
import shutil

import pytest

from builders import leak_quantizer_state, read_config, read_index, write_config, write_index
from fixhelp import loads_cleanly, run_cli, state
from fqcheck.catalog import load_catalog
from fqcheck.fix.runner import fix


def needs(*codes):
    have = set(load_catalog())
    missing = [c for c in codes if c not in have]
    return pytest.mark.skipif(bool(missing), reason=f"rules not on this branch yet: {missing}")


def tensors(st: dict) -> dict:
    """name -> (dtype, shape, bytes) over all shards, wherever a tensor is stored."""
    return {k: v for f, t in st.items() if f.endswith(".safetensors") for k, v in t.items() if k != "__metadata__"}


@needs("QNT001")
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


@needs("IDX008")
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


@needs("IDX002")
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


@needs("IDX005", "IDX007")
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


@needs("CFG002")
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


@needs("QNT001", "QNT002")
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

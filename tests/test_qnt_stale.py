"""Issue 13 part 4: a stale shard whose only unique content is leaked quantizer state is retired."""
import torch

from builders import load_shard, save_shard
from fqcheck.api import lint
import fqcheck

STALE = "model-00001-of-00009.safetensors"  # left by an earlier export with another shard count
AMAX = "model.layers.0.self_attn.q_proj.input_quantizer._amax"


def stale_shard(d, extra):
    first = load_shard(sorted(d.glob("model-*.safetensors"))[0])
    two = dict(list(first.items())[:2])  # two weights the indexed shards also hold
    save_shard(d / STALE, {**two, **extra})
    return sorted(two)


def test_stale_shard_holding_only_leaked_state_beyond_indexed_weights_is_retired(sharded_llama):
    d = sharded_llama
    stale_shard(d, {AMAX: torch.tensor(2.5)})
    before = (d / STALE).read_bytes()
    r = lint(d)
    assert sorted((f.code, f.file, f.tensor) for f in r.findings) == [("IDX008", STALE, None), ("QNT001", STALE, AMAX)]
    [f] = [f for f in r.findings if f.code == "IDX008"]
    assert f.fixable == "safe" and "leaked quantizer state (1 tensor, e.g. " + AMAX in f.message
    res = fqcheck.fix(d)
    assert res.ok and res.retired == [STALE] and not (d / STALE).exists()
    assert (d / res.backup / STALE).read_bytes() == before  # retired into the backup, not deleted
    assert lint(d).findings == []


def test_stale_shard_with_a_weight_of_its_own_is_still_refused(sharded_llama):
    d = sharded_llama
    stale_shard(d, {AMAX: torch.tensor(2.5), "model.layers.9.mlp.down_proj.weight": torch.ones(2, 2)})
    [f] = [f for f in lint(d).findings if f.code == "IDX008"]
    assert f.fixable == "no" and "holds 2 tensors that no named shard holds" in f.message

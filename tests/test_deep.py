"""Deep rules (TEN002, TEN003, TEN005, TEN004's deep half) on real tiny checkpoints, damaged."""
import struct

import pytest
import torch

from builders import load_shard, raw_safetensors, read_config, save_shard, save_tiny_model, write_config
from fqcheck.api import lint
from fqcheck.checkpoint import Checkpoint
from fqcheck.deep import scan, tied_embedding_hits
from fqcheck.fixer.edits import DropTensor

SHARD = "model.safetensors"
Q = "model.layers.0.self_attn.q_proj.weight"
DEEP = ["TEN002", "TEN003", "TEN005"]


def deep_findings(d, codes=DEEP):
    return [(f.code, f.file, f.tensor) for f in lint(d, deep=True, select=codes).findings]


def edit(d, fn, name=SHARD):
    tensors = load_shard(d / name)
    fn(tensors)
    save_shard(d / name, tensors)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ten003_nan_and_inf_counted_exactly(tiny_llama, dtype):
    def damage(t):
        w = t[Q].to(dtype)
        w.view(-1)[[3, 77, 500]] = float("nan")
        w.view(-1)[10] = float("-inf")
        t[Q] = w
    edit(tiny_llama, damage)
    r = lint(tiny_llama, deep=True, select=DEEP)
    [f] = r.findings
    assert (f.code, f.file, f.tensor, f.severity) == ("TEN003", SHARD, Q, "error")
    assert f.message.startswith("3 NaN and 1 Inf in 1024 ")


def test_deep_rules_do_not_run_without_deep(tiny_llama):
    edit(tiny_llama, lambda t: t[Q].view(-1).__setitem__(0, float("nan")))
    r = lint(tiny_llama)
    assert not set(r.rules_run) & set(DEEP)
    assert r.findings == []
    assert [f.code for f in lint(tiny_llama, deep=True).findings] == ["TEN003"]


def test_nan_at_chunk_edge_in_tensor_spanning_many_chunks(tiny_llama):
    # q_proj: 1024 bf16 = 2048 bytes; 64-byte chunks -> 32 chunks; NaN/Inf on both sides of edges.
    def damage(t):
        flat = t[Q].view(-1)
        flat[31] = float("nan")   # last element of chunk 0
        flat[32] = float("inf")   # first element of chunk 1
        flat[1023] = float("nan")  # last element of the tensor
    edit(tiny_llama, damage)
    stats = scan(Checkpoint.open(tiny_llama), chunk_bytes=64).stats
    s = stats[(SHARD, Q)]
    assert (s.nan, s.inf) == (2, 1)
    assert sum(x.nonfinite for x in stats.values()) == 3
    # chunk size does not change any result
    big = scan(Checkpoint.open(tiny_llama)).stats
    assert {k: (v.nonfinite, v.inf, v.all_zero, v.fingerprint) for k, v in stats.items()} == \
           {k: (v.nonfinite, v.inf, v.all_zero, v.fingerprint) for k, v in big.items()}


def test_f8_and_f16_non_finite_encodings(tmp_path):
    t = {
        "a.weight": torch.tensor([0x7F, 0xFF, 0x01, 0x7E], dtype=torch.uint8).view(torch.float8_e4m3fn),
        "b.weight": torch.tensor([0x7C, 0xFC, 0x7D, 0x7B], dtype=torch.uint8).view(torch.float8_e5m2),
        "c.weight": torch.tensor([float("inf"), 1.0, float("nan"), -0.0], dtype=torch.float16),
        "d.weight": torch.tensor([1, 2, 3], dtype=torch.int32),
        "e.weight": torch.tensor([float("nan"), -float("inf"), 0.0], dtype=torch.float64),
        "f.weight_scale": torch.tensor([0xFF, 0x7F, 0x00], dtype=torch.uint8).view(torch.float8_e8m0fnu),
    }
    save_shard(tmp_path / SHARD, t)
    st = scan(Checkpoint.open(tmp_path), progress=True).stats  # the bar runs (to a non-TTY here)
    got = {k[1]: (s.nan, s.inf, s.dtype) for k, s in st.items()}
    assert got == {"a.weight": (2, 0, "F8_E4M3"), "b.weight": (1, 2, "F8_E5M2"), "c.weight": (1, 1, "F16"),
                   "d.weight": (0, 0, "I32"), "e.weight": (1, 1, "F64"), "f.weight_scale": (1, 0, "F8_E8M0")}
    assert st[(SHARD, "d.weight")].all_zero is None and st[(SHARD, "f.weight_scale")].all_zero is None
    [f] = [f for f in lint(tmp_path, deep=True, select=["TEN003"]).findings if f.tensor == "b.weight"]
    assert f.message == "1 NaN and 2 Inf in 4 F8_E5M2 values"


def test_ten005_zeroed_weight_with_negative_zeros(tiny_llama):
    def damage(t):
        z = torch.zeros_like(t[Q])
        z.view(-1)[::7] = -0.0
        t[Q] = z
    edit(tiny_llama, damage)
    r = lint(tiny_llama, deep=True, select=DEEP)
    [f] = r.findings
    assert (f.code, f.file, f.tensor, f.severity) == ("TEN005", SHARD, Q, "warning")
    assert "all 1024 BF16 values are zero" in f.message


def test_ten005_ignores_zero_bias_and_norm(tiny_llama):
    def damage(t):
        t["model.norm.weight"] = torch.zeros_like(t["model.norm.weight"])
        t["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32, dtype=torch.bfloat16)
    edit(tiny_llama, damage)
    assert deep_findings(tiny_llama) == []


def test_ten002_duplicate_under_another_name(tiny_llama):
    edit(tiny_llama, lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.weight", t[Q].clone()))
    r = lint(tiny_llama, deep=True, select=DEEP)
    [f] = r.findings
    assert (f.code, f.file, f.tensor, f.severity, f.fixable) == \
           ("TEN002", SHARD, "model.layers.1.self_attn.q_proj.weight", "warning", "no")
    assert f"same bytes as {Q}" in f.message and f.fix is None


def test_ten002_across_shards(sharded_llama):
    names = sorted(p.name for p in sharded_llama.glob("*.safetensors"))
    a, b = load_shard(sharded_llama / names[0]), load_shard(sharded_llama / names[-1])
    src = next(k for k, v in a.items() if v.dim() == 2)
    b["copy.weight"] = a[src].clone()
    save_shard(sharded_llama / names[-1], b)
    assert deep_findings(sharded_llama, ["TEN002"]) == [("TEN002", names[-1], "copy.weight")]


def test_ten002_samples_collide_but_bytes_differ(tmp_path):
    # Equal everywhere except one byte the fingerprint's samples miss: confirmed by a full hash.
    a = torch.randn(512, 512, dtype=torch.bfloat16)
    b = a.clone()
    b.view(-1)[12345] += 1
    save_shard(tmp_path / SHARD, {"a.weight": a, "b.weight": b, "c.weight": a.clone()})
    ck = Checkpoint.open(tmp_path)
    s = scan(ck).stats
    assert s[(SHARD, "a.weight")].fingerprint == s[(SHARD, "b.weight")].fingerprint
    assert deep_findings(tmp_path) == [("TEN002", SHARD, "c.weight")]


def tied_with_lm_head(d, head):
    save_tiny_model(d, tie=True)
    t = load_shard(d / SHARD)
    assert "lm_head.weight" not in t  # save_pretrained stores a tied head once
    t["lm_head.weight"] = head(t["model.embed_tokens.weight"])
    save_shard(d / SHARD, t)
    return d


def test_ten002_tied_copy_is_safely_fixable(tmp_path):
    d = tied_with_lm_head(tmp_path / "m", lambda e: e.clone())
    [f] = lint(d, deep=True, select=DEEP).findings
    assert (f.code, f.tensor, f.fixable) == ("TEN002", "lm_head.weight", "safe")
    assert f.fix == DropTensor(SHARD, "lm_head.weight")
    assert tied_embedding_hits(Checkpoint.open(d)) == []


def test_ten002_same_pair_untied_is_not_fixable(tmp_path):
    d = tied_with_lm_head(tmp_path / "m", lambda e: e.clone())
    cfg = read_config(d)
    cfg["tie_word_embeddings"] = False
    write_config(d, cfg)
    [f] = lint(d, deep=True, select=DEEP).findings
    assert (f.code, f.tensor, f.fixable, f.fix) == ("TEN002", "lm_head.weight", "no", None)


def test_ten004_tied_but_lm_head_differs(tmp_path):
    d = tied_with_lm_head(tmp_path / "m", lambda e: e.clone() * 2)
    [h] = tied_embedding_hits(Checkpoint.open(d))
    assert (h.file, h.tensor) == (SHARD, "lm_head.weight")
    assert "differs from model.embed_tokens.weight" in h.message and "same shape" in h.message
    assert deep_findings(d) == []


def test_ten004_untied_lm_head_differs_is_fine(tmp_path):
    d = save_tiny_model(tmp_path / "m", tie=False)
    assert "lm_head.weight" in load_shard(d / SHARD)
    assert tied_embedding_hits(Checkpoint.open(d)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tie", [False, True])
def test_clean_save_pretrained_has_no_deep_findings(tmp_path, dtype, tie):
    d = save_tiny_model(tmp_path / "m", dtype=dtype, tie=tie)
    r = lint(d, deep=True)
    assert {"TEN002", "TEN003", "TEN005"} <= set(r.rules_run)
    assert r.findings == []
    assert tied_embedding_hits(Checkpoint.open(d)) == []


def test_unreadable_shard_is_skipped(tiny_llama):
    p = tiny_llama / SHARD
    p.write_bytes(p.read_bytes()[:-100])  # SFT004: truncated
    assert scan(Checkpoint.open(tiny_llama)).stats == {}
    assert [f.code for f in lint(tiny_llama, deep=True).findings] == ["SFT004"]


def test_scan_is_memoised_per_checkpoint(tiny_llama):
    ck = Checkpoint.open(tiny_llama)
    assert scan(ck) is scan(ck)
    assert scan(Checkpoint.open(tiny_llama)) is not scan(ck)


@pytest.mark.parametrize("model_type", ["qwen2", "gpt2"])
def test_clean_models_with_biases_and_layernorms_have_no_deep_findings(tmp_path, model_type):
    # zero biases (qwen2 q/k/v, gpt2 everywhere) and LayerNorm weights of ones repeat by design;
    # hidden 512 makes them >= 1 KiB so the size floor alone would not hide them
    d = save_tiny_model(tmp_path / "m", model_type, hidden_size=512, intermediate_size=1024)
    assert lint(d, deep=True, select=DEEP).findings == []


def test_invalid_entry_is_skipped_not_crashed(tmp_path):
    # SFT002: 13 bytes cannot hold F32 values; the deep pass skips the entry, reads the rest
    nan = struct.pack("<f", float("nan"))
    hdr = {"__metadata__": {"format": "pt"},
           "bad.weight": {"dtype": "F32", "shape": [3], "data_offsets": [0, 13]},
           "odd.weight": {"dtype": "F32", "shape": [2], "data_offsets": [13, 21]}}  # unaligned start
    raw_safetensors(tmp_path / SHARD, hdr, b"\0" * 13 + nan + struct.pack("<f", 1.0))
    r = lint(tmp_path, deep=True, select=["SFT", "TEN"])
    assert [(f.code, f.tensor) for f in r.findings] == [("SFT002", "bad.weight"), ("TEN003", "odd.weight")]


def test_aliased_entries_are_sft003_not_ten002(tmp_path):
    hdr = {"__metadata__": {"format": "pt"},
           "a.weight": {"dtype": "F32", "shape": [32, 32], "data_offsets": [0, 4096]},
           "b.weight": {"dtype": "F32", "shape": [32, 32], "data_offsets": [0, 4096]}}
    raw_safetensors(tmp_path / SHARD, hdr, torch.randn(32, 32).numpy().tobytes())
    assert [f.code for f in lint(tmp_path, deep=True, select=["SFT", "TEN"]).findings] == ["SFT003"]


def test_memo_does_not_keep_checkpoints_alive(tiny_llama):
    import gc
    import weakref

    ck = Checkpoint.open(tiny_llama)
    first = scan(ck)
    assert scan(ck) is first  # memoised on the checkpoint: one pass per run
    gone = weakref.ref(ck)
    del ck, first
    gc.collect()
    assert gone() is None

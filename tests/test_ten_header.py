"""TEN001 (meta tensors in pickles) and the header half of TEN004 (tied embeddings) on real saves."""
import torch

from builders import load_shard, read_config, save_shard, save_tiny_model, write_config
from fqcheck.api import lint
from fqcheck.checkpoint import STATE_NAME


def codes(report, code=None):
    return [(f.code, f.file, f.tensor) for f in report.findings if code is None or f.code == code]


def offloaded_state_dict(model_dir):
    """A tiny Llama's state dict with layer 1 'offloaded': accelerate's hooks leave those
    parameters on the meta device, and state_dict() returns them as meta tensors (PR 1194)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    sd = model.state_dict()
    meta = sorted(k for k in sd if k.startswith("model.layers.1."))
    for k in meta:
        sd[k] = torch.empty_like(sd[k], device="meta")
    return sd, meta


def test_ten001_meta_tensors_in_pytorch_model_bin(tiny_llama):
    sd, meta = offloaded_state_dict(tiny_llama)
    torch.save(sd, tiny_llama / "pytorch_model.bin")
    r = lint(tiny_llama, select=["TEN001"])
    [f] = r.findings
    assert (f.code, f.file, f.severity, f.fixable) == ("TEN001", "pytorch_model.bin", "error", "no")
    assert f.message.startswith(f"{len(meta)} meta tensor(s)")
    assert meta[0] in f.message and "Cannot copy out of meta tensor" in f.message


def test_ten001_meta_parameter_in_state_file_names_key(tmp_path):
    # one meta Parameter (as nn.Module.state_dict(keep_vars=True) gives): the key is recovered
    state = {"model.layers.0.mlp.down_proj.weight_quantizer": {"_amax": torch.nn.Parameter(
        torch.empty(4, device="meta"), requires_grad=False)}, "version": 1}
    torch.save(state, tmp_path / STATE_NAME)
    r = lint(tmp_path / STATE_NAME, select=["TEN001"])
    assert codes(r) == [("TEN001", STATE_NAME, "_amax")]
    assert torch.load(tmp_path / STATE_NAME, weights_only=True)["model.layers.0.mlp.down_proj.weight_quantizer"]["_amax"].is_meta


def test_ten001_legacy_format(tmp_path):
    torch.save({"w": torch.empty(3, device="meta"), "b": torch.ones(3)}, tmp_path / "model.pt",
               _use_new_zipfile_serialization=False)
    assert codes(lint(tmp_path, select=["TEN001"])) == [("TEN001", "model.pt", "w")]


def test_ten001_clean_state_dict(tiny_llama):
    from transformers import AutoModelForCausalLM
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict(), tiny_llama / "pytorch_model.bin")
    assert codes(lint(tiny_llama, select=["TEN001", "PKL001"])) == []


def test_ten004_untied_and_lm_head_missing(tiny_llama):
    shard = tiny_llama / "model.safetensors"
    t = load_shard(shard)
    del t["lm_head.weight"]
    save_shard(shard, t)
    cfg = read_config(tiny_llama)
    assert cfg["tie_word_embeddings"] is False
    r = lint(tiny_llama, select=["TEN004"])
    assert codes(r) == [("TEN004", "config.json", "lm_head.weight")]
    assert "randomly initialised" in r.findings[0].message


def test_ten004_tie_flag_flipped_and_lm_head_removed(tmp_path):
    # a tied model (no lm_head stored) whose config lost the tie flag on export
    d = save_tiny_model(tmp_path / "m", tie=True)
    assert "lm_head.weight" not in load_shard(d / "model.safetensors")
    assert codes(lint(d, select=["TEN004"])) == []
    cfg = read_config(d)
    cfg["tie_word_embeddings"] = False
    write_config(d, cfg)
    assert codes(lint(d, select=["TEN004"])) == [("TEN004", "config.json", "lm_head.weight")]


def test_ten004_tied_but_stored_head_differs(tmp_path):
    d = save_tiny_model(tmp_path / "m", tie=True)
    t = load_shard(d / "model.safetensors")
    t["lm_head.weight"] = t["model.embed_tokens.weight"][:, :16].float()
    save_shard(d / "model.safetensors", t)
    r = lint(d, select=["TEN004"])
    assert codes(r) == [("TEN004", "model.safetensors", "lm_head.weight")]
    assert "F32 [128, 16]" in r.findings[0].message and "BF16 [128, 32]" in r.findings[0].message


def test_ten004_tied_same_shape_head_is_left_to_deep(tmp_path):
    d = save_tiny_model(tmp_path / "m", tie=True)
    t = load_shard(d / "model.safetensors")
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    save_shard(d / "model.safetensors", t)
    assert codes(lint(d, select=["TEN004"])) == []
    # with --deep the byte comparison is handed to fqcheck.deep (when installed): equal bytes, no hit
    assert codes(lint(d, select=["TEN004"], deep=True)) == []


def test_ten_clean(tiny_llama):
    assert codes(lint(tiny_llama, select=["TEN"])) == []


def test_ten_clean_sharded(sharded_llama):
    assert codes(lint(sharded_llama, select=["TEN"])) == []

"""ARC rules: checkpoints saved by transformers, then damaged, against the meta-device model."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from builders import (edit_shard, leak_quantizer_state, load_shard, read_config, read_index, save_tiny_model, write_config)
from fqcheck.api import lint
from fqcheck.checks.arc import build_meta_model
from fqcheck.fixer.edits import DropTensor

_BUILT: dict = {}
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)


def model_copy(factory, tmp_path, model_type="llama", **kw) -> Path:
    key = (model_type, tuple(sorted(kw.items())))
    if key not in _BUILT:
        _BUILT[key] = save_tiny_model(factory.mktemp("arc-base") / "m", model_type, **kw)
    dst = tmp_path / "ckpt"
    shutil.copytree(_BUILT[key], dst)
    return dst


def arc(path):
    return lint(path, select=["ARC"], arch=True)


def found(report):
    return [(f.code, f.file, f.tensor) for f in report.findings]


def shard_of(d: Path, tensor: str) -> str:
    idx = d / "model.safetensors.index.json"
    return read_index(d)["weight_map"][tensor] if idx.exists() else "model.safetensors"


@pytest.mark.parametrize("model_type,kw", [
    ("llama", {}), ("qwen2", {}), ("qwen3", {}), ("mistral", {}), ("llama", {"tie": True}),
    ("qwen2", {"tie": True}), ("llama", {"shards": 3}), ("qwen3_moe", MOE), ("mixtral", {"num_local_experts": 4}),
])
def test_clean_save_pretrained_has_no_arc_findings(tmp_path_factory, tmp_path, model_type, kw):
    d = model_copy(tmp_path_factory, tmp_path, model_type, **kw)
    r = lint(d, arch=True)
    assert {"ARC001", "ARC002", "ARC003"} <= set(r.rules_run)
    assert r.findings == []


def test_arc_rules_run_by_default_and_build_the_model_only_with_arch(tmp_path_factory, tmp_path):
    # the header half runs on every lint (tests/test_arc_header.py); --arch / --deep add the build,
    # whose message names the model class
    d = model_copy(tmp_path_factory, tmp_path, "llama")
    name = "model.layers.1.mlp.down_proj.weight"
    edit_shard(d, fname="model.safetensors", change=lambda t: t.pop(name))
    for kw in ({}, {"arch": True}, {"deep": True}):
        r = lint(d, select=["ARC"], **kw)
        assert {"ARC001", "ARC002", "ARC003"} <= set(r.rules_run)
        assert [(f.code, f.tensor) for f in r.findings] == [("ARC002", name)]
        assert ("LlamaForCausalLM" in r.findings[0].message) == bool(kw)


def test_arc001_extra_tensor_in_shard_and_index(tmp_path_factory, tmp_path):
    d = model_copy(tmp_path_factory, tmp_path, "llama", shards=3)
    fname = shard_of(d, "model.layers.1.mlp.up_proj.weight")
    name = "model.layers.1.mlp.extra_proj.weight"
    edit_shard(d, fname=fname, change=lambda t: t.__setitem__(name, torch.zeros(4, 32, dtype=torch.bfloat16)))
    r = arc(d)
    assert found(r) == [("ARC001", fname, name)]
    f = r.findings[0]
    assert (f.severity, f.fixable, f.fix) == ("error", "safe", DropTensor(fname, name))
    assert "LlamaForCausalLM" in f.message and "unexpected" in f.message



def test_arc001_fixed_by_dropping_the_tensor_from_shard_and_index(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    import fqcheck
    d = model_copy(tmp_path_factory, tmp_path, "llama", shards=3)
    before = {f: load_shard(d / f) for f in sorted(set(read_index(d)["weight_map"].values()))}
    index = read_index(d)
    fname = shard_of(d, "model.layers.1.mlp.up_proj.weight")
    name = "model.layers.1.mlp.extra_proj.weight"
    edit_shard(d, fname=fname, change=lambda t: t.__setitem__(name, torch.zeros(4, 32, dtype=torch.bfloat16)))
    res = fqcheck.fix(d, select=["ARC"], arch=True, backup=False)
    assert [(f.code, f.tensor) for f in res.applied] == [("ARC001", name)] and res.ok
    assert read_index(d) == index
    for f, tensors in before.items():
        after = load_shard(d / f)
        assert after.keys() == tensors.keys()
        assert all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) for k, v in tensors.items())
    _, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]

def test_arc002_tensor_removed(tmp_path_factory, tmp_path):
    d = model_copy(tmp_path_factory, tmp_path, "llama", shards=3)
    name = "model.layers.1.mlp.down_proj.weight"
    edit_shard(d, fname=shard_of(d, name), change=lambda t: t.pop(name))
    r = arc(d)
    assert found(r) == [("ARC002", "config.json", name)]
    assert "expected shape [32, 64]" in r.findings[0].message
    assert r.findings[0].fixable == "no"


def test_arc002_expert_removed_named_as_saved(tmp_path_factory, tmp_path):
    # transformers fuses experts on load; the finding names the per-expert tensor save_pretrained writes.
    d = model_copy(tmp_path_factory, tmp_path, "qwen3_moe", **MOE)
    name = "model.layers.0.mlp.experts.2.up_proj.weight"
    edit_shard(d, fname="model.safetensors", change=lambda t: t.pop(name))
    assert found(arc(d)) == [("ARC002", "config.json", name)]


def test_arc001_expert_beyond_num_experts(tmp_path_factory, tmp_path):
    d = model_copy(tmp_path_factory, tmp_path, "qwen3_moe", **MOE)
    name = "model.layers.1.mlp.experts.4.down_proj.weight"
    edit_shard(d, fname="model.safetensors", change=lambda t: t.__setitem__(name, t["model.layers.1.mlp.experts.3.down_proj.weight"].clone()))
    assert found(arc(d)) == [("ARC001", "model.safetensors", name)]


def test_fused_expert_layout_loads_too(tmp_path_factory, tmp_path):
    # transformers 5 loads the fused layout (save_original_format=False) as well as the per-expert one.
    d = model_copy(tmp_path_factory, tmp_path, "qwen3_moe", **MOE)

    def fuse(t):
        for layer in (0, 1):
            p = f"model.layers.{layer}.mlp.experts"
            gate = [t.pop(f"{p}.{e}.gate_proj.weight") for e in range(4)]
            up = [t.pop(f"{p}.{e}.up_proj.weight") for e in range(4)]
            down = [t.pop(f"{p}.{e}.down_proj.weight") for e in range(4)]
            t[f"{p}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
            t[f"{p}.down_proj"] = torch.stack(down)
    edit_shard(d, fname="model.safetensors", change=fuse)
    assert found(arc(d)) == []
    edit_shard(d, fname="model.safetensors", change=lambda t: t.__setitem__(
        "model.layers.0.mlp.experts.down_proj", t["model.layers.0.mlp.experts.down_proj"][:3].clone()))
    assert found(arc(d)) == [("ARC003", "model.safetensors", "model.layers.0.mlp.experts.down_proj")]


def test_arc003_wrong_shape(tmp_path_factory, tmp_path):
    d = model_copy(tmp_path_factory, tmp_path, "qwen2")
    name = "model.layers.0.self_attn.k_proj.weight"
    edit_shard(d, fname="model.safetensors", change=lambda t: t.__setitem__(name, torch.zeros(8, 32, dtype=torch.bfloat16)))
    r = arc(d)
    assert found(r) == [("ARC003", "model.safetensors", name)]
    assert "has shape [8, 32]" in r.findings[0].message and "expects [16, 32]" in r.findings[0].message


def test_arc003_config_disagrees_with_weights(tmp_path_factory, tmp_path):
    d = model_copy(tmp_path_factory, tmp_path, "llama")
    cfg = read_config(d)
    cfg["vocab_size"] = 130
    write_config(d, cfg)
    assert found(arc(d)) == [("ARC003", "model.safetensors", "lm_head.weight"),
                             ("ARC003", "model.safetensors", "model.embed_tokens.weight")]


def test_tied_model_with_only_lm_head_stored_loads(tmp_path_factory, tmp_path):
    # transformers ties symmetrically: either of the pair is enough.
    d = model_copy(tmp_path_factory, tmp_path, "llama", tie=True)
    edit_shard(d, fname="model.safetensors", change=lambda t: t.__setitem__("lm_head.weight", t.pop("model.embed_tokens.weight")))
    assert found(arc(d)) == []


def _fp8_layout(tensors, packed=False):
    for n in [n for n in tensors if n.startswith("model.layers.") and n.endswith("_proj.weight")]:
        w = tensors[n]
        base = n[: -len(".weight")]
        if packed:  # NVFP4: two E2M1 values a byte, E4M3 scale per 16-element block
            tensors[n] = torch.zeros(w.shape[0], w.shape[1] // 2, dtype=torch.uint8)
            tensors[f"{base}.weight_scale"] = torch.ones(w.shape[0], w.shape[1] // 16).to(torch.float8_e4m3fn)
            tensors[f"{base}.weight_scale_2"] = torch.tensor(1.0)
        else:
            tensors[n] = w.float().to(torch.float8_e4m3fn)
            tensors[f"{base}.weight_scale"] = torch.tensor(0.01)
        tensors[f"{base}.input_scale"] = torch.tensor(0.02)
    tensors["model.layers.0.self_attn.k_scale"] = torch.tensor(1.0)
    tensors["model.layers.0.self_attn.v_scale"] = torch.tensor(1.0)


@pytest.mark.parametrize("declare", ["fp8", "compressed-tensors", "hf_quant_config"])
def test_real_quantized_fp8_layout_is_not_unexpected(tmp_path_factory, tmp_path, declare):
    d = model_copy(tmp_path_factory, tmp_path, "llama")
    edit_shard(d, fname="model.safetensors", change=_fp8_layout)
    assert {f.code for f in arc(d).findings} == {"ARC001"}  # undeclared: scales are unexpected
    if declare == "hf_quant_config":
        (d / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"}}))
    else:
        cfg = read_config(d)
        cfg["quantization_config"] = {"quant_method": declare, "activation_scheme": "static"}
        write_config(d, cfg)
    assert found(arc(d)) == []


def test_nvfp4_packed_weights_not_mis_shaped_when_declared(tmp_path_factory, tmp_path):
    d = model_copy(tmp_path_factory, tmp_path, "llama")
    edit_shard(d, fname="model.safetensors", change=lambda t: _fp8_layout(t, packed=True))
    cfg = read_config(d)
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
    write_config(d, cfg)
    assert found(arc(d)) == []
    cfg["quantization_config"] = {"quant_method": "fp8"}  # FP8 keeps shapes and has no weight_scale_2
    write_config(d, cfg)
    r = arc(d)
    assert {f.code for f in r.findings} == {"ARC001", "ARC003"}
    assert all(f.tensor.endswith(".weight_scale_2") for f in r.findings if f.code == "ARC001")
    assert all(f.tensor.endswith("_proj.weight") for f in r.findings if f.code == "ARC003")


def test_scale_on_a_module_the_model_lacks_is_unexpected(tmp_path_factory, tmp_path):
    d = model_copy(tmp_path_factory, tmp_path, "llama")
    name = "model.layers.0.self_attn.qkv_proj.weight_scale"
    edit_shard(d, fname="model.safetensors", change=lambda t: t.__setitem__(name, torch.tensor(1.0)))
    cfg = read_config(d)
    cfg["quantization_config"] = {"quant_method": "fp8"}
    write_config(d, cfg)
    assert found(arc(d)) == [("ARC001", "model.safetensors", name)]


def test_leaked_quantizer_state_is_left_to_qnt001(tiny_llama):
    assert leak_quantizer_state(tiny_llama)
    assert found(arc(tiny_llama)) == []


def test_legacy_rotary_inv_freq_is_accepted(tmp_path_factory, tmp_path):
    d = model_copy(tmp_path_factory, tmp_path, "llama")
    edit_shard(d, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(4)),
               "model.safetensors")
    assert found(arc(d)) == []


MARKER_CODE = """
from pathlib import Path
Path(__file__).with_name("MARKER").write_text("imported")
"""


@pytest.mark.parametrize("model_type", ["markernet", "llama"])
def test_remote_code_is_never_imported(tmp_path_factory, tmp_path, model_type):
    d = model_copy(tmp_path_factory, tmp_path, "llama")
    for f in ("modeling_markernet.py", "configuration_markernet.py"):
        (d / f).write_text(MARKER_CODE)
    cfg = read_config(d)
    cfg["model_type"] = model_type
    cfg["architectures"] = ["MarkerNetForCausalLM"]
    cfg["auto_map"] = {"AutoConfig": "configuration_markernet.MarkerNetConfig",
                       "AutoModelForCausalLM": "modeling_markernet.MarkerNetForCausalLM"}
    write_config(d, cfg)
    r = arc(d)
    assert not (d / "MARKER").exists()
    assert not any("markernet" in m for m in sys.modules)
    if model_type == "llama":  # a built-in model_type is built from transformers' own class
        assert found(r) == []
    else:
        [f] = r.findings
        assert (f.code, f.severity, f.file, f.tensor) == ("ARC001", "info", "config.json", None)
        assert "not checkable" in f.message and "remote code" in f.message and "markernet" in f.message


def test_no_config_is_not_checkable(tiny_llama):
    (tiny_llama / "config.json").unlink()
    [f] = arc(tiny_llama).findings
    assert (f.code, f.severity, f.file) == ("ARC001", "info", "config.json")
    assert "not checkable: no config.json" in f.message


def test_rejected_config_is_one_line_not_a_traceback(tiny_llama):
    cfg = read_config(tiny_llama)
    cfg["num_attention_heads"] = "many"
    write_config(tiny_llama, cfg)
    [f] = arc(tiny_llama).findings
    assert (f.code, f.severity) == ("ARC001", "info") and "\n" not in f.message


def test_header_only_lint_imports_neither_torch_nor_transformers(tiny_llama):
    code = textwrap.dedent(f"""
        import sys
        import fqcheck.api
        r = fqcheck.api.lint({str(tiny_llama)!r})
        assert r.findings == [], r.findings
        bad = [m for m in ("torch", "transformers") if m in sys.modules]
        print("IMPORTED", bad)
        sys.exit(1 if bad else 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stdout + out.stderr


# DeepSeek-V3 (671B) from its public config.json values; nothing downloaded.
DEEPSEEK_V3 = dict(
    model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
    num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
    n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
    max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000,
    torch_dtype="bfloat16", bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=1,
    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                         "weight_block_size": [128, 128]},
    auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
              "AutoModel": "modeling_deepseek.DeepseekV3Model",
              "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
)


def test_deepseek_v3_671b_layout_on_the_meta_device(tmp_path):
    """The real layout: per-expert FP8 weights with 128x128 block scales, the MTP layer 61 (ignored
    by transformers), one sparse shard with headers only; no ARC finding."""
    model = build_meta_model(DEEPSEEK_V3)
    assert 670e9 < sum(p.numel() for p in model.parameters()) < 672e9
    from transformers.core_model_loading import revert_weight_conversion
    layout = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, model.state_dict()).items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0

    def add(name, dtype, shape, itemsize):
        nonlocal offset
        n = itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n

    for name, shape in layout.items():
        fp8 = len(shape) == 2 and name.startswith("model.layers.") and "mlp.gate." not in name
        add(name, "F8_E4M3" if fp8 else "BF16", shape, 1 if fp8 else 2)
        if fp8:
            add(name[: -len("weight")] + "weight_scale_inv", "F32", [-(-s // 128) for s in shape], 4)
    add("model.layers.61.enorm.weight", "BF16", [7168], 2)  # MTP module: in _keys_to_ignore_on_load_unexpected
    assert len(header) > 90_000
    cfg = {k: v for k, v in DEEPSEEK_V3.items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hb = json.dumps(header).encode()
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.write(len(hb).to_bytes(8, "little") + hb)
        f.truncate(8 + len(hb) + offset)  # sparse: ~690 GB claimed, nothing written
    assert found(arc(tmp_path)) == []


def _bin_checkpoint(factory, tmp_path, drop: str | None = None) -> Path:
    """A plain torch.save(state_dict) checkpoint (pytorch_model.bin + config.json), as older exports write."""
    src = model_copy(factory, tmp_path, "llama")
    d = tmp_path / "bin"
    d.mkdir()
    state = load_shard(src / "model.safetensors")
    state.pop(drop, None)
    torch.save(state, d / "pytorch_model.bin")
    shutil.copy(src / "config.json", d / "config.json")
    return d


def test_pytorch_model_bin_checked_by_its_state_dict_shapes(tmp_path_factory, tmp_path):
    from transformers import AutoModelForCausalLM
    d = _bin_checkpoint(tmp_path_factory, tmp_path)
    _, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # transformers loads it as it is
    assert lint(d, arch=True).findings == [] and lint(d, deep=True, select=["ARC"]).findings == []


def test_pytorch_model_bin_missing_tensor_and_fix_refusal_names_files(tmp_path_factory, tmp_path):
    import fqcheck
    from fqcheck.fixer.errors import FixRefused
    name = "model.layers.1.mlp.up_proj.weight"
    d = _bin_checkpoint(tmp_path_factory, tmp_path, drop=name)
    assert found(arc(d)) == [("ARC002", "config.json", name)]
    before = (d / "pytorch_model.bin").read_bytes()
    with pytest.raises(FixRefused) as e:
        fqcheck.fix(d, arch=True, backup=False)
    assert f"config.json:{name}" in str(e.value) and " :" not in str(e.value)
    assert (d / "pytorch_model.bin").read_bytes() == before


def test_absurd_layer_count_is_not_built_and_reported(tmp_path_factory, tmp_path):
    # a 200-byte config.json with num_hidden_layers 250000 once drove --arch to 11.7 GB and MemoryError
    import time
    d = model_copy(tmp_path_factory, tmp_path, "llama")
    cfg = read_config(d)
    cfg["num_hidden_layers"] = 250000
    write_config(d, cfg)
    t = time.perf_counter()
    r = lint(d, arch=True, select=["ARC"])
    assert time.perf_counter() - t < 10
    assert [(f.code, f.severity, f.file) for f in r.findings] == [
        ("ARC002", "error", "config.json"), ("ARC001", "info", "config.json")]
    assert "249998 of the 250000 layers config.json declares" in r.findings[0].message
    assert "num_hidden_layers=250000" in r.findings[1].message and "not built" in r.findings[1].message

"""SRV001 (the config vLLM reads, and what it refuses) and exclusion matching as each loader matches."""
from __future__ import annotations

import json

import pytest

import fqcheck
from producers.headers import llama_config, model, modelopt_configs, write_checkpoint

FP8_BLOCK = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}


def findings(d, select=("SRV",)):
    return [(f.code, f.tensor, f.file, f.message) for f in fqcheck.lint(d, select=list(select)).findings]


def ckpt(tmp_path, kind, qc, hq=None, **kw):
    return write_checkpoint(tmp_path / "c", model(kind, **kw), llama_config(qc), hf_quant=hq)


@pytest.mark.parametrize("qc, expect", [
    ({"quant_method": "modelopt", "quant_algo": "W4A8_AWQ", "ignore": ["lm_head"]}, "ModelOpt currently only supports"),
    ({"quant_method": "modelopt", "ignore": ["lm_head"]}, "Missing 'quant_algo'"),
    ({"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "ignore": []}, "non-empty 'quantized_layers'"),
    ({"quant_method": "modelopt", "quant_algo": "FP8", "ignore": "lm_head"}, "exclude_modules must be a list"),
    ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}, "Cannot find any of ['activation_scheme']"),
    ({**FP8_BLOCK, "activation_scheme": "static"}, "only supports dynamic activation scheme"),
    ({**FP8_BLOCK, "weight_block_size": [128]}, "two positive integers"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}, "desc_act=True"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": False, "sym": True}, "bits=3, sym=True"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "lacks ['desc_act', 'sym']"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128, "zero_point": True}, "only 4-bit"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": [],
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                                 "group_size": 128, "actorder": "group"}}}},
     "actorder=group"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": [], "sparsity_config": {"format": "sparse-24-bitmask"},
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}}}, "Sparsity support has been removed"),
    ({"quant_method": "compressed-tensors", "format": "fp4-magic", "config_groups": {}}, "format 'fp4-magic' is unknown"),
])
def test_config_vllm_refuses_is_srv001_alone(tmp_path, qc, expect):
    """A refused config is one SRV001; the tensor rules have nothing to hold the tensors to."""
    d = ckpt(tmp_path, "fp8_block", qc)
    [(code, tensor, file, msg)] = findings(d)
    assert (code, tensor, file) == ("SRV001", None, "config.json")
    assert expect in msg


def test_nvfp4_hf_quant_config_missing_required_fields(tmp_path):
    """Only hf_quant_config.json (no quantization_config in config.json): vLLM reads it and
    requires group_size, kv_cache_quant_algo and exclude_modules for NVFP4."""
    _, hq = modelopt_configs("NVFP4", ["lm_head"], group_size=16)
    del hq["quantization"]["group_size"], hq["quantization"]["kv_cache_quant_algo"]
    d = write_checkpoint(tmp_path / "c", model("nvfp4"), llama_config(None), hf_quant=hq)
    [(code, _, file, msg)] = findings(d)
    assert (code, file) == ("SRV001", "hf_quant_config.json")
    assert "['group_size', 'kv_cache_quant_algo']" in msg


def test_hf_quant_config_alone_is_checked(tmp_path):
    _, hq = modelopt_configs("FP8", ["lm_head"])
    d = write_checkpoint(tmp_path / "c", model("modelopt_fp8"), llama_config(None), hf_quant=hq)
    assert findings(d) == []
    (d / "model.safetensors").unlink()
    write_checkpoint(d, [t for t in model("modelopt_fp8") if t[0] != "model.layers.0.mlp.up_proj.input_scale"],
                     llama_config(None), hf_quant=hq)
    assert [f[:2] for f in findings(d)] == [("SRV002", "model.layers.0.mlp.up_proj.input_scale")]


def test_config_json_and_hf_quant_config_disagree(tmp_path):
    flat, _ = modelopt_configs("FP8", ["lm_head"])
    _, hq = modelopt_configs("NVFP4", ["lm_head", "model.layers.0.mlp.down_proj"], kv="FP8", group_size=16)
    d = ckpt(tmp_path, "modelopt_fp8", flat, hq)
    [(code, _, file, msg)] = findings(d)
    assert (code, file) == ("SRV001", "config.json")
    assert "quant_algo 'FP8' vs 'NVFP4'" in msg and "KV cache None vs 'FP8'" in msg and "exclusion lists differ" in msg
    assert "vLLM 0.33 uses config.json" in msg


def test_flat_nvfp4_without_activations_is_served_as_w4a16(tmp_path):
    """modelopt.py: a flat config.json NVFP4 whose config_groups have no input_activations is W4A16."""
    flat, _ = modelopt_configs("NVFP4", ["lm_head"], group_size=16)
    flat["config_groups"] = {"group_0": {"targets": ["Linear"], "input_activations": None,
                                         "weights": {"num_bits": 4, "type": "float", "group_size": 16}}}
    assert findings(ckpt(tmp_path, "w4a16_nvfp4", flat)) == []


def test_unmodelled_methods_are_not_judged(tmp_path):
    d = ckpt(tmp_path, "bf16", {"quant_method": "bitsandbytes", "load_in_4bit": True})
    assert findings(d) == []


# --- exclusion matching, exactly as the loader matches (reference §1.8) ---

def _moe(tmp_path, kind, qc, hq=None):
    return write_checkpoint(tmp_path / "c", model(kind, moe=True), llama_config(qc), hf_quant=hq)


ROUTERS = [("SRV005", "model.layers.0.mlp.gate"), ("SRV005", "model.layers.1.mlp.gate")]


@pytest.mark.parametrize("exclude, expect", [
    (["lm_head", "model.layers.*.mlp.gate"], []),             # fnmatch wildcard
    (["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"], []),   # exact
    (["lm_head", "mlp.gate"], []),    # legacy substring (not a substring of mlp.experts.0.gate_proj)
    (["lm_head", "*.gate"], []),
    (["lm_head"], ROUTERS),
])
def test_modelopt_exclusion_matching(tmp_path, exclude, expect):
    flat, _ = modelopt_configs("NVFP4", exclude, group_size=16)
    assert [f[:2] for f in findings(_moe(tmp_path, "nvfp4", flat))] == expect


SPLIT_GATE_UP = [("SRV008", f"model.layers.{i}.mlp.gate_proj") for i in (0, 1)]


def test_modelopt_substring_exclusion_reaches_gate_proj(tmp_path):
    """modelopt.py's legacy substring test: `mlp.gate` is inside `mlp.gate_proj`, so a dense model's
    gate_proj is excluded and up_proj is not — a split fused layer, refused by vLLM."""
    flat, _ = modelopt_configs("FP8", ["lm_head", "mlp.gate"])
    got = findings(ckpt(tmp_path, "modelopt_fp8", flat))
    assert [f[:2] for f in got] == SPLIT_GATE_UP
    assert "gate_proj quantized (excluded)" in got[0][3] and "Detected some but not all shards" in got[0][3]


@pytest.mark.parametrize("ignore, expect", [
    (["lm_head", "re:.*mlp.gate$"], []),
    (["lm_head", "re:mlp.gate$"], ROUTERS),       # re.match is anchored at the start
    (["lm_head", "model.layers.0.mlp.gate"], ROUTERS[1:]),
    (["lm_head", "re:.*mlp\\.gate"], []),         # re.match: a prefix match is enough
])
def test_compressed_tensors_ignore_matching(tmp_path, ignore, expect):
    got = [f[:2] for f in findings(_moe(tmp_path, "ct_fp8_dynamic", _ct_fp8(ignore)))]
    assert got == expect


def _ct_fp8(ignore, targets=("Linear",)):
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ignore,
            "config_groups": {"g": {"targets": list(targets), "weights": {"num_bits": 8, "type": "float",
                                                                          "strategy": "channel"},
                                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                                          "dynamic": True}}}}


def test_compressed_tensors_regex_prefix_reaches_gate_proj(tmp_path):
    """`re:.*mlp\\.gate` with re.match also matches `….mlp.gate_proj` of a dense model."""
    assert [f[:2] for f in findings(ckpt(tmp_path, "ct_fp8_dynamic", _ct_fp8(["lm_head", "re:.*mlp\\.gate"])))] \
        == SPLIT_GATE_UP


def test_compressed_tensors_targets_by_name_leave_others_unquantized(tmp_path):
    """A linear no target matches is built unquantized: its quantized tensors have no parameter."""
    got = [f[:2] for f in findings(ckpt(tmp_path, "ct_fp8_dynamic", _ct_fp8(["lm_head"], ["re:.*self_attn.*"])))]
    assert got == sorted(("SRV005", f"model.layers.{i}.mlp.{p}") for i in (0, 1) for p in ("down_proj", "gate_proj",
                                                                                           "up_proj"))


@pytest.mark.parametrize("ignored, expect", [
    (["model.layers.1.self_attn.o_proj"], []),
    (["self_attn.o_proj"], [("SRV005", "model.layers.1.self_attn.o_proj")]),   # exact full prefix only
])
def test_fp8_ignored_layers_exact(tmp_path, ignored, expect):
    ts = [t for t in model("fp8_block") if not t[0].startswith("model.layers.1.self_attn.o_proj.")]
    ts.append(("model.layers.1.self_attn.o_proj.weight", "BF16", [64, 64]))
    d = write_checkpoint(tmp_path / "c", ts, llama_config({**FP8_BLOCK, "ignored_layers": ignored}))
    assert [f[:2] for f in findings(d)] == expect


def test_fp8_fused_exclusion_split_is_srv008(tmp_path):
    """is_layer_skipped: excluding q_proj but not k/v_proj is refused at start-up."""
    ts = [t for t in model("fp8_block") if not t[0].startswith("model.layers.0.self_attn.q_proj.")]
    ts.append(("model.layers.0.self_attn.q_proj.weight", "BF16", [64, 64]))
    d = write_checkpoint(tmp_path / "c", ts, llama_config({**FP8_BLOCK,
                                                           "ignored_layers": ["model.layers.0.self_attn.q_proj"]}))
    [(code, tensor, _, msg)] = findings(d)
    assert (code, tensor) == ("SRV008", "model.layers.0.self_attn.q_proj")
    assert "Detected some but not all shards of model.layers.0.self_attn.qkv_proj are quantized" in msg


def test_excluded_module_stored_quantized_is_srv005(tmp_path):
    """llm-compressor issue #1306 shape: the config excludes a module the checkpoint quantized."""
    flat, _ = modelopt_configs("FP8", ["lm_head", "model.layers.1.self_attn.o_proj"])
    [(code, tensor, _, msg)] = findings(ckpt(tmp_path, "modelopt_fp8", flat))
    assert (code, tensor) == ("SRV005", "model.layers.1.self_attn.o_proj")
    assert "stored quantized" in msg and "There is no module or parameter named" in msg


def test_quantized_lm_head_under_gptq_needs_lm_head_flag(tmp_path):
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
          "modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]]}
    d = write_checkpoint(tmp_path / "c", model("gptq", lm_head="gptq", group=32), llama_config(qc))
    assert [f[:2] for f in findings(d)] == [("SRV005", "lm_head")]
    qc["lm_head"] = True
    (d / "config.json").write_text(json.dumps(llama_config(qc)))
    assert findings(d) == []


def test_mixed_precision_map_read_from_hf_quant_config(tmp_path):
    """weight_utils.py: for MIXED_PRECISION without quantized_layers in config.json, vLLM falls
    through to hf_quant_config.json; only when neither has the map is the config refused."""
    flat = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION", "ignore": ["lm_head"]}
    hq = {"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"],
        "quantized_layers": {"model.layers.0.self_attn.q_proj": {"quant_algo": "FP8"}}}}
    assert findings(ckpt(tmp_path, "modelopt_fp8", flat, hq)) == []
    (tmp_path / "c" / "hf_quant_config.json").unlink()
    [(code, _, file, msg)] = findings(tmp_path / "c")
    assert (code, file) == ("SRV001", "config.json") and "quantized_layers" in msg


@pytest.mark.parametrize("qc", [
    {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["re:(unclosed"],
     "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}}},
    {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": [],
     "config_groups": {"g": {"targets": ["re:*bad"], "weights": {"num_bits": 8, "type": "float"}}}},
    {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": [],
     "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                                                "group_size": 0}}}},
    {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": [],
     "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                                                "block_structure": [0, 128]}}}},
    {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True, "dynamic": {"-:(": {}}},
    {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": "sixteen", "ignore": []},
    {"quant_method": "modelopt", "quantization": ["not", "a", "dict"]},
    {"quant_method": "fp8", "activation_scheme": ["dynamic"]},
    {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": [1, 2], "config_groups": {}},
])
def test_hostile_quantization_config_is_one_srv001(tmp_path, qc):
    """Bad input is a finding, never a traceback (a regex, a zero group or block, odd types)."""
    [(code, _, _, msg)] = findings(ckpt(tmp_path, "ct_w4a16", qc, group=32))
    assert code == "SRV001" and msg


def test_hostile_shapes_are_findings(tmp_path):
    """1-D, 3-D, empty and zero-sized quantized tensors give findings, not a crash."""
    ts = model("nvfp4") + [("model.layers.0.mlp.extra.weight", "U8", [7]),
                           ("model.layers.0.mlp.cube.weight", "U8", [2, 2, 2]),
                           ("model.layers.0.mlp.void.weight", "U8", [0, 0]),
                           ("model.layers.0.mlp.void.weight_scale", "F8_E4M3", [0, 0]),
                           ("model.layers.0.mlp.void.weight_scale_2", "F32", []),
                           ("model.layers.0.mlp.void.input_scale", "F32", [])]
    flat, _ = modelopt_configs("NVFP4", ["lm_head"], group_size=16)
    d = write_checkpoint(tmp_path / "c", ts, llama_config(flat))
    got = {(c, t) for c, t, _, _ in findings(d)}
    assert ("SRV004", "model.layers.0.mlp.extra.weight") in got and ("SRV004", "model.layers.0.mlp.cube.weight") in got
    assert not any(t and t.startswith("model.layers.0.mlp.void") for _, t in got)


def test_modelopt_exact_entry_splits_a_fused_layer_even_if_a_substring_covers_the_rest(tmp_path):
    """modelopt.py is_layer_excluded asks is_layer_skipped (exact) first: `q_proj` listed by name
    and `k_proj`/`v_proj` only through the `self_attn` substring is still refused at start-up."""
    ts = model("modelopt_fp8")
    for i in (0, 1):
        for p, (o, n) in {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}.items():
            m = f"model.layers.{i}.self_attn.{p}"
            ts = [t for t in ts if not t[0].startswith(m + ".")] + [(f"{m}.weight", "BF16", [o, n])]
    flat, _ = modelopt_configs("FP8", ["lm_head", "model.layers.0.self_attn.q_proj", "self_attn"])
    d = write_checkpoint(tmp_path / "c", ts, llama_config(flat))
    [(code, tensor, _, msg)] = findings(d)
    assert (code, tensor) == ("SRV008", "model.layers.0.self_attn.q_proj")
    assert "Detected some but not all shards of model.layers.0.self_attn.qkv_proj" in msg

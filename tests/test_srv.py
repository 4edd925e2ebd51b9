"""SRV rules: for each real-quantized format, a checkpoint written to vLLM 0.33's contract gives no
finding, and each damage gives exactly its SRV finding. Header-only fixtures (tests/producers/headers.py)."""
from __future__ import annotations

import json

import pytest

import fqcheck
from producers.headers import E, H, HEAD_DIM, HEADS, I, llama_config, model, modelopt_configs, write_checkpoint

MOE_ROUTERS = ("model.layers.0.mlp.gate", "model.layers.1.mlp.gate")
O = "model.layers.1.self_attn.o_proj"   # not part of a fused layer
Q = "model.layers.0.self_attn.q_proj"


def mo(algo, gs=None, kv=None):
    def cfg(moe):
        flat, hq = modelopt_configs(algo, ["lm_head", *(["model.layers.*.mlp.gate"] if moe else [])], kv=kv,
                                    group_size=gs)
        return llama_config(flat), hq
    return cfg


def fp8(**qc):
    return lambda moe: (llama_config({"quant_method": "fp8", **qc}), None)


def ct(fmt, weights, acts=None, kv=None):
    def cfg(moe):
        qc = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
              "ignore": ["lm_head", *(["re:.*mlp.gate$"] if moe else [])],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}
        if kv:
            qc["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                     "symmetric": True}
        return llama_config(qc), None
    return cfg


def gptq_awq(qc):
    return lambda moe: (llama_config(qc), None)


FP8_ACT = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
INT8_ACT = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True, "symmetric": True}
NVFP4_ARGS = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True}

# name: (layout kind, config, scale to drop, (scale, wrong shape) for o_proj [64, 64], dynamic
# activations, KV naming, model kwargs)
FORMATS = {
    "modelopt-fp8": ("modelopt_fp8", mo("FP8", kv="FP8"), "input_scale", ("weight_scale", [H]), False, "proj", {}),
    "modelopt-fp8-pcpt": ("modelopt_fp8_pcpt", mo("FP8_PER_CHANNEL_PER_TOKEN"), "weight_scale",
                          ("weight_scale", [H, 1]), True, None, {}),
    "modelopt-fp8-pb-wo": ("modelopt_fp8_pbwo", mo("FP8_PB_WO"), "weight_scale", ("weight_scale", [1, 1]), True, None,
                           dict(hidden=128, inter=256, head_dim=32)),
    "modelopt-nvfp4": ("nvfp4", mo("NVFP4", gs=16, kv="FP8"), "weight_scale_2", ("weight_scale", [H, HEADS * HEAD_DIM // 32]),
                       False, "proj", {}),
    "modelopt-w4a16-nvfp4": ("w4a16_nvfp4", mo("W4A16_NVFP4", gs=16), "weight_scale", ("weight_scale_2", [H]), None,
                             None, {}),
    "fp8-block": ("fp8_block", fp8(activation_scheme="dynamic", fmt="e4m3", weight_block_size=[128, 128]),
                  "weight_scale_inv", ("weight_scale_inv", [1]), True, None, {}),
    "fp8-static": ("fp8_tensor", fp8(activation_scheme="static", ignored_layers=["lm_head"]), "input_scale",
                   ("weight_scale", [H]), False, None, {}),
    "fp8-dynamic": ("fp8_tensor", fp8(activation_scheme="dynamic"), "weight_scale", ("weight_scale", [2]), True, None,
                    dict(static=False)),
    "ct-fp8-dynamic": ("ct_fp8_dynamic", ct("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel",
                                                                "symmetric": True, "dynamic": False}, FP8_ACT, kv=True),
                       "weight_scale", ("weight_scale", [H]), True, "attn", {}),
    "ct-w8a8-int8": ("ct_int8", ct("int-quantized", {"num_bits": 8, "type": "int", "strategy": "channel",
                                                     "symmetric": True, "dynamic": False}, INT8_ACT),
                     "weight_scale", ("weight_scale", [H]), True, None, {}),
    "ct-w4a16": ("ct_w4a16", ct("pack-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                                   "symmetric": True, "dynamic": False}),
                 "weight_shape", ("weight_scale", [H, 3]), None, None, dict(group=32)),
    "ct-nvfp4": ("ct_nvfp4", ct("nvfp4-pack-quantized", NVFP4_ARGS, {**NVFP4_ARGS, "dynamic": "local"}),
                 "weight_global_scale", ("weight_scale", [H, 8]), None, None, {}),
    "gptq": ("gptq", gptq_awq({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}),
             "qzeros", ("qzeros", [2, H]), None, None, dict(group=32)),
    "awq": ("awq", gptq_awq({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}),
            "scales", ("scales", [2, H // 8]), None, None, dict(group=32)),
}
MAIN = {"ct_w4a16": "weight_packed", "ct_nvfp4": "weight_packed", "gptq": "qweight", "awq": "qweight"}


def srv(d, **kw):
    return sorted((f.code, f.tensor) for f in fqcheck.lint(d, select=["SRV"], **kw).findings)


def build(tmp_path, name, *, moe=False, edit=None, cfg_edit=None, shards=1):
    kind, cfg, _, _, _, kv, kw = FORMATS[name]
    tensors = model(kind, moe=moe, kv=kv, **kw)
    if edit is not None:
        tensors = edit(tensors)
    config, hq = cfg(moe)
    config.update(hidden_size=kw.get("hidden", H), intermediate_size=kw.get("inter", I),
                  head_dim=kw.get("head_dim", HEAD_DIM))  # the sizes the layout really has
    if moe:  # the MoE layout is Qwen3-MoE's: say so, or the architecture check rightly objects
        config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=E,
                      num_experts_per_tok=2, moe_intermediate_size=I, head_dim=HEAD_DIM)
    if cfg_edit is not None:
        cfg_edit(config["quantization_config"])
    return write_checkpoint(tmp_path / "ckpt", tensors, config, hf_quant=hq, shards=shards)


def drop(*names):
    return lambda ts: [t for t in ts if t[0] not in names]


def change(name, dtype=None, shape=None):
    def edit(ts):
        assert any(t[0] == name for t in ts), name
        return [(n, dtype or d, shape if shape is not None else s) if n == name else (n, d, s) for n, d, s in ts]
    return edit


def as_bf16(module, out, inp):
    """The module stored unquantized: only a BF16 weight, none of its quantization tensors."""
    return lambda ts: [t for t in ts if not t[0].startswith(module + ".")] + [(f"{module}.weight", "BF16", [out, inp])]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("name", FORMATS)
def test_clean_checkpoint_has_no_finding(tmp_path, name, moe):
    d = build(tmp_path, name, moe=moe, shards=2)
    assert srv(d) == []
    assert fqcheck.lint(d).findings == []  # and no other header rule objects to a real-quantized export


@pytest.mark.parametrize("name", FORMATS)
def test_dropped_scale_is_srv002(tmp_path, name):
    need = FORMATS[name][2]
    assert srv(build(tmp_path, name, edit=drop(f"{O}.{need}"))) == [("SRV002", f"{O}.{need}")]


@pytest.mark.parametrize("name", FORMATS)
def test_dropped_expert_scale_is_srv002(tmp_path, name):
    t = f"model.layers.1.mlp.experts.2.down_proj.{FORMATS[name][2]}"
    assert srv(build(tmp_path, name, moe=True, edit=drop(t))) == [("SRV002", t)]


@pytest.mark.parametrize("name", FORMATS)
def test_bf16_weight_in_quantized_slot_is_srv003(tmp_path, name):
    kind, kw = FORMATS[name][0], FORMATS[name][6]
    main = MAIN.get(kind, "weight")
    h = kw.get("hidden", H)
    edit = change(f"{O}.{main}", "BF16", [h, h])
    assert srv(build(tmp_path, name, edit=edit)) == [("SRV003", f"{O}.{main}")]


@pytest.mark.parametrize("name", FORMATS)
def test_wrong_scale_shape_is_srv004(tmp_path, name):
    scale, shape = FORMATS[name][3]
    assert srv(build(tmp_path, name, edit=change(f"{O}.{scale}", shape=shape))) == [("SRV004", f"{O}.{scale}")]


@pytest.mark.parametrize("name", [n for n in FORMATS if n not in ("gptq", "awq")])
def test_float_module_not_excluded_is_srv005(tmp_path, name):
    """vLLM PR #47445: a BF16 linear the config does not exclude loads silently into an FP8 slot."""
    h = FORMATS[name][6].get("hidden", H)
    got = srv(build(tmp_path, name, edit=as_bf16(O, h, h)))
    assert got == [("SRV005", O)]


@pytest.mark.parametrize("name", ["modelopt-fp8", "modelopt-nvfp4", "ct-fp8-dynamic", "ct-nvfp4"])
def test_router_missing_from_exclude_is_srv005(tmp_path, name):
    """Model-Optimizer PR #1858: the BF16 MoE router not in exclude_modules (Qwen3-MoE NVFP4)."""
    def unlist(q):
        key = "ignore"
        q[key] = [e for e in q[key] if "gate" not in e]
    d = build(tmp_path, name, moe=True, cfg_edit=unlist)
    if (d / "hf_quant_config.json").exists():  # keep the two ModelOpt files in agreement
        hq = json.loads((d / "hf_quant_config.json").read_text())
        hq["quantization"]["exclude_modules"] = ["lm_head"]
        (d / "hf_quant_config.json").write_text(json.dumps(hq))
    got = srv(d)
    assert got == [("SRV005", r) for r in MOE_ROUTERS]
    msg = fqcheck.lint(d, select=["SRV005"]).findings[0].message
    assert "stored unquantized (BF16)" in msg and "nothing excludes it" in msg


@pytest.mark.parametrize("name", FORMATS)
def test_scale_on_unquantized_lm_head_is_srv006(tmp_path, name):
    """vLLM issue #45102: `There is no module or parameter named 'lm_head.input_scale'`."""
    d = build(tmp_path, name, edit=lambda ts: ts + [("lm_head.input_scale", "F32", [])])
    assert srv(d) == [("SRV006", "lm_head.input_scale")]
    [f] = fqcheck.lint(d, select=["SRV006"]).findings
    assert f.fixable == "safe" and "There is no module or parameter named 'lm_head.input_scale'" in f.message


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f[4]])
def test_input_scale_under_dynamic_scheme_is_srv006(tmp_path, name):
    t = f"{O}.input_scale"
    assert srv(build(tmp_path, name, edit=lambda ts: ts + [(t, "F32", [])])) == [("SRV006", t)]


def test_input_scale_of_w4a16_nvfp4_is_tolerated(tmp_path):
    """modelopt.py registers a throw-away input_scale for W4A16 NVFP4 and drops it (no crash)."""
    t = f"{O}.input_scale"
    assert srv(build(tmp_path, "modelopt-w4a16-nvfp4", edit=lambda ts: ts + [(t, "F32", [])])) == []


@pytest.mark.parametrize("name", [n for n, f in FORMATS.items() if f[5]])
def test_kv_scale_missing_or_not_scalar_is_srv007(tmp_path, name):
    kv = FORMATS[name][5]
    a = "model.layers.1.self_attn"
    v = f"{a}.v_proj.v_scale" if kv == "proj" else f"{a}.v_scale"
    k = f"{a}.k_proj.k_scale" if kv == "proj" else f"{a}.k_scale"
    d = build(tmp_path, name, edit=lambda ts: change(k, shape=[2])(drop(v)(ts)))
    assert srv(d) == [("SRV007", a), ("SRV007", k)]
    assert {f.severity for f in fqcheck.lint(d, select=["SRV007"]).findings} == {"warning"}


@pytest.mark.parametrize("name", FORMATS)
def test_fused_shards_split_is_srv008(tmp_path, name):
    h = FORMATS[name][6].get("hidden", H)
    q_out = HEADS * FORMATS[name][6].get("head_dim", HEAD_DIM)
    d = build(tmp_path, name, edit=as_bf16(Q, q_out, h))
    assert srv(d) == [("SRV008", Q)]
    msg = fqcheck.lint(d, select=["SRV008"]).findings[0].message
    assert "model.layers.0.self_attn.qkv_proj" in msg and "q_proj unquantized" in msg


def _raw_tensors(path):
    """name -> (dtype, shape, bytes) read straight from the file (no safetensors library)."""
    import struct
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    return {k: (v["dtype"], v["shape"], raw[base + v["data_offsets"][0]:base + v["data_offsets"][1]])
            for k, v in header.items()}


def test_srv006_fix_drops_only_the_stray_tensors(tmp_path):
    """The safe fix drops the tensors the loader has no parameter for; every other tensor keeps its
    bytes, and the index follows."""
    kind, cfg, *_ = FORMATS["fp8-block"]
    stray = ["lm_head.input_scale", f"{O}.input_scale"]
    config, _ = cfg(False)
    d = write_checkpoint(tmp_path / "c", model(kind) + [(s, "F32", []) for s in stray], config, shards=2, data=True)
    before = {p.name: _raw_tensors(p) for p in sorted(d.glob("*.safetensors"))}
    assert srv(d) == sorted(("SRV006", s) for s in stray)
    result = fqcheck.fix(d, select=["SRV"], quiet=True)
    assert sorted(f.tensor for f in result.applied) == sorted(stray)
    after = {p.name: _raw_tensors(p) for p in sorted(d.glob("*.safetensors"))}
    for name, tensors in before.items():
        assert after[name] == {k: v for k, v in tensors.items() if k not in stray}
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert not set(stray) & set(index["weight_map"])
    assert srv(d) == [] and fqcheck.lint(d).findings == []


# --- DeepSeek-V3 block FP8 at its real dimensions (MLA, shared experts, partial blocks) ---

def _deepseek(tmp_path, edit=None):
    from producers.headers import DEEPSEEK_QUANT, deepseek_v3
    ts = deepseek_v3()
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_hidden_layers": 2,
           "quantization_config": DEEPSEEK_QUANT}
    return write_checkpoint(tmp_path / "ds", edit(ts) if edit else ts, cfg)


KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa"


@pytest.mark.parametrize("edit, expect", [
    (None, []),
    (change(f"{KV_A}.weight_scale_inv", shape=[4, 56]), [("SRV004", f"{KV_A}.weight_scale_inv")]),  # floor, not cdiv
    (drop("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"),
     [("SRV002", "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv")]),
    (as_bf16(KV_A, 576, 7168), [("SRV005", KV_A)]),
    (lambda ts: ts + [(f"{KV_A}.input_scale", "F32", [])], [("SRV006", f"{KV_A}.input_scale")]),
    # a router is model-dependent under fp8: quantized with its scale, or BF16 (as shipped), both pass
    (lambda ts: change("model.layers.1.mlp.gate.weight", "F8_E4M3")(ts)
     + [("model.layers.1.mlp.gate.weight_scale_inv", "F32", [2, 56])], []),
], ids=["clean", "floor-scale", "expert-scale", "bf16-not-ignored", "input-scale", "router"])
def test_deepseek_v3_block_fp8(tmp_path, edit, expect):
    assert srv(_deepseek(tmp_path, edit)) == expect


@pytest.mark.parametrize("name, qc, why", [
    ("gptq", {"modules_in_block_to_quantize": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                               ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]]},
     "not in modules_in_block_to_quantize"),
    ("gptq", {"dynamic": {r"-:.*o_proj": {}}}, "excluded by a `-:` dynamic rule"),
    ("awq", {"modules_to_not_convert": ["o_proj"]}, "excluded by the substring 'o_proj' of modules_to_not_convert"),
])
def test_quantized_module_the_gptq_awq_config_leaves_out_is_srv005(tmp_path, name, qc, why):
    """GPTQ's and AWQ's own exclusions: vLLM 0.33 builds those modules unquantized, so their stored
    quantized tensors have no parameter; each finding names the config's reason."""
    d = build(tmp_path, name, cfg_edit=lambda c: c.update(qc))
    found = fqcheck.lint(d, select=["SRV"]).findings
    o_proj = [f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)]
    assert [(f.code, f.tensor) for f in found] == [("SRV005", t) for t in o_proj]
    assert all(f"{name}: {t} is stored quantized but config.json leaves it unquantized ({why})" in f.message
               for f, t in zip(found, o_proj))

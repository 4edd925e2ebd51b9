"""FakeQuant export fixtures shaped exactly like Model Optimizer 0.47.0's export_hf_vllm_fq_checkpoint
output (modelopt/torch/export/plugins/vllm_fakequant_hf.py): folded weights in safetensors, and
vllm_fq_modelopt_state.pth = {"modelopt_state_dict": [("quantize", {"config": {"algorithm", "quant_cfg"
list}, "metadata": {"quantizer_state"}}), ("max_calibrate", ...)], "modelopt_version",
"modelopt_state_weights": {input quantizer: {"_amax": model-dtype scalar}}}, weight quantizer entries
stripped. The layout was read from a real export of a tiny llama made with nvidia-modelopt 0.47.0."""
from __future__ import annotations

from pathlib import Path

import torch

from builders import load_shard, read_index, save_shard, save_tiny_model, write_index
from fqcheck.quant.formats import QuantSpec, fold

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

_QCFG_KEYS = dict(backend=None, backend_extra_args=None, bias=None, calibrator="max", constant_amax=None,
                  effective_bits=None, enable=True, fake_quant=True, learn_amax=False, narrow_range=False,
                  pass_through_bwd=True, rotate=False, trt_high_precision_dtype="Float", type="static",
                  unsigned=False, use_constant_amax=False)


def quant_cfg(weight: dict, inp: dict | None = None) -> list:
    """The list-form quant_cfg modelopt 0.47 saves (FP8_DEFAULT_CFG / INT8 / INT4_AWQ / NVFP4 shapes)."""
    cfg = [{"quantizer_name": "*", "parent_class": None, "enable": False, "cfg": None},
           {"quantizer_name": "*weight_quantizer", "parent_class": None, "enable": True,
            "cfg": {**_QCFG_KEYS, "axis": None, "block_sizes": None, **weight}}]
    if inp is not None:
        cfg.append({"quantizer_name": "*input_quantizer", "parent_class": None, "enable": True,
                    "cfg": {**_QCFG_KEYS, "axis": None, "block_sizes": None, **inp}})
    cfg.append({"quantizer_name": "*lm_head*", "parent_class": None, "enable": False, "cfg": None})
    return cfg


def _qstate(num_bits, amax_dtype, disabled=False) -> dict:
    return {"_axis": None, "_bias": None, "_block_sizes": None, "_constant_amax": None, "_dequantize": False,
            "_disabled": disabled, "_dynamic": False, "_effective_bits": None, "_enable_pre_quant_scale": True,
            "_fake_quant": True, "_if_calib": False, "_if_quant": True, "_input_dtype": None,
            "_learn_amax": False, "_narrow_range": False, "_num_bits": num_bits, "_pass_through_bwd": True,
            "_pytorch_state_metadata": {"buffers": {"_amax": {"dtype": amax_dtype, "shape": ()}}, "params": {}},
            "_rotate": False, "_trt_high_precision_dtype": "Float", "_unsigned": False,
            "_use_constant_amax": False, "backend": None, "backend_extra_args": {}}


def write_state(d: Path, modules, cfg: list, num_bits=(4, 3), dtype=torch.bfloat16, extra_modules=()) -> Path:
    qstate, weights = {}, {}
    for i, m in enumerate([*modules, *extra_modules]):
        qstate[f"{m}.input_quantizer"] = _qstate(num_bits, dtype)
        qstate[f"{m}.output_quantizer"] = {**_qstate(num_bits, dtype, True),
                                           "_pytorch_state_metadata": {"buffers": {}, "params": {}}}
        weights[f"{m}.input_quantizer"] = {"_amax": torch.tensor(1.5 + i, dtype=dtype)}
        weights[f"{m}.output_quantizer"] = {}
    state = {"modelopt_state_dict": [
        ("quantize", {"config": {"algorithm": "max", "effective_bits": None, "quant_cfg": cfg},
                      "metadata": {"quantizer_state": qstate}}),
        ("max_calibrate", {"config": {"method": "max", "distributed_sync": True},
                           "metadata": {"quantizer_state": qstate, "shared_quant_states": {"weight_global_amax": True}}})],
        "modelopt_version": "0.47.0", "modelopt_state_weights": weights}
    path = Path(d) / "vllm_fq_modelopt_state.pth"
    torch.save(state, path)
    return path


def linear_modules(layers=2) -> list[str]:
    return [f"model.layers.{i}.{l}" for i in range(layers) for l in LINEARS]


def fq_export(d: Path, *, unfolded=(), leak=True, spec_of=None, cfg=None, num_bits=(4, 3),
              shards: int = 1) -> Path:
    """A tiny llama exported as FakeQuant: every linear weight folded with its spec (FP8 per-tensor,
    amax = max|w|, by default) except those named in `unfolded`; with `leak`, the weight quantizers'
    _amax are also stored in the shards (the accelerate save_pretrained leak of PR 1194)."""
    d = save_tiny_model(d, shards=shards)
    spec_of = spec_of or (lambda w: QuantSpec("fp8", w.float().abs().amax().to(torch.bfloat16).float()))
    mods = linear_modules()
    for shard in sorted(d.glob("*.safetensors")):
        t = load_shard(shard)
        for m in mods:
            name = f"{m}.weight"
            if name not in t:
                continue
            spec = spec_of(t[name])
            if name not in unfolded:
                t[name] = fold(t[name], spec)
            if leak:
                t[f"{m}.weight_quantizer._amax"] = spec.amax.to(torch.bfloat16)
        save_shard(shard, t)
        if (d / "model.safetensors.index.json").exists():
            idx = read_index(d)
            for k in t:
                idx["weight_map"].setdefault(k, shard.name)
            write_index(d, idx)
    write_state(d, mods, cfg or quant_cfg({"num_bits": num_bits}, {"num_bits": num_bits}), num_bits)
    return d

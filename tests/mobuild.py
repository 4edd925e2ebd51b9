"""Exports made by nvidia-modelopt 0.47 itself (issue 13): a tiny llama quantized with mtq.quantize on
the CPU, then either Model Optimizer's own FakeQuant export (export_hf_vllm_fq_checkpoint) or the
pre-PR-1194 offloaded export: accelerate puts a layer on "disk", its weights are meta tensors, the
exporter folds what it can reach in place and `save_pretrained` writes the model's own state, so
quantizer buffers leak and the offloaded weights stay raw."""
from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
OFFLOADED = "model.layers.1"  # the layer accelerate puts on "disk"
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CALIB = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _quiet():
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("modelopt").setLevel(logging.ERROR)


def config(tie: bool = False):
    from transformers import AutoConfig
    return AutoConfig.for_model("llama", **TINY, tie_word_embeddings=tie)


def model(tie: bool = False):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config(tie), dtype=torch.bfloat16)


def quant_config(name: str) -> dict:
    import modelopt.torch.quantization as mtq
    if name == "FP8_PER_CHANNEL":  # FP8_DEFAULT_CFG with per-channel weights (axis 0)
        cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
        for e in cfg["quant_cfg"]:
            if e.get("quantizer_name") == "*weight_quantizer":
                e["cfg"] = {**e["cfg"], "axis": 0}
        return cfg
    cfg = copy.deepcopy(getattr(mtq, name))
    if cfg.get("algorithm") == "awq_lite":  # a coarser alpha search: seconds, not tens of seconds
        cfg["algorithm"] = {"method": "awq_lite", "alpha_step": 0.5}
    return cfg


def quantize(m, name: str):
    _quiet()
    import modelopt.torch.quantization as mtq
    with torch.no_grad():
        dev = next(m.parameters()).device
        return mtq.quantize(m, quant_config(name), lambda mm: mm(CALIB.to("cpu" if dev.type == "meta" else dev)))


def export(d: Path, name: str, tie: bool = False):
    """Model Optimizer's own FakeQuant export of a tiny llama quantized with `name` (a *_CFG of
    mtq, or FP8_PER_CHANNEL). Returns (dir, the quantized model)."""
    from modelopt.torch.export.plugins.vllm_fakequant_hf import export_hf_vllm_fq_checkpoint
    m = quantize(model(tie), name)
    export_hf_vllm_fq_checkpoint(copy.deepcopy(m), d)  # the export disables weight quantizers
    return Path(d), m


def offloaded_model(base: Path, work: Path, name: str):
    """The base checkpoint loaded with OFFLOADED on disk (accelerate), quantized."""
    from transformers import AutoModelForCausalLM
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", OFFLOADED: "disk", "model.norm": "cpu",
          "model.rotary_emb": "cpu", "lm_head": "cpu"}
    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=dm,
                                             offload_folder=str(work / "offload"))
    return quantize(m, name)


def prefix_export(d: Path, m, state: bool = True) -> Path:
    """What the exporter did before PR 1194 on an offloaded model: fold in place the weights it can
    reach (modelopt's own _fakequant_module_weights, inplace=True; offloaded weights are meta and
    skipped), write vllm_fq_modelopt_state.pth as export_hf_vllm_fq_checkpoint does (weight
    quantizers disabled and their entries stripped; folded pre_quant_scales saved as ones), then
    `save_pretrained`, which writes the model's own state: quantizer buffers leak and the offloaded
    weights come from the offload folder, raw."""
    import modelopt.torch.opt as mto
    from modelopt.torch.export.plugins.vllm_fakequant_hf import (_fakequant_module_weights,
                                                                 is_weight_quantizer_state_key)
    from modelopt.torch.quantization.conversion import quantizer_state
    from modelopt.torch.quantization.nn import QuantModule
    from modelopt.torch.quantization.utils import get_quantizer_state_dict
    from modelopt.torch.utils import safe_save
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    folded_pqs: set = set()
    with torch.no_grad():
        for name, mod in m.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(mod, QuantModule) and w is not None and not w.is_meta:
                _fakequant_module_weights(mod, name, m, None, folded_pqs, set(), set(), inplace=True)
    if state:
        disabled = []
        for _, mod in m.named_modules():
            q = getattr(mod, "weight_quantizer", None)
            if isinstance(mod, QuantModule) and q is not None and q.is_enabled:
                q.disable()
                disabled.append(q)
        qsd = {k: v for k, v in get_quantizer_state_dict(m).items() if not is_weight_quantizer_state_key(k)}
        for k in folded_pqs & set(qsd):
            qsd[k]["_pre_quant_scale"] = torch.ones_like(qsd[k]["_pre_quant_scale"])
        ms = mto.modelopt_state(m)
        qs = {k: v for k, v in quantizer_state(m).items() if not is_weight_quantizer_state_key(k)}
        for _, mstate in ms.get("modelopt_state_dict", []):
            if "quantizer_state" in mstate.get("metadata", {}):
                mstate["metadata"]["quantizer_state"] = qs
        ms["modelopt_state_weights"] = qsd
        safe_save(ms, d / "vllm_fq_modelopt_state.pth")
        for q in disabled:  # as the exporter restores them
            q.enable()
    m.save_pretrained(d)
    return d


def modelopt_fold(m, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model Optimizer's own export fold of the given raw weights: its _fakequant_module_weights
    (quantizer(w.float()).to(w.dtype), then a pre_quant_scale folded in where the input quantizer is
    off); a SequentialQuantizer, which that function skips, through its own forward."""
    from modelopt.torch.export.plugins.vllm_fakequant_hf import _fakequant_module_weights
    from modelopt.torch.quantization.nn import TensorQuantizer
    out = {}
    with torch.no_grad():
        for name, w in raw.items():
            mname = name.rsplit(".", 1)[0]
            mod = m.get_submodule(mname)
            if isinstance(mod.weight_quantizer, TensorQuantizer):
                sd = {name: w.clone()}
                _fakequant_module_weights(mod, mname, m, sd, set(), set(), set(), inplace=False)
                out[name] = sd[name]
            else:
                out[name] = mod.weight_quantizer(w.float()).to(w.dtype)
    return out


def save_base(d: Path, tie: bool = False) -> Path:
    shutil.rmtree(d, ignore_errors=True)
    model(tie).save_pretrained(d)
    return Path(d)

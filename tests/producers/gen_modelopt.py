#!/usr/bin/env python3
"""Generate SRV fixtures with NVIDIA Model Optimizer's real-quant HF export, on CPU.

    python3 tests/producers/gen_modelopt.py [NAME ...]   (needs nvidia-modelopt, torch, transformers)

For each config it quantizes a tiny random Llama (or Qwen3-MoE) with mtq.quantize (max calibration on random
tokens), exports it with modelopt.torch.export.export_hf_checkpoint, and writes
tests/data/srv/<name>.json (config.json, hf_quant_config.json, each shard's header). The FP8 and
NVFP4 exports both run on CPU with nvidia-modelopt 0.47.0 (no GPU needed)."""
from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dump import dump_checkpoint  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "srv"
TINY = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"])  # the exporter reads architectures
# A tiny Qwen3-MoE: per-expert gate/up/down linears in the export, and a router (mlp.gate).
TINY_MOE = dict(TINY, model_type="qwen3_moe", moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2,
                head_dim=64, decoder_sparse_step=1, mlp_only_layers=[], architectures=["Qwen3MoeForCausalLM"])
CONFIGS = {  # fixture name -> (mtq config, KV-cache config merged in or None, model)
    "modelopt-fp8-kv": ("FP8_DEFAULT_CFG", "FP8_KV_CFG", TINY),
    "modelopt-fp8-pcpt": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", None, TINY),
    "modelopt-fp8-pb-wo": ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", None, TINY),
    "modelopt-nvfp4-kv": ("NVFP4_DEFAULT_CFG", "FP8_KV_CFG", TINY),
    "modelopt-w4a16-nvfp4": ("W4A16_NVFP4_CFG", None, TINY),
    "modelopt-fp8-moe": ("FP8_DEFAULT_CFG", None, TINY_MOE),
    "modelopt-nvfp4-moe": ("NVFP4_DEFAULT_CFG", "FP8_KV_CFG", TINY_MOE),
}


def merged(mtq, name: str, kv: str | None) -> dict:
    cfg = copy.deepcopy(getattr(mtq, name))
    if kv is not None:
        extra = getattr(mtq, kv)["quant_cfg"]
        q = cfg["quant_cfg"]
        cfg["quant_cfg"] = q + list(extra) if isinstance(q, list) else {**q, **extra}
    return cfg


def main() -> None:
    import modelopt
    import modelopt.torch.quantization as mtq
    import torch
    import transformers
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    OUT.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])
    for name, (cfg_name, kv, arch) in CONFIGS.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        arch = dict(arch)
        config = AutoConfig.for_model(arch.pop("model_type", "llama"), **arch)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        tokens = torch.randint(0, TINY["vocab_size"], (2, 32))
        model = mtq.quantize(model, merged(mtq, cfg_name, kv), lambda m: m(tokens))
        with tempfile.TemporaryDirectory() as d:
            export_hf_checkpoint(model, export_dir=d)
            dump = dump_checkpoint(Path(d), producer={
                "name": "modelopt", "config": cfg_name, "kv": kv, "nvidia-modelopt": modelopt.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__})
        (OUT / f"{name}.json").write_text(json.dumps(dump, indent=1, sort_keys=True) + "\n")
        print("wrote", OUT / f"{name}.json")


if __name__ == "__main__":
    main()

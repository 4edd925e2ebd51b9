#!/usr/bin/env python3
"""Generate SRV fixtures with the real compressed-tensors producer (llm-compressor), on CPU.

Runs in its own virtualenv, because llm-compressor pins its own transformers:

    python3 -m venv /tmp/venv-producers
    /tmp/venv-producers/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch
    /tmp/venv-producers/bin/pip install llmcompressor
    /tmp/venv-producers/bin/python tests/producers/gen_llmcompressor.py [NAME ...]

For each scheme it quantizes a tiny random Llama (or Qwen3-MoE) with llm-compressor's data-free
QuantizationModifier (oneshot, no calibration set), saves it compressed, and writes
tests/data/srv/<name>.json: config.json, the other JSON files, and each shard's header (name ->
dtype, shape). Only those small dumps are committed; tests/producers/dumps.py rebuilds a header-only
checkpoint from one."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dump import dump_checkpoint  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "data" / "srv"
TINY = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
# A tiny Qwen3-MoE: per-expert linears, and a router (mlp.gate) to leave unquantized.
TINY_MOE = dict(TINY, model_type="qwen3_moe", moe_intermediate_size=256, num_experts=4, num_experts_per_tok=2,
                head_dim=64, decoder_sparse_step=1, mlp_only_layers=[])
MOE_IGNORE = ["lm_head", "re:.*mlp.gate$"]
# fixture name -> (llm-compressor preset scheme (compressed_tensors preset_name_to_scheme), model, ignore)
SCHEMES = {
    "llmc-fp8-dynamic": ("FP8_DYNAMIC", TINY, ["lm_head"]),
    "llmc-w8a8-int8": ("W8A8", TINY, ["lm_head"]),
    "llmc-w4a16": ("W4A16", TINY, ["lm_head"]),
    "llmc-nvfp4a16": ("NVFP4A16", TINY, ["lm_head"]),
    "llmc-fp8-dynamic-moe": ("FP8_DYNAMIC", TINY_MOE, MOE_IGNORE),
    "llmc-w4a16-moe": ("W4A16", TINY_MOE, MOE_IGNORE),
}


def main() -> None:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoConfig, AutoModelForCausalLM

    OUT.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])
    for name, (scheme, arch, ignore) in SCHEMES.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        arch = dict(arch)
        config = AutoConfig.for_model(arch.pop("model_type", "llama"), **arch)
        with tempfile.TemporaryDirectory() as base, tempfile.TemporaryDirectory() as d:
            # oneshot reads the model's config back from its name_or_path: start from a saved model
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(base)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
            oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore))
            model.save_pretrained(d, save_compressed=True)
            dump = dump_checkpoint(Path(d), producer={"name": "llmcompressor", "scheme": scheme,
                                                      **_versions("llmcompressor", "compressed-tensors",
                                                                  "transformers", "torch")})
        (OUT / f"{name}.json").write_text(json.dumps(dump, indent=1, sort_keys=True) + "\n")
        print("wrote", OUT / f"{name}.json")


def _versions(*dists: str) -> dict:
    from importlib.metadata import version
    return {d: version(d) for d in dists}


if __name__ == "__main__":
    main()

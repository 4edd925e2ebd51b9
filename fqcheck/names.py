"""Tensor names the rules agree on, defined once: the LM head, the input embedding, and the
buffers Model Optimizer's quantizers register."""
from __future__ import annotations

import re
from typing import Iterable

LM_HEAD = "lm_head.weight"
# The input embedding as the common architectures name it: exact names for the header checks'
# cheap lookups, suffixes for a scan over every name.
EMBED_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
               "gpt_neox.embed_in.weight", "model.language_model.embed_tokens.weight")
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")

# The buffers Model Optimizer's TensorQuantizer (modelopt/torch/quantization/nn/modules/
# tensor_quantizer.py) registers: amax (+ NVFP4's global amax), SmoothQuant/AWQ pre-quant scale,
# KV-cache bias, SVDQuant low-rank factors, and the real-quant scales of its QTensor path. They sit
# under a `*_quantizer` submodule (input_/weight_/output_/k_bmm_/v_bmm_quantizer, or a
# SequentialQuantizer's `weight_quantizer.0`). Real-quantized tensors of HF exports (weight_scale,
# input_scale, k_scale, weight_packed, qweight, scales, ...) never have a `_quantizer.` parent.
QUANTIZER_BUFFERS = ("amax", "global_amax", "pre_quant_scale", "bias_value", "svdquant_lora_a",
                     "svdquant_lora_b", "scale", "double_scale", "scale_zeros")
LEAK_PATTERN = re.compile(r"(?:^|\.)[A-Za-z0-9_]*quantizer(?:\.\d+)?\._(?:%s)$" % "|".join(QUANTIZER_BUFFERS))


def is_quantizer_state(name: str) -> bool:
    """A leaked quantizer buffer (the substring test first; callers scanning many names filter on
    "quantizer" in a comprehension before calling this)."""
    return "quantizer" in name and LEAK_PATTERN.search(name) is not None


def embedding_name(names: Iterable[str]) -> str | None:
    """The input embedding among `names`: the shortest name with an embedding suffix."""
    cands = [n for n in names if n.endswith(EMBED_SUFFIXES)]
    return min(cands, key=len) if cands else None

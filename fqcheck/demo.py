"""Write a small broken export to try fqcheck on: `python -m fqcheck.demo DIR`.

Pure Python (no torch): a tiny Llama-shaped bf16 checkpoint in two shards with an index and a
config.json, damaged the way real FakeQuant exports get damaged (see the Model Optimizer
offload-export bug report, PR 1194):
  - quantizer state leaked into the weights (`*.input_quantizer._amax`, `*.weight_quantizer._amax`),
  - config.json's auto_map names a modeling file that was never copied,
  - a stale shard from an earlier 3-shard export still sits in the folder, outside the index,
  - the second shard's header has no `__metadata__` (transformers refuses such files).
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

VOCAB, HIDDEN, FF, LAYERS, HEADS, KV_HEADS = 128, 32, 64, 2, 4, 2
KV = HIDDEN // HEADS * KV_HEADS
LEAKED = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
STALE = "model-00003-of-00003.safetensors"
MODELING = "modeling_llama_fq.py"


def _tensors() -> list[tuple[str, list[int]]]:
    out = [("model.embed_tokens.weight", [VOCAB, HIDDEN])]
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", [HIDDEN]), (f"{p}.post_attention_layernorm.weight", [HIDDEN]),
                (f"{p}.self_attn.q_proj.weight", [HIDDEN, HIDDEN]), (f"{p}.self_attn.k_proj.weight", [KV, HIDDEN]),
                (f"{p}.self_attn.v_proj.weight", [KV, HIDDEN]), (f"{p}.self_attn.o_proj.weight", [HIDDEN, HIDDEN]),
                (f"{p}.mlp.gate_proj.weight", [FF, HIDDEN]), (f"{p}.mlp.up_proj.weight", [FF, HIDDEN]),
                (f"{p}.mlp.down_proj.weight", [HIDDEN, FF])]
    return out + [("model.norm.weight", [HIDDEN]), ("lm_head.weight", [VOCAB, HIDDEN])]


def _bf16(n: int, seed: int) -> bytes:
    """n small pseudo-random bf16 values (the top half of float32s from an LCG)."""
    x = seed * 2654435761 % 2**32 or 1
    out = bytearray()
    for _ in range(n):
        x = (1103515245 * x + 12345) % 2**31
        out += struct.pack("<f", (x / 2**31 - 0.5) * 0.1)[2:]
    return bytes(out)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_safetensors(path: Path, tensors: list[tuple[str, str, list[int], bytes]], metadata: dict | None) -> None:
    """A safetensors file byte by byte: (name, dtype, shape, data) in order, header padded to 8."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    off = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b"".join(t[3] for t in tensors))


def build(out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    all_t = [(n, "BF16", s, _bf16(_numel(s), i)) for i, (n, s) in enumerate(_tensors())]
    for m in LEAKED:  # per-tensor amax scalars, as accelerate's offloaded save_pretrained writes them
        all_t.append((f"{m}.input_quantizer._amax", "F32", [], struct.pack("<f", 3.25)))
        all_t.append((f"{m}.weight_quantizer._amax", "F32", [], struct.pack("<f", 0.046875)))
    all_t.sort(key=lambda t: t[0])
    half = len(all_t) // 2
    parts = (all_t[:half], all_t[half:])
    write_safetensors(out / SHARDS[0], parts[0], {"format": "pt"})
    write_safetensors(out / SHARDS[1], parts[1], None)  # exported without __metadata__
    weight_map = {n: SHARDS[k] for k, part in enumerate(parts) for n, *_ in part}
    total = sum(len(t[3]) for t in all_t)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    # Left over from an earlier export into the same folder: not in the index, loaders may pick it up.
    stale = [t for t in all_t if t[0] in ("lm_head.weight", "model.norm.weight")]
    write_safetensors(out / STALE, stale, {"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "auto_map": {"AutoModelForCausalLM": f"{MODELING[:-3]}.LlamaForCausalLM"},  # file never copied
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FF, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 64,
        "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write("usage: python -m fqcheck.demo DIR   (writes a small broken export into DIR)\n")
        return 2
    out = Path(args[0])
    if out.exists() and any(out.iterdir()):
        sys.stderr.write(f"fqcheck.demo: {out} is not empty; give a new or empty folder\n")
        return 2
    build(out)
    print(f"wrote a small broken export to {out}")
    print(f"next: fqcheck lint {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fixture checkpoints, built by code: tiny random transformers models saved for real, then damaged
the way real exports get damaged (see shared/reference/modelopt-pr-1194-offload-export.txt)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_config(model_type: str = "llama", **overrides):
    from transformers import AutoConfig
    cfg = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    return cfg


def save_tiny_model(out: Path, model_type: str = "llama", *, dtype=torch.bfloat16, shards: int = 1,
                    tie: bool = False, seed: int = 0, **overrides) -> Path:
    """Save a tiny random model with transformers' own save_pretrained (the clean baseline)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, tie_word_embeddings=tie, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    out = Path(out)
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        max_shard = max(1, total // shards) + 1
        model.save_pretrained(out, max_shard_size=max_shard)
    else:
        model.save_pretrained(out)
    return out


def fresh(path) -> Path:
    """Unlink a regular file that is about to be rewritten. ext4 (auto_da_alloc, the default)
    flushes a file truncated and rewritten in place to disk on close: ~6 ms per small file, most
    of what the fuzz tests cost. A symlink stays: a test that writes through it means to."""
    path = Path(path)
    if path.is_file() and not path.is_symlink():
        path.unlink()
    return path


def read_index(d: Path) -> dict:
    return json.loads((Path(d) / "model.safetensors.index.json").read_text())


def write_index(d: Path, index: dict) -> None:
    fresh(Path(d) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def read_config(d: Path) -> dict:
    return json.loads((Path(d) / "config.json").read_text())


def write_config(d: Path, cfg: dict) -> None:
    fresh(Path(d) / "config.json").write_text(json.dumps(cfg, indent=2))


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(fresh(path)),
              metadata={"format": "pt"} if metadata is None else metadata)


def raw_safetensors(path: Path, header, data: bytes = b"", *, length: int | None = None) -> Path:
    """Write a safetensors file byte by byte: `header` is a dict (JSON-encoded) or raw bytes, and
    `length` overrides the 8-byte length prefix (to build hostile files)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    fresh(path).write_bytes(struct.pack("<Q", n) + hb + data)
    return Path(path)


def leak_quantizer_state(d: Path, modules=("model.layers.0.self_attn.q_proj",), amax: float = 2.5,
                         quantizers=("input_quantizer", "output_quantizer")) -> list[str]:
    """Add `*.<quantizer>._amax` to the first shard and the index, as accelerate's save_pretrained
    does for offloaded models (PR 1194). Activation quantizers by default: a leaked weight-quantizer
    amax beside these raw weights is evidence fix must decide first (tests/test_qnt_exports.py)."""
    d = Path(d)
    shard = sorted(d.glob("*.safetensors"))[0]
    tensors = load_shard(shard)
    added = []
    for m in modules:
        for q in quantizers:
            name = f"{m}.{q}._amax"
            tensors[name] = torch.tensor(amax, dtype=torch.float32)
            added.append(name)
    save_shard(shard, tensors)
    idx_path = d / "model.safetensors.index.json"
    if idx_path.exists():
        idx = read_index(d)
        for n in added:
            idx["weight_map"][n] = shard.name
        write_index(d, idx)
    return added


def edit_shard(d: Path, change, fname: str | None = None) -> str:
    """Rewrite one shard (the first by name unless given) with change(tensors) applied, keeping
    the index in step with what it now holds; returns the shard's name."""
    d = Path(d)
    fname = fname or sorted(p.name for p in d.glob("*.safetensors"))[0]
    tensors = load_shard(d / fname)
    before = set(tensors)
    change(tensors)
    save_shard(d / fname, tensors)
    if (d / "model.safetensors.index.json").exists():
        idx = read_index(d)
        for n in before - set(tensors):
            idx["weight_map"].pop(n)
        for n in set(tensors) - before:
            idx["weight_map"][n] = fname
        write_index(d, idx)
    return fname

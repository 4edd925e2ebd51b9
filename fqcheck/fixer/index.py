"""Index rebuild: model.safetensors.index.json from what the shards really hold."""
from __future__ import annotations

import json

from ..checkpoint.safetensors import TensorEntry


def total_size(entries) -> int:
    """What huggingface_hub's split_state_dict_into_shards_factory writes as metadata.total_size:
    the sum of the storage byte sizes of the stored tensors (each stored tensor counted once)."""
    return sum(e.nbytes for e in entries)


def build_index(old: dict | None, shards: dict[str, list[TensorEntry]], prefer: dict[str, str]) -> dict:
    """A fresh index for `shards` (file -> kept entries). A tensor held by several files maps to the
    file the old index named (`prefer`), else to the first file in sorted order."""
    weight_map: dict[str, str] = {}
    unique: dict[str, TensorEntry] = {}
    for fname in sorted(shards):
        for e in shards[fname]:
            if e.name not in weight_map or prefer.get(e.name) == fname:
                weight_map[e.name] = fname
                unique[e.name] = e
    meta = dict(old["metadata"]) if isinstance(old, dict) and isinstance(old.get("metadata"), dict) else {}
    meta["total_size"] = total_size(unique.values())
    if "total_parameters" in meta:
        meta["total_parameters"] = sum(e.numel for e in unique.values())
    return {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}


def dumps(index: dict) -> bytes:
    # transformers' save_pretrained format
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")

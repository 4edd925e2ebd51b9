"""Header dumps: what a producer wrote, minus the tensor data (small enough to commit).

Kept free of fqcheck and torch imports: the generators run it in their own virtualenvs."""
from __future__ import annotations

import json
import struct
from pathlib import Path


def dump_checkpoint(d: Path, producer: dict) -> dict:
    """{"producer", "json": {file: content}, "shards": {file: {tensor: [dtype, shape]}}}."""
    out = {"producer": producer, "json": {}, "shards": {}}
    for p in sorted(Path(d).iterdir()):
        if p.suffix == ".json":
            out["json"][p.name] = json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            with open(p, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            out["shards"][p.name] = {k: [v["dtype"], v["shape"]] for k, v in header.items()}
    return out


def rebuild(dump: dict, d: Path) -> Path:
    """A header-only checkpoint from a dump: the same JSON files and headers, data holes."""
    from .headers import write_safetensors
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    for name, content in dump["json"].items():
        (d / name).write_text(json.dumps(content, indent=1))
    for name, tensors in dump["shards"].items():
        write_safetensors(d / name, [(t, dt, shape) for t, (dt, shape) in tensors.items()])
    return d

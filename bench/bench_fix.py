"""Benchmark: `fqcheck fix` rewriting shards (leaked quantizer amax to drop) vs `cp` of the same files.

Builds N shards of random bf16 bytes (real files, a few GB), each with leaked `*_quantizer._amax`
tensors between the weights so every shard must be rewritten, warms the page cache for both, then
times in one run: `cp` of the shards, and `python3 -m fqcheck fix DIR` (in place, with backup,
including interpreter start, the lint, the rewrite with fsync, the commit and the re-lint).

    python3 bench/bench_fix.py --size-gb 2

Exit status 0 when both the CLI and the API meet the budget (>= 70 % of cp's throughput), 1 when not.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEAK_RULE = ('code = "BEN900"\nname = "leaked-amax"\nfamily = "ben"\nseverity = "error"\nlevel = "header"\n'
             'fix = "safe"\nsummary = "quantizer amax stored with the weights"\n[match]\n'
             'tensor_pattern = "_quantizer\\\\._amax$"\n')


def build(d: Path, size_gb: float, shards: int, tensor_mb: int) -> int:
    d.mkdir(parents=True)
    block = os.urandom(tensor_mb << 20)
    per_shard = int(size_gb * (1 << 30)) // shards
    n_tensors = max(1, per_shard // len(block))
    weight_map = {}
    total = 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        hdr, pos = {"__metadata__": {"format": "pt"}}, 0
        for t in range(n_tensors):
            layer = s * n_tensors + t
            w = f"model.layers.{layer}.mlp.down_proj.weight"
            rows = len(block) // 2 // 4096
            hdr[w] = {"dtype": "BF16", "shape": [rows, 4096], "data_offsets": [pos, pos + len(block)]}
            pos += len(block)
            for q in ("input_quantizer", "output_quantizer"):  # activation state: no weight to decide
                a = f"model.layers.{layer}.mlp.down_proj.{q}._amax"
                hdr[a] = {"dtype": "F32", "shape": [], "data_offsets": [pos, pos + 4]}
                pos += 4
            weight_map.update({k: name for k in hdr if k != "__metadata__"})
        blob = json.dumps(hdr, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(d / name, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for t in range(n_tensors):
                f.write(block)
                f.write(struct.pack("<ff", 2.5, 3.5))
        total += pos
    idx = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def warm(files) -> None:
    for p in files:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def time_cp(files, dst: Path) -> tuple[float, float]:
    dst.mkdir(exist_ok=True)
    t = time.perf_counter()
    subprocess.run(["cp", *map(str, files), str(dst)], check=True)
    t_cp = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(["sync"], check=True)
    t_sync = time.perf_counter() - t
    shutil.rmtree(dst)
    subprocess.run(["sync"], check=True)
    return t_cp, t_sync


BUDGET = 0.70  # default budget: fix's throughput as a fraction of cp's (DESIGN.md)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--tensor-mb", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / "out" / "fix")
    ap.add_argument("--budget", type=float, default=BUDGET, help="least fraction of the baseline's throughput")
    args = ap.parse_args()

    shutil.rmtree(args.dir, ignore_errors=True)
    src, dst, rules = args.dir / "ckpt", args.dir / "cp", args.dir / "rules"
    rules.mkdir(parents=True)
    (rules / "BEN900.toml").write_text(LEAK_RULE)
    nbytes = build(src, args.size_gb, args.shards, args.tensor_mb)
    shards = sorted(src.glob("*.safetensors"))
    subprocess.run(["sync"], check=True)
    warm(shards)

    t_cp, t_sync = time_cp(shards, dst)
    warm(shards)

    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fqcheck", "fix", str(src), "--rules", str(rules)],
                         cwd=ROOT, capture_output=True, text=True)
    t_fix = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"fix failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    assert "no findings remain" in out.stdout
    # cp once more, after fix (the originals now sit in the backup): keep the faster cp, so the
    # ratio does not profit from the order of the runs
    backup = sorted((src / ".fqcheck" / "backup").iterdir())[-1]
    originals = sorted(backup.glob("*.safetensors"))
    subprocess.run(["sync"], check=True)
    warm(originals)
    t_cp2, t_sync2 = time_cp(originals, dst)
    if t_cp2 < t_cp:
        t_cp, t_sync = t_cp2, t_sync2
    # the same fix through the Python API (no interpreter start): restore the originals, warm, time
    subprocess.run([sys.executable, "-m", "fqcheck", "restore", str(src)], cwd=ROOT, check=True,
                   capture_output=True)
    subprocess.run(["sync"], check=True)
    warm(shards)
    sys.path.insert(0, str(ROOT))
    import fqcheck
    t = time.perf_counter()
    res = fqcheck.fix(src, rules_dirs=[rules])
    t_api = time.perf_counter() - t
    assert res.ok and len(res.written) == len(shards) + 1

    gb = nbytes / 1e9
    print(f"shards: {len(shards)} x {nbytes / len(shards) / 1e6:.0f} MB = {gb:.2f} GB, all rewritten "
          f"(leaked amax dropped), page cache warm")
    print(f"cp (best of 2): {t_cp:7.2f} s  {gb / t_cp:6.2f} GB/s   (cp + sync: {t_cp + t_sync:.2f} s, "
          f"{gb / (t_cp + t_sync):.2f} GB/s)")
    print(f"fqcheck fix:   {t_fix:7.2f} s  {gb / t_fix:6.2f} GB/s   (includes fsync, lint, commit, re-lint)")
    print(f"fqcheck.fix(): {t_api:7.2f} s  {gb / t_api:6.2f} GB/s   (Python API, no interpreter start)")
    print(f"ratio fix/cp:  {t_cp / t_fix:7.2%} CLI, {t_cp / t_api:.2%} API   (budget >= {args.budget:.0%});  "
          f"vs cp+sync: {(t_cp + t_sync) / t_fix:.2%} CLI, {(t_cp + t_sync) / t_api:.2%} API")
    shutil.rmtree(args.dir, ignore_errors=True)
    ok = min(t_cp / t_fix, t_cp / t_api) >= args.budget
    print("budget:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

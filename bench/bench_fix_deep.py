"""Benchmark: `fqcheck fix --deep --output` re-folding weights left unquantized vs `cp` + fsync.

Builds a FakeQuant FP8 export in N shards (real files): bf16 linear weights, every one with a leaked
`weight_quantizer._amax` (QNT001) and a quantizer state file; `--refold` of the bytes (default 10 %)
are weights the export left unquantized (QNT002), the rest are folded. Page cache warm, then in one
run: `cp` of the shards + `sync` (the baseline), and the fix three ways:
- writer: what `fix` runs between its lint and its re-lint (fqcheck.fixer.runner._write_copy: every
  shard rewritten with the QNT001 drops and the re-folds, fsynced), given the plan of a real lint;
- api: `fqcheck.fix(src, deep=True, output=dst)` in process: lint --deep, write, re-lint --deep;
- cli: `python3 -m fqcheck fix --deep --output` (adds interpreter start and imports).
Exits 1 when the writer or the API misses the budget (>= 70 % of cp + fsync). Also times the deep
lint alone with --jobs 1 and --jobs 2 (interleaved, best of 3): how the data pass scales.

    python3 bench/bench_fix_deep.py [--size-gb 1 --shards 4 --refold 0.1 --device auto --jobs 0]
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
BUDGET = 0.70
COLS = 4096


def build(d: Path, size_gb: float, shards: int, refold: float, tensor_mb: int) -> tuple[int, int]:
    import torch
    from safetensors.torch import save_file

    from fqbuild import quant_cfg, write_state
    from fqcheck.quant.formats import QuantSpec
    from fqcheck.quant.kernels import fold_fast

    d.mkdir(parents=True)
    rows = (tensor_mb << 20) // (2 * COLS)
    n = max(shards, round(size_gb * (1 << 30) / (rows * COLS * 2)))
    n_raw = max(1, round(n * refold))
    raw_every = n / n_raw
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(rows, COLS, generator=g) * 0.02).to(torch.bfloat16)
    modules, weight_map, raw_bytes, data_bytes = [], {}, 0, 0
    per_shard = -(-n // shards)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
            m = f"model.layers.{i}.mlp.down_proj"
            w = base.roll(i, 1)
            amax = w.float().abs().amax().to(torch.bfloat16)
            if int(i % raw_every) == 0 and raw_bytes < n_raw * w.numel() * 2:
                raw_bytes += w.numel() * 2  # left unquantized: QNT002 re-folds it
            else:
                w = fold_fast(w, QuantSpec("fp8", amax.float()), "cpu")
            tensors[f"{m}.weight"] = w
            tensors[f"{m}.weight_quantizer._amax"] = amax
            modules.append(m)
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        data_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
    size = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    idx = {"metadata": {"total_size": data_bytes},
           "weight_map": dict(sorted(weight_map.items()))}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx, indent=2))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                               "torch_dtype": "bfloat16"}))
    write_state(d, modules, quant_cfg({"num_bits": (4, 3)}, {"num_bits": (4, 3)}))
    return size, raw_bytes


def _previous_producer(refold):
    def produce(raw):
        import torch

        from fqcheck.quant.formats import fold, resolve_device
        w = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).reshape(refold.shape)
        out = fold(w, refold.spec, resolve_device(refold.device)).contiguous()
        return out.view(torch.uint8).numpy().tobytes()
    return produce


def warm(files) -> None:
    for p in files:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


def time_cp(src: Path, dst: Path) -> float:
    """cp of the whole checkpoint folder, then sync (what fix --output must do at least)."""
    shutil.rmtree(dst, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    took = time.perf_counter() - t
    shutil.rmtree(dst)
    subprocess.run(["sync"], check=True)
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--refold", type=float, default=0.10, help="fraction of the bytes left unquantized")
    ap.add_argument("--tensor-mb", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=0, help="--jobs for the fix runs (0: auto)")
    ap.add_argument("--skip-cli", action="store_true", help="leave out the CLI run (interpreter start)")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / "out" / "fix_deep")
    args = ap.parse_args()

    import fqcheck
    from fqcheck.checkpoint import Checkpoint
    from fqcheck.fixer.plan import make_plan
    from fqcheck.fixer.runner import _write_copy
    from fqcheck.workers import devices

    shutil.rmtree(args.dir, ignore_errors=True)
    src, dst = args.dir / "ckpt", args.dir / "out"
    size, raw = build(src, args.size_gb, args.shards, args.refold, args.tensor_mb)
    files = sorted(src.iterdir())
    subprocess.run(["sync"], check=True)
    opts = dict(deep=True, device=args.device, ignore=["ARC"], quiet=True, jobs=args.jobs)

    # the plan comes from a real deep lint (timed on its own: it is the fix's first step)
    warm(files)
    t = time.perf_counter()
    report = fqcheck.lint(src, **opts)
    t_lint = time.perf_counter() - t
    codes = sorted({f.code for f in report.findings})
    n_refold = sum(f.code == "QNT002" for f in report.findings)
    assert codes == ["QNT001", "QNT002"] and n_refold, (codes, n_refold)
    plan = make_plan(Checkpoint.open(src), report.findings)
    workers = devices(args.device, args.jobs)  # where the fix's re-folds run (fqcheck.workers)

    # the same writer with the producer the re-fold had before (a bytearray copy of the source bytes,
    # formats.fold over the whole tensor, .numpy().tobytes()): what this writer path replaced
    previous = copy.deepcopy(plan)
    for sp in previous.shards.values():
        sp.replace = {t: _previous_producer(p) for t, p in sp.replace.items()}

    results = {}
    for rep in range(2):  # best of two for each, cp first and last so order does not favour either
        results.setdefault("cp", []).append(time_cp(src, dst))
        warm(files)
        t = time.perf_counter()
        _write_copy(Checkpoint.open(src), plan, dst, False, workers)
        subprocess.run(["sync"], check=True)
        results.setdefault("writer", []).append(time.perf_counter() - t)
        shutil.rmtree(dst)
        if rep == 0:
            warm(files)
            t = time.perf_counter()
            _write_copy(Checkpoint.open(src), previous, dst, False)
            subprocess.run(["sync"], check=True)
            results.setdefault("previous writer", []).append(time.perf_counter() - t)
            shutil.rmtree(dst)
        warm(files)
        t = time.perf_counter()
        res = fqcheck.fix(src, output=dst, **opts)
        subprocess.run(["sync"], check=True)
        results.setdefault("api", []).append(time.perf_counter() - t)
        assert res.ok and {f.code for f in res.applied} == {"QNT001", "QNT002"}, res.remaining
        shutil.rmtree(dst)
        if not args.skip_cli:
            warm(files)
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "fqcheck", "fix", str(src), "--deep", "--ignore", "ARC",
                                  "--device", args.device, "--jobs", str(args.jobs), "--output", str(dst)],
                                 cwd=ROOT, capture_output=True, text=True)
            subprocess.run(["sync"], check=True)
            results.setdefault("cli", []).append(time.perf_counter() - t)
            if out.returncode != 0:
                sys.exit(f"fix failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
            shutil.rmtree(dst)
    results["cp"].append(time_cp(src, dst))
    lints: dict[int, list] = {}
    for rep in range(3):  # the deep pass alone on one and on two workers, interleaved
        for jobs in (1, 2):
            warm(files)
            t = time.perf_counter()
            fqcheck.lint(src, **{**opts, "jobs": jobs})
            lints.setdefault(jobs, []).append(time.perf_counter() - t)
    best = {k: min(v) for k, v in results.items()}
    gb = size / 1e9
    print(f"checkpoint: {gb:.2f} GB in {args.shards} shards, {raw / size:.0%} of its bytes re-folded "
          f"({n_refold} FP8 weights), device {args.device}, --jobs {args.jobs}; page cache warm; best of 2-3")
    print(f"lint --deep alone (the fix runs it, then a re-lint): {t_lint:6.2f} s")
    l1, l2 = min(lints[1]), min(lints[2])
    print(f"lint --deep --jobs 1 {l1:6.2f} s, --jobs 2 {l2:6.2f} s: {l1 / l2:4.2f}x "
          f"({gb / l1:.2f} and {gb / l2:.2f} GB/s; best of 3, interleaved)")
    missed = []
    for k in ("cp", "writer", "previous writer", "api", "cli"):
        if k not in best:
            continue
        ratio = best["cp"] / best[k]
        line = f"{k + (' + sync' if k == 'cp' else ''):15s} {best[k]:7.2f} s  {gb / best[k]:6.2f} GB/s"
        if k != "cp":
            line += f"   {ratio:6.1%} of cp + sync"
            if k in ("writer", "api") and ratio < BUDGET:
                missed.append(k)
                line += f"   MISSED budget {BUDGET:.0%}"
        print(line)
    shutil.rmtree(args.dir, ignore_errors=True)
    if missed:
        sys.exit(f"bench_fix_deep: {', '.join(missed)} below {BUDGET:.0%} of cp + sync")


if __name__ == "__main__":
    main()

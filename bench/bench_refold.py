"""Re-fold on one GPU, every format, against limits measured in the same run; exits 1 on a missed budget.

Kernel: GB/s of bf16 weight through `staging.fold_on_device` (what fold_fast runs on a piece already
on the GPU: one Triton pass) and through formats.py's torch ops (the reference), against a bf16
clone of the same weights (budget: >= 25 % of the clone for FP8/INT8, >= 10 % for the block formats).
Bit identity: fold_on_device == formats.quantize(...).to(dtype) on the GPU, random and edge weights,
bf16/fp16/fp32. Memory: peak GPU memory beyond input and output, per input byte (budget <= 2).
End to end: `fold_fast(w_cpu, spec, "cuda:0")` from pageable CPU tensors (as the mmap reader hands
them over) into page-locked output, against the pinned-copy limit: the same bytes copied pinned
host -> GPU and GPU -> host at once on two streams (budget >= 60 %); formats.fold shown beside it.

    python3 bench/bench_refold.py [--rows 8192 --cols 8192 --count 4] [--out result.json]
    python3 bench/bench_refold.py --cpu [--rows 4096 --cols 4096 --count 1]   (no GPU: fold_fast vs formats.fold
                                         on the CPU, bit identity checked; exits 1 on a difference)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fqcheck.quant import staging  # noqa: E402
from fqcheck.quant.formats import QuantSpec, differing, fold, quantize  # noqa: E402
from fqcheck.quant.kernels import fold_fast  # noqa: E402

ELEMENTWISE = ("fp8", "fp8_axis", "int8", "int8_axis")
BUDGET = {"kernel_elementwise": 0.25, "kernel_block": 0.10, "memory": 2.0, "e2e": 0.60}


def specs(w: torch.Tensor) -> dict:
    x = w.float()
    return {"fp8": QuantSpec("fp8", x.abs().amax()), "fp8_axis": QuantSpec("fp8", x.abs().amax(1, keepdim=True)),
            "int8": QuantSpec("int", x.abs().amax(), 8, False, False),
            "int8_axis": QuantSpec("int", x.abs().amax(1, keepdim=True), 8, False, True),
            "int4_block": QuantSpec("int", x.reshape(-1, 128).abs().amax(1, keepdim=True), 4, False, True, 128),
            "nvfp4": QuantSpec("nvfp4", x.abs().amax(), block_size=16),
            "mxfp8": QuantSpec("mxfp8", None, block_size=32), "mxfp4": QuantSpec("mxfp4", None, block_size=32)}


def gpu_gbs(fn, weights, reps=3) -> float:
    for w in weights[:2]:
        fn(w)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        start.record()
        for w in weights:
            fn(w)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return sum(w.numel() * w.element_size() for w in weights) / best / 1e9


def wall_gbs(fn, weights, reps=3) -> float:
    fn(weights[0])
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in weights:
            fn(w)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return sum(w.numel() * w.element_size() for w in weights) / best / 1e9


def extra_memory(fn, w) -> float:
    """Peak GPU bytes beyond the input and the output, per input byte."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(w)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()
    return max(0, extra) / (w.numel() * w.element_size())


def identity(dev) -> dict:
    """Differing elements, fold_on_device vs formats on the GPU, per format over several weights."""
    bad = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for seed, shape in enumerate(((1024, 4096), (64, 128), (512, 1536))):
            g = torch.Generator(device=dev).manual_seed(seed)
            w = torch.randn(*shape, device=dev, generator=g) * 10 ** (seed - 2)
            w[0, :6] = torch.tensor([0.0, -0.0, 1e-30, -1e-8, 2 ** -24, 2 ** -25])
            w[1] = 0.0
            w[2, :40] = torch.linspace(-3, 3, 40)
            w = w.to(dtype)
            for name, spec in specs(w).items():
                n = differing(staging.fold_on_device(w, spec), quantize(w.float(), spec).to(dtype))
                bad[name] = bad.get(name, 0) + n
    return bad


def pinned_limit(cpu_w, dev) -> float:
    """Round trip limit: every byte copied pinned host -> GPU and GPU -> host, both at once."""
    host = [w.pin_memory() for w in cpu_w]
    back = [torch.empty_like(w).pin_memory() for w in cpu_w]
    on_gpu = [w.to(dev) for w in cpu_w]
    s_in, s_out = torch.cuda.Stream(), torch.cuda.Stream()
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for h, b, g in zip(host, back, on_gpu):
            with torch.cuda.stream(s_in):
                g.copy_(h, non_blocking=True)
            with torch.cuda.stream(s_out):
                b.copy_(g, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return sum(w.numel() * w.element_size() for w in cpu_w) / best / 1e9


def cpu_main(args) -> None:
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(args.rows, args.cols, generator=g) * 0.02).to(torch.bfloat16) for _ in range(args.count)]
    nbytes = sum(w.numel() * 2 for w in ws)
    print(f"CPU, {torch.get_num_threads()} torch threads, {args.count} x bf16[{args.rows}x{args.cols}]")
    print(f"{'format':11s} {'fold_fast GB/s':>14s} {'formats.fold GB/s':>17s} {'speed-up':>8s}")
    bad = []
    for name, spec in specs(ws[0]).items():
        t = {}
        for label, fn in (("fast", lambda w, s=spec: fold_fast(w, s, "cpu")), ("ref", lambda w, s=spec: fold(w, s, "cpu"))):
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                outs = [fn(w) for w in ws]
                best = min(best, time.perf_counter() - t0)
            t[label] = (nbytes / best / 1e9, outs)
        n = sum(differing(a, b) for a, b in zip(t["fast"][1], t["ref"][1]))
        if n:
            bad.append(f"{name}: {n} differ")
        print(f"{name:11s} {t['fast'][0]:14.3f} {t['ref'][0]:17.3f} {t['fast'][0] / t['ref'][0]:7.1f}x"
              + (f"  {n} DIFFER" if n else ""))
    if bad:
        sys.exit("bench_refold --cpu: " + "; ".join(bad))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--e2e-only", action="store_true", help="only the host -> GPU -> host figures")
    ap.add_argument("--piece-mb", type=int, default=staging.PIECE_BYTES >> 20, help="staged piece size")
    ap.add_argument("--slots", type=int, default=staging.SLOTS, help="pieces in flight")
    ap.add_argument("--out")
    args = ap.parse_args()
    staging.PIECE_BYTES, staging.SLOTS = args.piece_mb << 20, args.slots
    if args.cpu:
        return cpu_main(args)
    if not torch.cuda.is_available():
        sys.exit("bench_refold: needs a CUDA GPU")
    dev = torch.device("cuda")
    if staging._folds() is None:
        sys.exit("bench_refold: Triton did not load")
    g = torch.Generator(device=dev).manual_seed(0)
    gpu_w = [(torch.randn(args.rows, args.cols, device=dev, generator=g) * 0.02).to(torch.bfloat16)
             for _ in range(args.count)]
    sp = specs(gpu_w[0])
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "weights": f"{args.count} x bf16[{args.rows}x{args.cols}]",
           "pieces": f"{args.piece_mb} MB x {args.slots} slots",
           "identity_differing": {} if args.e2e_only else identity(dev)}
    clone = gpu_gbs(lambda w: w.clone(), gpu_w)
    res["clone_GBps"] = clone
    res["kernel"] = {}
    for name, spec in ({} if args.e2e_only else sp).items():
        fast = gpu_gbs(lambda w, s=spec: staging.fold_on_device(w, s), gpu_w)
        ref = gpu_gbs(lambda w, s=spec: quantize(w.float(), s).to(torch.bfloat16), gpu_w)
        res["kernel"][name] = {"fast_GBps": fast, "formats_GBps": ref, "fast_vs_clone": fast / clone,
                               "extra_mem_per_byte": extra_memory(lambda w, s=spec: staging.fold_on_device(w, s), gpu_w[0]),
                               "formats_extra_mem_per_byte": extra_memory(
                                   lambda w, s=spec: quantize(w.float(), s).to(torch.bfloat16), gpu_w[0])}
    cpu_w = [w.cpu() for w in gpu_w]
    del gpu_w
    torch.cuda.empty_cache()
    limit = pinned_limit(cpu_w, dev)
    res["pinned_roundtrip_limit_GBps"] = limit
    staged = torch.empty(cpu_w[0].shape, dtype=cpu_w[0].dtype, pin_memory=True)
    res["host_copy_to_pinned_GBps"] = wall_gbs(lambda w: staged.copy_(w), cpu_w)
    res["e2e"] = {}
    one = torch.device("cuda", 0)
    for name in ("fp8", "int8_axis", "nvfp4", "mxfp4"):
        spec = specs(cpu_w[0])[name]
        fast = wall_gbs(lambda w, s=spec: fold_fast(w, s, one), cpu_w)
        old = wall_gbs(lambda w, s=spec: fold(w, s, one), cpu_w, reps=1)
        res["e2e"][name] = {"fold_fast_GBps": fast, "formats_fold_GBps": old, "vs_limit": fast / limit}

    missed = [f"identity {k}: {n} differ" for k, n in res["identity_differing"].items() if n]
    rows = [f"{'format':11s} {'fast GB/s':>10s} {'formats':>8s} {'vs clone':>9s} {'mem/B':>6s} {'formats mem/B':>13s}"]
    for name, r in res["kernel"].items():
        need = BUDGET["kernel_elementwise" if name in ELEMENTWISE else "kernel_block"]
        flag = "" if r["fast_vs_clone"] >= need else f"  MISSED >= {need:.0%}"
        if r["extra_mem_per_byte"] > BUDGET["memory"]:
            flag += f"  MISSED memory <= {BUDGET['memory']}x"
        if flag:
            missed.append(f"kernel {name}:{flag}")
        rows.append(f"{name:11s} {r['fast_GBps']:10.0f} {r['formats_GBps']:8.0f} {r['fast_vs_clone']:9.1%} "
                    f"{r['extra_mem_per_byte']:6.2f} {r['formats_extra_mem_per_byte']:13.2f}{flag}")
    rows.append(f"bf16 clone: {clone:.0f} GB/s; pinned host->GPU->host limit (both ways at once): {limit:.1f} GB/s; "
                f"host copy pageable -> pinned {res['host_copy_to_pinned_GBps']:.1f} GB/s; pieces {res['pieces']}")
    for name, r in res["e2e"].items():
        flag = "" if r["vs_limit"] >= BUDGET["e2e"] else f"  MISSED >= {BUDGET['e2e']:.0%}"
        if flag:
            missed.append(f"e2e {name}:{flag}")
        rows.append(f"e2e {name:9s} fold_fast {r['fold_fast_GBps']:6.1f} GB/s ({r['vs_limit']:.0%} of the limit); "
                    f"formats.fold {r['formats_fold_GBps']:6.1f} GB/s{flag}")
    rows.append("identity (elements differing from formats on the GPU): "
                + ", ".join(f"{k} {n}" for k, n in res["identity_differing"].items()))
    res["missed"] = missed
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"{res['device']}, torch {res['torch']}, {res['weights']}")
    print("\n".join(rows))
    if missed:
        sys.exit("bench_refold: missed: " + "; ".join(missed))


if __name__ == "__main__":
    main()

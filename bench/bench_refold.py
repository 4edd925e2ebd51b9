"""Re-fold throughput on one GPU: GB/s of bf16 weight through fqcheck's NVFP4 and FP8 fold.

Kernel time: CUDA events around `quantize(w.float(), spec).to(bf16)` on weights already on the GPU
(what `fold` runs there). End to end: `fold(w_cpu, spec, "cuda")`, host -> device -> fold -> host,
from pageable host tensors as the mmap reader hands them over (fold stages them through page-locked
buffers). Baselines on the same GPU in the same run: a bf16 copy, and the `w.float().to(bf16)` round
trip the fold starts and ends with (kernel); host -> device -> host copies alone, pageable and pinned
(end to end).

    python3 bench/bench_refold.py [--rows 8192 --cols 8192 --count 8] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fqcheck.quant.formats import QuantSpec, fold, quantize  # noqa: E402


def kernel_gbs(fn, weights, reps=3) -> float:
    for w in weights[:2]:
        fn(w)  # warm up (allocator, kernels)
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


def e2e_gbs(fn, weights, reps=2) -> float:
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


def _pinned_roundtrip(w, dev, fn):
    """Host -> device -> fn -> host through page-locked staging buffers (what a pinned reader would do)."""
    src = w.pin_memory()
    out = fn(src.to(dev, non_blocking=True))
    dst = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    dst.copy_(out)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_refold: needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    gpu_w = [(torch.randn(args.rows, args.cols, device=dev, generator=g) * 0.02).to(torch.bfloat16)
             for _ in range(args.count)]
    amax = gpu_w[0].float().abs().amax().cpu()
    specs = {"nvfp4": QuantSpec("nvfp4", amax, block_size=16), "fp8": QuantSpec("fp8", amax)}
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "weights": f"{args.count} x bf16[{args.rows}x{args.cols}]",
           "bytes": sum(w.numel() * 2 for w in gpu_w), "kernel_GBps": {}, "e2e_GBps": {}}
    res["kernel_GBps"]["baseline_copy"] = kernel_gbs(lambda w: w.clone(), gpu_w)
    res["kernel_GBps"]["baseline_float_roundtrip"] = kernel_gbs(lambda w: w.float().to(torch.bfloat16), gpu_w)
    for name, spec in specs.items():
        res["kernel_GBps"][name] = kernel_gbs(lambda w, s=spec: quantize(w.float(), s).to(torch.bfloat16), gpu_w)
    cpu_w = [w.cpu() for w in gpu_w[:4]]
    del gpu_w
    torch.cuda.empty_cache()
    res["e2e_GBps"]["baseline_h2d_d2h"] = e2e_gbs(lambda w: w.to(dev).cpu(), cpu_w)
    res["e2e_GBps"]["baseline_h2d_d2h_pinned"] = e2e_gbs(lambda w: _pinned_roundtrip(w, dev, lambda g: g), cpu_w)
    for name, spec in specs.items():
        res["e2e_GBps"][name] = e2e_gbs(lambda w, s=spec: fold(w, s, dev), cpu_w)
        res["e2e_GBps"][name + "_bench_pinned_helper"] = e2e_gbs(
            lambda w, s=spec: _pinned_roundtrip(w, dev, lambda g: quantize(g.float(), s).to(torch.bfloat16)), cpu_w)
    t0 = time.perf_counter()
    fold(cpu_w[0], specs["nvfp4"], "cpu")
    res["cpu_nvfp4_GBps_one_tensor"] = cpu_w[0].numel() * 2 / (time.perf_counter() - t0) / 1e9
    k = res["kernel_GBps"]
    res["ratio_vs_float_roundtrip"] = {n: k[n] / k["baseline_float_roundtrip"] for n in specs}
    out = json.dumps(res, indent=2)
    print(out)
    if args.out:
        Path(args.out).write_text(out)


if __name__ == "__main__":
    main()

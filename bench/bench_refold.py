"""Re-fold on one GPU, every format, against limits measured in the same run; exits 1 on a missed budget.

Every figure is the median over --rounds rounds, and each round times the limit and every format
one after another, so a ratio compares timings taken seconds apart on the same machine.
Kernel: GB/s of bf16 weight through `staging.fold_on_device` (what fold_fast runs on a piece already
on the GPU: one Triton pass) and through formats.py's torch ops (the reference), against a bf16
clone of the same weights (budget: >= 25 % of the clone for FP8/INT8, >= 10 % for the block formats).
The quantizer specs hold their amax as float32 CPU tensors, as fqcheck's resolver hands them over.
Bit identity: fold_on_device == formats.quantize(...).to(dtype) on the GPU, random and edge weights,
bf16/fp16/fp32. Memory: peak GPU memory beyond input and output, per input byte (budget <= 2).
End to end: `fold_fast(w_cpu, spec, "cuda:0")` from pageable memory into page-locked output, against
the pinned-copy limit: the same bytes copied pinned host -> GPU and GPU -> host at once on two
streams (budget >= 60 %). Two sources: `mapped`, views of a read-only map of a file in the page
cache, off page boundaries (what the fix writer hands over), and `anon`, ordinary CPU tensors;
formats.fold shown beside them.

    python3 bench/bench_refold.py [--rows 8192 --cols 8192 --count 4 --rounds 7] [--out result.json]
    python3 bench/bench_refold.py --cpu [--rows 4096 --cols 4096 --count 1]   (no GPU: fold_fast vs formats.fold
                                         on the CPU, bit identity checked; exits 1 on a difference)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fqcheck.quant import staging  # noqa: E402
from fqcheck.quant.formats import QuantSpec, differing, fold, quantize  # noqa: E402
from fqcheck.quant.kernels import fold_fast  # noqa: E402

ELEMENTWISE = ("fp8", "fp8_axis", "int8", "int8_axis")
BUDGET = {"kernel_elementwise": 0.25, "kernel_block": 0.10, "memory": 2.0, "e2e": 0.60}


def specs(w: torch.Tensor) -> dict:
    x = w.float().cpu()
    return {"fp8": QuantSpec("fp8", x.abs().amax()), "fp8_axis": QuantSpec("fp8", x.abs().amax(1, keepdim=True)),
            "int8": QuantSpec("int", x.abs().amax(), 8, False, False),
            "int8_axis": QuantSpec("int", x.abs().amax(1, keepdim=True), 8, False, True),
            "int4_block": QuantSpec("int", x.reshape(-1, 128).abs().amax(1, keepdim=True), 4, False, True, 128),
            "nvfp4": QuantSpec("nvfp4", x.abs().amax(), block_size=16),
            "mxfp8": QuantSpec("mxfp8", None, block_size=32), "mxfp4": QuantSpec("mxfp4", None, block_size=32)}


def gpu_seconds(fn, weights) -> float:
    """GPU time of fn over every weight, once (CUDA events around the launches)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for w in weights:
        fn(w)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def wall_seconds(fn, weights) -> float:
    """Wall time of fn over every weight, once, until the GPU is done."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for w in weights:
        fn(w)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def rounds(timers: dict, n: int) -> dict:
    """name -> the n times of timers[name](), the timers run one after another in each round (the
    first round, warming up, is dropped)."""
    times = {k: [] for k in timers}
    for r in range(n + 1):
        for k, t in timers.items():
            v = t()
            if r:
                times[k].append(v)
    return times


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


def pinned_roundtrip(cpu_w, dev):
    """A timer of the round-trip limit: every byte copied pinned host -> GPU and GPU -> host, both
    at once on two streams."""
    host = [w.pin_memory() for w in cpu_w]
    back = [torch.empty_like(w).pin_memory() for w in cpu_w]
    on_gpu = [w.to(dev) for w in cpu_w]
    s_in, s_out = torch.cuda.Stream(), torch.cuda.Stream()

    def once():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for h, b, g in zip(host, back, on_gpu):
            with torch.cuda.stream(s_in):
                g.copy_(h, non_blocking=True)
            with torch.cuda.stream(s_out):
                b.copy_(g, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    return once


def copy_beside_roundtrip(cpu_w, roundtrip, staged) -> tuple[float, float]:
    """(GB/s of the host copy pageable -> page-locked, HOST_THREADS threads as the pipeline runs it,
    while the pinned round trip runs beside it; GB/s of that round trip meanwhile): the two share
    the host's memory bus, and a staged pipeline can go no faster than the first."""
    stop, copied = threading.Event(), [0]
    nbytes = cpu_w[0].numel() * cpu_w[0].element_size()
    step = -(-nbytes // staging.HOST_THREADS)

    def copier():
        with ThreadPoolExecutor(staging.HOST_THREADS) as pool:
            while not stop.is_set():
                for w in cpu_w:
                    list(pool.map(lambda o: ctypes.memmove(staged.data_ptr() + o, w.data_ptr() + o, min(step, nbytes - o)),
                                  range(0, nbytes, step)))
                    copied[0] += nbytes
    t = threading.Thread(target=copier)
    t.start()
    time.sleep(0.05)
    c0, t0 = copied[0], time.perf_counter()
    took = sum(roundtrip() for _ in range(5))
    c1, t1 = copied[0], time.perf_counter()
    stop.set()
    t.join()
    return (c1 - c0) / (t1 - t0) / 1e9, 5 * len(cpu_w) * nbytes / took / 1e9


def mapped_copies(cpu_w):
    """The weights as the fix writer hands them to fold_fast: views of a read-only map of a file (in
    the page cache) holding them after a header that leaves them off page boundaries."""
    import mmap
    import tempfile
    f = tempfile.TemporaryFile()
    f.write(b"\0" * 4104)
    for w in cpu_w:
        f.write(w.view(torch.uint8).numpy().tobytes())
    f.flush()
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():  # torch warns that it may not write the buffer (nothing does)
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(mm, dtype=torch.uint8)
    out, o = [], 4104
    for w in cpu_w:
        n = w.numel() * w.element_size()
        out.append(flat[o:o + n].view(w.dtype).view(w.shape))
        o += n
    return out


def median(v) -> float:
    return statistics.median(v)


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
    ap.add_argument("--rounds", type=int, default=7, help="rounds; figures are their medians")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--e2e-only", action="store_true", help="only the host -> GPU -> host figures")
    ap.add_argument("--piece-mb", type=int, default=staging.PIECE_BYTES >> 20, help="staged piece size")
    ap.add_argument("--slots", type=int, default=staging.SLOTS, help="pieces in flight")
    ap.add_argument("--host-threads", type=int, default=staging.HOST_THREADS, help="threads copying into pinned slots")
    ap.add_argument("--out")
    args = ap.parse_args()
    staging.PIECE_BYTES, staging.SLOTS, staging.HOST_THREADS = args.piece_mb << 20, args.slots, args.host_threads
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
    nbytes = sum(w.numel() * w.element_size() for w in gpu_w)
    timers = {"clone": lambda: gpu_seconds(lambda w: w.clone(), gpu_w)}
    for name, spec in ({} if args.e2e_only else sp).items():
        timers[name] = lambda s=spec: gpu_seconds(lambda w: staging.fold_on_device(w, s), gpu_w)
    t = rounds(timers, args.rounds)
    clone = nbytes / median(t["clone"]) / 1e9
    res["clone_GBps"] = clone
    res["kernel"] = {}
    for name, spec in ({} if args.e2e_only else sp).items():
        ratios = [c / f for c, f in zip(t["clone"], t[name])]
        ref = rounds({"r": lambda s=spec: gpu_seconds(lambda w: quantize(w.float(), s).to(torch.bfloat16), gpu_w)}, 2)["r"]
        res["kernel"][name] = {"fast_GBps": nbytes / median(t[name]) / 1e9, "formats_GBps": nbytes / median(ref) / 1e9,
                               "fast_vs_clone": median(ratios), "fast_vs_clone_min_max": [min(ratios), max(ratios)],
                               "extra_mem_per_byte": extra_memory(lambda w, s=spec: staging.fold_on_device(w, s), gpu_w[0]),
                               "formats_extra_mem_per_byte": extra_memory(
                                   lambda w, s=spec: quantize(w.float(), s).to(torch.bfloat16), gpu_w[0])}
    cpu_w = [w.cpu() for w in gpu_w]
    gpu_w.clear()
    torch.cuda.empty_cache()
    staged = torch.empty(cpu_w[0].shape, dtype=cpu_w[0].dtype, pin_memory=True)
    one = torch.device("cuda", 0)
    e2e = ("fp8", "int8_axis", "nvfp4", "mxfp4")
    cpu_specs = specs(cpu_w[0])
    sources = {"mapped": mapped_copies(cpu_w), "anon": cpu_w}
    timers = {"limit": pinned_roundtrip(cpu_w, dev), "host_copy": lambda: wall_seconds(lambda w: staged.copy_(w), cpu_w)}
    for name in e2e:
        for src, ws in sources.items():
            timers[f"{name}/{src}"] = lambda s=cpu_specs[name], ws=ws: wall_seconds(lambda w: fold_fast(w, s, one), ws)
    t = rounds(timers, args.rounds)
    limit = nbytes / median(t["limit"]) / 1e9
    res["pinned_roundtrip_limit_GBps"] = limit
    res["host_copy_to_pinned_GBps"] = nbytes / median(t["host_copy"]) / 1e9
    res["host_copy_beside_roundtrip_GBps"], res["roundtrip_beside_copy_GBps"] = copy_beside_roundtrip(
        cpu_w, timers["limit"], staged)
    res["e2e"] = {}
    for name in e2e:
        old = rounds({"r": lambda s=cpu_specs[name]: wall_seconds(lambda w: fold(w, s, one), cpu_w)}, 1)["r"]
        for key in (k for k in t if k.startswith(name + "/")):
            ratios = [lim / f for lim, f in zip(t["limit"], t[key])]
            res["e2e"][key] = {"fold_fast_GBps": nbytes / median(t[key]) / 1e9, "formats_fold_GBps": nbytes / median(old) / 1e9,
                               "vs_limit": median(ratios), "vs_limit_min_max": [min(ratios), max(ratios)]}

    missed = [f"identity {k}: {n} differ" for k, n in res["identity_differing"].items() if n]
    rows = [f"medians of {args.rounds} rounds; vs clone / vs limit: median of the per-round ratios (min-max)",
            f"{'format':11s} {'fast GB/s':>10s} {'formats':>8s} {'vs clone':>9s} {'(min-max)':>13s} {'mem/B':>6s} {'formats mem/B':>13s}"]
    for name, r in res["kernel"].items():
        need = BUDGET["kernel_elementwise" if name in ELEMENTWISE else "kernel_block"]
        flag = "" if r["fast_vs_clone"] >= need else f"  MISSED >= {need:.0%}"
        if r["extra_mem_per_byte"] > BUDGET["memory"]:
            flag += f"  MISSED memory <= {BUDGET['memory']}x"
        if flag:
            missed.append(f"kernel {name}:{flag}")
        lo, hi = r["fast_vs_clone_min_max"]
        rows.append(f"{name:11s} {r['fast_GBps']:10.0f} {r['formats_GBps']:8.0f} {r['fast_vs_clone']:9.1%} {lo:6.1%}-{hi:6.1%} "
                    f"{r['extra_mem_per_byte']:6.2f} {r['formats_extra_mem_per_byte']:13.2f}{flag}")
    rows.append(f"bf16 clone: {clone:.0f} GB/s; pinned host->GPU->host limit (both ways at once): {limit:.1f} GB/s; "
                f"host copy pageable -> pinned (torch copy_) {res['host_copy_to_pinned_GBps']:.1f} GB/s; pieces {res['pieces']}, "
                f"{staging.HOST_THREADS} host copy threads; with the round trip running beside it the host copy runs "
                f"{res['host_copy_beside_roundtrip_GBps']:.1f} GB/s (the round trip {res['roundtrip_beside_copy_GBps']:.1f}), "
                f"{res['host_copy_beside_roundtrip_GBps'] / limit:.0%} of the limit: the ceiling of a staged copy from pageable memory")
    for name, r in res["e2e"].items():
        flag = "" if r["vs_limit"] >= BUDGET["e2e"] else f"  MISSED >= {BUDGET['e2e']:.0%}"
        if flag:
            missed.append(f"e2e {name}:{flag}")
        lo, hi = r["vs_limit_min_max"]
        rows.append(f"e2e {name:16s} fold_fast {r['fold_fast_GBps']:6.1f} GB/s ({r['vs_limit']:.1%} of the limit, {lo:.1%}-{hi:.1%}); "
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

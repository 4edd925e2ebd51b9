#!/usr/bin/env python3
"""Probe: how fast can pageable host memory reach the GPU on this machine at all? The ceilings that
bound the re-fold's end-to-end figure (bench_refold.py, budget >= 60 % of the pinned round trip).

A GPU copies only from page-locked memory. Pageable bytes (a mapped shard) get there one of two ways:
- copied by the CPU into page-locked buffers (what quant/staging.py does): the copy shares the
  host's memory bus with both DMA directions, so its rate *while the round trip runs* bounds the
  pipeline;
- page-locked in place (the driver's cuMemHostRegister, read-only) and copied from where they lie:
  bounded by the lock and unlock rates, and by whether they overlap the copies.
Printed, each the best of --reps: the pinned round trip (both directions at once), the host copy
pageable -> page-locked alone and beside the round trip, lock and unlock rates of a mapped file
and of anonymous memory (1 and 4 threads), unlock beside running copies, the DMA rate from
memory locked in place, and a round trip that locks chunk by chunk ahead of its copies (no fold).
All against the round trip, in percent.

    python3 bench/probe_host_bus.py [--mb 1024 --reps 3]
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from bench_refold import mapped_copies, pinned_roundtrip  # this folder: run as python3 bench/probe_host_bus.py

PAGE = mmap.PAGESIZE


class Driver:
    """cuMemHostRegister / cuMemHostUnregister on the device's primary context (the driver API,
    by ctypes: the calls release the GIL)."""

    def __init__(self, ordinal: int = 0):
        cu = ctypes.CDLL("libcuda.so.1")
        self.reg, self.unreg, self.set = cu.cuMemHostRegister_v2, cu.cuMemHostUnregister, cu.cuCtxSetCurrent
        self.reg.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
        self.unreg.argtypes = self.set.argtypes = (ctypes.c_void_p,)
        dev, self.ctx = ctypes.c_int(), ctypes.c_void_p()
        assert not cu.cuDeviceGet(ctypes.byref(dev), ordinal)
        assert not cu.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev)

    def lock(self, ptr: int, n: int) -> None:
        self.set(self.ctx)
        err = self.reg(ptr, n, 0x01 | 0x08)  # PORTABLE | READ_ONLY
        if err:
            raise OSError(f"cuMemHostRegister: CUresult {err}")

    def unlock(self, ptr: int) -> None:
        self.set(self.ctx)
        self.unreg(ptr)


def aligned(t: torch.Tensor, n: int) -> torch.Tensor:
    return t[(-t.data_ptr()) % PAGE:][:n]


def best(fn, reps: int) -> float:
    return min(fn() for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024, help="bytes moved per measurement")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    n = args.mb << 20
    torch.empty(1, device="cuda")
    drv = Driver()
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    back = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(n, dtype=torch.uint8, device="cuda")
    anon = aligned(torch.ones(n + PAGE, dtype=torch.uint8), n)
    file = aligned(mapped_copies([torch.ones(n + PAGE, dtype=torch.uint8)])[0], n)  # a read-only map, in the page cache
    s_in, s_out = torch.cuda.Stream(), torch.cuda.Stream()
    roundtrip = pinned_roundtrip([anon], "cuda")  # bench_refold's limit, over n bytes

    def h2d(src) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def host_copy(src, threads=8) -> float:
        step = -(-n // threads)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda o: ctypes.memmove(pinned.data_ptr() + o, src.data_ptr() + o, min(step, n - o)),
                          range(0, n, step)))
        return time.perf_counter() - t0

    def beside(background, foreground, rounds=4):
        """(background's rate, foreground's best time) with background looping meanwhile."""
        stop, times = threading.Event(), []

        def loop():
            while not stop.is_set():
                times.append(background())
        t = threading.Thread(target=loop)
        t.start()
        time.sleep(0.05)
        fg = min(foreground() for _ in range(rounds))
        stop.set()
        t.join()
        return n / (sum(times) / len(times)) / 1e9, fg

    def locking(src, chunk, threads=1):
        def run():
            ptrs = list(range(src.data_ptr(), src.data_ptr() + n - chunk + 1, chunk))
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda p: drv.lock(p, chunk), ptrs))
            t1 = time.perf_counter()
            for p in ptrs:
                drv.unlock(p)
            return t1 - t0, time.perf_counter() - t1
        got = [run() for _ in range(args.reps)]
        return min(a for a, _ in got), min(b for _, b in got)

    rt = best(roundtrip, args.reps)
    limit = n / rt / 1e9
    rows = [f"{torch.cuda.get_device_name()}, {args.mb} MB per measurement, best of {args.reps}",
            f"pinned round trip (host -> GPU and back at once): {limit:.1f} GB/s (the limit, 100 %)"]

    def row(what, gbps):
        rows.append(f"{what:62s} {gbps:6.1f} GB/s {gbps / limit:6.0%}")
    row("pageable H2D (cudaMemcpyAsync stages it itself)", n / best(lambda: h2d(file), args.reps) / 1e9)
    for th in (1, 4, 8, 16):
        row(f"host copy mapped -> page-locked, {th} threads, alone", n / best(lambda: host_copy(file, th), args.reps) / 1e9)
    cp, fg = beside(lambda: host_copy(file, 8), roundtrip)
    row("host copy, 8 threads, beside the round trip", cp)
    row("  the round trip meanwhile", n / fg / 1e9)
    for name, src in (("mapped file", file), ("anonymous", anon)):
        for chunk in (32 << 20, 128 << 20):
            for th in (1, 4):
                lk, ul = locking(src, chunk, th)
                row(f"lock in place, {name}, {chunk >> 20} MB calls, {th} thread(s)", n / lk / 1e9)
            row(f"unlock, {name}, {chunk >> 20} MB calls, GPU idle", n / ul / 1e9)
    drv.lock(file.data_ptr(), n)
    row("H2D from the mapped file locked in place", n / best(lambda: h2d(file), args.reps) / 1e9)
    drv.unlock(file.data_ptr())

    def lock_unlock():
        t0 = time.perf_counter()
        drv.lock(file.data_ptr(), n)
        drv.unlock(file.data_ptr())
        return time.perf_counter() - t0
    row("lock + unlock of the mapped file, GPU idle", n / best(lock_unlock, args.reps) / 1e9)

    def lock_beside():
        t0 = time.perf_counter()
        drv.lock(file.data_ptr(), n)
        t1 = time.perf_counter()
        drv.unlock(file.data_ptr())
        return t1 - t0, time.perf_counter() - t1
    got = []
    beside(roundtrip, lambda: got.append(lock_beside()) or 1.0, rounds=args.reps)
    row("lock, mapped file, beside running copies", n / min(a for a, _ in got) / 1e9)
    row("unlock, mapped file, beside running copies", n / min(b for _, b in got) / 1e9)

    def lock_and_copy(chunk):
        """One thread: lock a chunk, queue its copy in and out, lock the next while those run; the
        unlocks once the GPU is idle. What a pipeline built on in-place locks could reach."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ptrs = list(range(0, n, chunk))
        for o in ptrs:
            drv.lock(file.data_ptr() + o, chunk)
            with torch.cuda.stream(s_in):
                gpu[o:o + chunk].copy_(file[o:o + chunk], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(s_in)
            s_out.wait_event(ev)
            with torch.cuda.stream(s_out):
                back[o:o + chunk].copy_(gpu[o:o + chunk], non_blocking=True)
        torch.cuda.synchronize()
        for o in ptrs:
            drv.unlock(file.data_ptr() + o)
        return time.perf_counter() - t0
    for chunk in (16 << 20, 32 << 20, 128 << 20):
        row(f"lock + copy in and out chunk by chunk ({chunk >> 20} MB), unlock at the end", n / best(lambda: lock_and_copy(chunk), args.reps) / 1e9)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

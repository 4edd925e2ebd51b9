"""The re-fold on a GPU: fold_cuda moves one weight host -> GPU -> host through page-locked staging
buffers that are allocated once per device and reused, in pieces of rows. Four stages overlap:
host threads copy the next pieces from the (pageable, often mapped) source into free page-locked
slots while one piece is copied in, one folded and one copied out, each on its own CUDA stream,
ordered by events (the host waits only for a slot to come free). The folded weight lands in a
page-locked tensor that the fix writer writes to the output file as it is. On the H200 pair this
reaches about a third of the pinned round trip: the host copy out of pageable memory shares the
host's memory bus with both DMA directions (README, Performance).
(Splitting one weight's pieces over two GPUs, a host thread each, ran 12 GB/s against 28-31 on
one GPU on an H200 pair; page-locking the source in place with cuMemHostRegister instead of
copying it ran no faster in four designs, 21-34 % against 23-34 % in the same runs: the driver
locks one range at a time, an unlock waits for running copies, and on a 128 MB weight the first
lock and the unlocks are not overlapped: README, Performance.)
"""
from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .formats import QuantSpec, fold, quantize
from .kernels import row_part

PIECE_BYTES = 32 << 20  # bytes of weight per full staged piece
SLOTS = 2               # pieces in flight per stage
HOST_THREADS = min(8, os.cpu_count() or 1)  # threads copying the source into page-locked slots
RAMP = 0                # the first and last RAMP pieces are 1/2**RAMP, ..., 1/2 of a full piece
# (measured on an H200 pair, README: 32 MB x 2, 8 threads, no ramp 34 % of the pinned round trip;
# a ramp of 3: 23 %; 3 or 4 slots, 16 or 64 MB pieces, 12 or 16 threads: worse)
_stages: dict = {}
_triton: dict = {}


def _folds():
    """quant.triton_folds, or None without Triton (or with FQCHECK_TRITON=0: formats' torch ops)."""
    if "mod" not in _triton:
        try:
            if os.environ.get("FQCHECK_TRITON", "1") == "0":
                raise ImportError
            from . import triton_folds
            _triton["mod"] = triton_folds
        except ImportError:
            _triton["mod"] = None
    return _triton["mod"]


def fold_piece(x: torch.Tensor, spec: QuantSpec, out: torch.Tensor) -> None:
    """out = formats.quantize(x.float(), spec).to(x.dtype) for a 2-D piece on the GPU: one fused
    Triton pass where it covers the spec, else formats' own torch ops."""
    tf = _folds()
    if tf is None or not tf.fold_into(x, spec, out):
        out.copy_(quantize(x.to(torch.float32), spec).to(x.dtype))


def fold_on_device(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The fold of a weight already on the GPU, left there (what bench/bench_refold.py times)."""
    x = x.contiguous()
    if x.dim() != 2:
        return quantize(x.to(torch.float32), spec).to(x.dtype)
    out = torch.empty_like(x)
    fold_piece(x, spec, out)
    return out


class _Stage:
    """Per-device staging: SLOTS page-locked input buffers, SLOTS device input and output buffers,
    one stream each for copies in, the fold, and copies out, and the events that order them."""

    def __init__(self, dev: torch.device, size: int, slots: int):
        with torch.cuda.device(dev):
            self.pinned = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
            self.dev_in = [torch.empty(size, dtype=torch.uint8, device=dev) for _ in range(slots)]
            self.dev_out = [torch.empty(size, dtype=torch.uint8, device=dev) for _ in range(slots)]
            self.h2d, self.compute, self.d2h = (torch.cuda.Stream(dev) for _ in range(3))
            self.copied_in = [torch.cuda.Event() for _ in range(slots)]   # pinned[j] and dev_in[j] filled
            self.folded = [torch.cuda.Event() for _ in range(slots)]      # dev_in[j] read, dev_out[j] filled
            self.copied_out = [torch.cuda.Event() for _ in range(slots)]  # dev_out[j] read


def _stage(dev: torch.device) -> _Stage:
    key = (dev.index if dev.index is not None else torch.cuda.current_device(), PIECE_BYTES, SLOTS)
    if key not in _stages:
        _stages[key] = _Stage(torch.device("cuda", key[0]), PIECE_BYTES, SLOTS)
    return _stages[key]


def piece_rows(rows: int, row_bytes: int, piece: int, ramp: int = RAMP) -> list:
    """[(r0, r1)] covering rows: full pieces of about `piece` bytes, the first and the last `ramp`
    pieces 1/2**ramp, ..., 1/2 of one (copying in the first piece and out the last one are the
    only stages that nothing overlaps)."""
    full = max(1, piece // row_bytes)
    sizes = [max(1, full >> k) for k in range(ramp, 0, -1)]
    head, tail, left = [], [], rows
    for size in sizes:
        if left < 2 * size:
            break
        head.append(size)
        tail.insert(0, size)
        left -= 2 * size
    m = -(-left // full)  # full pieces, evened out
    mid = [left // m + (q < left % m) for q in range(m)] if m else []
    bounds, r = [], 0
    for n in head + mid + tail:
        bounds.append((r, r + n))
        r += n
    return bounds


def fold_cuda(w: torch.Tensor, spec: QuantSpec, dev: torch.device) -> torch.Tensor:
    """formats.fold(w, spec, dev) for a CPU weight: a page-locked CPU tensor in w's dtype."""
    if w.device.type == "cuda":
        return fold_on_device(w.to(dev), spec).cpu()
    row_bytes = w.shape[1] * w.element_size() if w.dim() == 2 else 0
    part = row_part(w, spec) if w.is_contiguous() and 0 < row_bytes <= PIECE_BYTES else None
    if part is None:
        return fold(w, spec, dev)
    out = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
    bounds = piece_rows(w.shape[0], row_bytes, PIECE_BYTES, RAMP)
    with torch.cuda.device(dev):
        _run(_stage(dev), w, [(r0, r1, part(r0, r1)) for r0, r1 in bounds], out)
    return out


def _host_copy(dst: int, src: int, nbytes: int) -> None:
    """ctypes' memmove runs without the GIL: the threads copy in parallel and beside the main
    thread's launches."""
    ctypes.memmove(dst, src, nbytes)


def _run(st: _Stage, w: torch.Tensor, pieces, out: torch.Tensor) -> None:
    k, n = len(st.pinned), len(pieces)
    row_bytes = w.shape[1] * w.element_size()
    base = w.data_ptr()
    threads = max(1, min(HOST_THREADS, -(-w.numel() * w.element_size() // (1 << 20))))
    copies: dict = {}

    def submit(pool, i):
        r0, r1, _ = pieces[i]
        j, nbytes = i % k, (r1 - r0) * row_bytes
        step = max(1 << 20, -(-nbytes // threads))
        copies[i] = [pool.submit(_host_copy, st.pinned[j].data_ptr() + o, base + r0 * row_bytes + o,
                                 min(step, nbytes - o)) for o in range(0, nbytes, step)]

    with ThreadPoolExecutor(threads, thread_name_prefix="fqcheck-stage") as pool:  # ends with the call
        for i in range(min(k, n)):
            submit(pool, i)
        for i, (r0, r1, s) in enumerate(pieces):
            j, src = i % k, w[r0:r1]
            nbytes = src.numel() * src.element_size()
            view = lambda buf: buf[:nbytes].view(w.dtype).view(src.shape)  # noqa: E731
            for f in copies.pop(i):
                f.result()  # the piece is in pinned[j]
            st.h2d.wait_event(st.folded[j])  # the fold of the slot's previous piece has read dev_in
            with torch.cuda.stream(st.h2d):
                dev_in = view(st.dev_in[j])
                dev_in.copy_(view(st.pinned[j]), non_blocking=True)
                st.copied_in[j].record(st.h2d)
            st.compute.wait_event(st.copied_in[j])
            st.compute.wait_event(st.copied_out[j])  # the slot's previous result has left dev_out
            with torch.cuda.stream(st.compute):
                dev_out = view(st.dev_out[j])
                fold_piece(dev_in, s, dev_out)
                st.folded[j].record(st.compute)
            st.d2h.wait_event(st.folded[j])
            with torch.cuda.stream(st.d2h):
                out[r0:r1].copy_(dev_out, non_blocking=True)
                st.copied_out[j].record(st.d2h)
            if i + k < n:  # pinned[j] is free once piece i is on the GPU: one waiter, not a spinning thread per copy
                st.copied_in[j].synchronize()
                submit(pool, i + k)
        st.d2h.synchronize()

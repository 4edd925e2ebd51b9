"""The re-fold on a GPU: fold_cuda moves one weight host -> GPU -> host through page-locked staging
buffers that are allocated once per device and reused, in pieces of rows, so that copying piece
i+1 in, folding piece i and copying piece i-1 out run at the same time on three CUDA streams (and
the host's copy from the mapped file into the staging buffer overlaps all three). The folded
weight lands in a page-locked tensor that the fix writer writes to the output file as it is.
(Splitting one weight's pieces over two GPUs, a host thread each, ran 12 GB/s against 28-31 on
one GPU on an H200 pair: README, Performance.)
"""
from __future__ import annotations

import os

import torch

from .formats import QuantSpec, fold, quantize
from .kernels import row_specs

PIECE_BYTES = 32 << 20  # bytes of weight per staged piece
SLOTS = 2               # pieces in flight per stage
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


def fold_cuda(w: torch.Tensor, spec: QuantSpec, dev: torch.device) -> torch.Tensor:
    """formats.fold(w, spec, dev) for a CPU weight: a page-locked CPU tensor in w's dtype."""
    if w.device.type == "cuda":
        return fold_on_device(w.to(dev), spec).cpu()
    fits = w.is_contiguous() and w.dim() == 2 and w.shape[1] * w.element_size() <= PIECE_BYTES
    pieces = row_specs(w, spec, PIECE_BYTES // w.element_size()) if fits else None
    if pieces is None:
        return fold(w, spec, dev)
    out = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
    with torch.cuda.device(dev):
        _run(_stage(dev), w, pieces, out)
    return out


def _run(st: _Stage, w: torch.Tensor, pieces, out: torch.Tensor) -> None:
    for i, (r0, r1, s) in enumerate(pieces):
        j, src = i % len(st.pinned), w[r0:r1]
        nbytes = src.numel() * src.element_size()
        view = lambda buf: buf[:nbytes].view(w.dtype).view(src.shape)  # noqa: E731
        st.copied_in[j].synchronize()   # the pinned buffer's previous piece has reached the GPU
        pinned = view(st.pinned[j])
        pinned.copy_(src)               # from the mapped file: the one host-side copy
        st.h2d.wait_event(st.folded[j])  # the fold of the slot's previous piece has read dev_in
        with torch.cuda.stream(st.h2d):
            dev_in = view(st.dev_in[j])
            dev_in.copy_(pinned, non_blocking=True)
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
    st.d2h.synchronize()

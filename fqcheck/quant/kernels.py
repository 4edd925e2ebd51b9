"""fold_fast(w, spec, device): formats.fold at the speed of the hardware, bit for bit its result.

formats.py is the reference: readable torch, one full-size float32 pass per step. This module is the
one place that makes it fast, and the rest of fqcheck calls only `fold_fast`:
- CPU, per-tensor FP8/INT on a 16-bit weight: the fold is then a function of the element's 16 bits
  alone, so it is computed by formats.quantize once for all 65,536 bit patterns and applied as a
  table lookup (one gather pass instead of ~8 float32 passes; identical by construction).
- CPU, everything else: formats.quantize over row chunks of 64K elements, each on one thread, so
  the intermediate float32 passes stay in cache instead of streaming full-size tensors through
  memory (3-5x formats.fold on the 2-core CI machine: README, Performance). Chunks (and lookup
  pieces) are spread over torch's thread count.
- CUDA: one fused Triton pass per format (quant/triton_folds.py), fed through reused page-locked
  staging buffers with copies overlapped with compute (quant/staging.py); formats.fold where Triton
  is missing or the layout is one the kernels do not cover.
Chunks never change the math: every format is elementwise or works on blocks along the last dim,
and per-channel amax is sliced with the rows it belongs to.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .formats import QuantSpec, _broadcast_amax, _post_scale, fold, off_grid_count, quantize, variants

CPU_CHUNK_ELEMS = 1 << 16  # elements per CPU chunk: 256 KB of float32 per pass, inside an L2
_local = threading.local()


def fold_fast(w: torch.Tensor, spec: QuantSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """formats.fold(w, spec, device) (variant 0): a CPU tensor in w's dtype and shape. `w` may be a
    read-only view of a mapped file: it is never written."""
    dev = torch.device(device) if device is not None else w.device
    if not isinstance(spec, QuantSpec):  # a Chain (SequentialQuantizer, AWQ scale): the reference
        return fold(w, spec, dev).cpu()
    if dev.type == "cuda":
        from .staging import fold_cuda
        return fold_cuda(w, spec, dev)
    return fold_cpu(w, spec)


@contextlib.contextmanager
def _one_thread():
    """Cache-sized pieces lose more to waking torch's thread pool than they gain from it (on a
    busy 2-core machine a parallel op on 64K elements can wait a whole scheduler slice): torch
    runs each piece on one thread, and the pieces are spread over as many threads as torch had
    (its default: the cores; set_num_threads / OMP_NUM_THREADS choose), which this yields."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


def _spread(fn, items, jobs: int) -> list:
    """fn(item) for every item, dealt round-robin to `jobs` threads (torch and numpy release the
    GIL; one task per thread, not per item); the results in no particular order. The threads end
    with the call: fqcheck forks its header readers only while no other thread runs."""
    items = list(items)
    jobs = min(jobs, len(items))
    if jobs <= 1:
        return [fn(it) for it in items]
    with ThreadPoolExecutor(jobs, thread_name_prefix="fqcheck-fold") as pool:
        parts = list(pool.map(lambda k: [fn(it) for it in items[k::jobs]], range(jobs)))
    return [r for part in parts for r in part]


def fold_cpu(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    w = w.cpu()
    with _one_thread() as jobs:
        if _lookup_ok(w, spec):
            return _fold_lookup(w, spec, jobs)
        pieces = row_specs(w, spec, CPU_CHUNK_ELEMS)
        if pieces is None:
            return fold(w, spec, "cpu")
        out = torch.empty_like(w)

        def piece(p):
            r0, r1, s = p
            out[r0:r1] = quantize(w[r0:r1].to(torch.float32), s).to(w.dtype)
        _spread(piece, pieces, jobs)
        return out


def off_grid_count_fast(w: torch.Tensor, spec: QuantSpec, device=None) -> int:
    """formats.off_grid_count(w, spec, device), the same way on the CPU: one lookup pass for a
    per-tensor scale on a 16-bit weight (the table says, per bit pattern, whether no variant of the
    fold reproduces it), else row chunks. On CUDA it is formats.off_grid_count."""
    dev = torch.device(device) if device is not None else w.device
    if dev.type == "cuda" or not isinstance(spec, QuantSpec):  # a Chain: the reference count
        return off_grid_count(w, spec, dev)
    w = w.cpu()
    with _one_thread() as jobs:
        if _lookup_ok(w, spec):
            x = _all_bit_patterns(w.dtype)
            off = torch.ones(x.shape, dtype=torch.bool)
            for v in range(variants(spec)):
                f = quantize(x.to(torch.float32), spec, v).to(w.dtype)
                off &= (x != f) & ~(torch.isnan(x) & torch.isnan(f))
            hits = _gather(off.numpy().view(np.uint8), _bits(w), np.empty(w.numel(), np.uint8), jobs)
            return int(np.count_nonzero(hits))
        pieces = row_specs(w, spec, CPU_CHUNK_ELEMS)
        if pieces is None:
            return off_grid_count(w, spec, "cpu")
        return sum(_spread(lambda p: off_grid_count(w[p[0]:p[1]], p[2], "cpu"), pieces, jobs))


def _lookup_ok(w: torch.Tensor, spec: QuantSpec) -> bool:
    """The fold is a function of each element alone: a per-tensor scale and no blocks."""
    elementwise = spec.fmt == "fp8" or (spec.fmt == "int" and not spec.block_size)
    return (elementwise and spec.amax is not None and spec.amax.numel() == 1
            and w.is_floating_point() and w.element_size() == 2 and w.numel() > (1 << 16))


def _all_bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    """The 65,536 values of a 16-bit dtype, entry u holding the value whose bits are u."""
    return torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16)).view(dtype)


def lookup_table(dtype: torch.dtype, spec: QuantSpec, device="cpu") -> torch.Tensor:
    """int16 table: entry u is the folded bits of the weight whose bits are u (0..65535)."""
    x = _all_bit_patterns(dtype).to(device)
    return quantize(x.to(torch.float32), spec).to(dtype).view(torch.int16)


def _bits(w: torch.Tensor) -> np.ndarray:
    return w.contiguous().view(torch.int16).numpy().reshape(-1).view(np.uint16)


def _gather(table: np.ndarray, bits: np.ndarray, out: np.ndarray, jobs: int) -> np.ndarray:
    """out[i] = table[bits[i]] in cache-sized pieces, each through its thread's reused index
    buffer (~a copy's speed per thread)."""
    def piece(i):
        idx = getattr(_local, "idx", None)
        if idx is None or idx.size < CPU_CHUNK_ELEMS:
            idx = _local.idx = np.empty(CPU_CHUNK_ELEMS, dtype=np.intp)
        b = bits[i:i + CPU_CHUNK_ELEMS]
        np.copyto(idx[:b.size], b, casting="unsafe")
        np.take(table, idx[:b.size], out=out[i:i + b.size], mode="clip")
    _spread(piece, range(0, bits.size, CPU_CHUNK_ELEMS), jobs)
    return out


def _fold_lookup(w: torch.Tensor, spec: QuantSpec, jobs: int) -> torch.Tensor:
    out = _gather(lookup_table(w.dtype, spec).numpy(), _bits(w), np.empty(w.numel(), np.int16), jobs)
    return torch.from_numpy(out).view(w.dtype).reshape(w.shape)


def row_specs(w: torch.Tensor, spec: QuantSpec, elems: int):
    """[(r0, r1, spec for rows r0:r1)] covering a 2-D weight in chunks of about `elems` elements, or
    None when the layout does not split by rows (then the caller folds the whole tensor with
    formats.fold, which also raises its errors)."""
    part = row_part(w, spec)
    if part is None:
        return None
    rows = w.shape[0]
    step = max(1, elems // w.shape[1])
    return [(r0, min(r0 + step, rows), part(r0, min(r0 + step, rows))) for r0 in range(0, rows, step)]


def row_part(w: torch.Tensor, spec: QuantSpec):
    """part(r0, r1) -> the spec that folds rows r0:r1 of a 2-D weight as formats folds the whole
    (its per-channel or per-block amax sliced with the rows), or None when the layout does not
    split by rows."""
    if w.dim() != 2 or not w.numel():
        return None
    rows = w.shape[0]
    amax = spec.amax
    if amax is None or amax.numel() == 1 or spec.fmt == "nvfp4":  # nvfp4: one global amax, reduced
        return lambda r0, r1: spec
    if spec.fmt == "int" and spec.block_size:
        per_row = -(-w.shape[1] // spec.block_size)
        if amax.numel() != rows * per_row:
            return None
        a = amax.reshape(rows, per_row)
        return lambda r0, r1: dataclasses.replace(spec, amax=a[r0:r1].reshape(-1, 1))
    try:
        a = _broadcast_amax(amax.to(torch.float32).cpu(), w)
    except ValueError:
        return None
    if a.dim() != 2 or a.shape[1] not in (1, w.shape[1]) or a.shape[0] not in (1, rows):
        return None
    # keep 2-D (keepdim) so a chunk whose row count equals the column count cannot re-pick the axis
    if a.shape[0] == rows > 1:
        return lambda r0, r1: dataclasses.replace(spec, amax=a[r0:r1])
    return lambda r0, r1: dataclasses.replace(spec, amax=a)


# ---- the grid test: one pass per weight, every variant of the fold at once ---------------------

@dataclasses.dataclass(frozen=True)
class GridStats:
    """What one pass over a weight under a spec says, for every variant v of the fold (formats.variants):
    `off` elements no variant reproduces (formats.off_grid_count); `masks` the variant masks that occur
    (bit v set: variant v reproduces the element), which is how the re-fold picks Model Optimizer's
    FP8 form from the folded siblings; `nonfinite` whether it holds NaN or Inf, `nonzero` whether a
    value is not +-0 (the TEN pass takes these two from here: fqcheck/deep.py)."""
    numel: int
    off: int
    masks: frozenset
    nonfinite: bool
    nonzero: bool


def grid_stats(w: torch.Tensor, spec, device=None) -> GridStats:
    """formats' grid test of `w` (read, never written: it may be a view of a mapped file) in one
    pass on one thread (callers spread whole weights over threads or GPUs): on the CPU a table
    lookup for a per-tensor scale on a 16-bit weight, else row chunks of formats' math; on CUDA
    formats' math over large row chunks; a Chain or an unsplittable layout whole, as formats does."""
    dev = torch.device(device) if device is not None else w.device
    if dev.type != "cuda" and isinstance(spec, QuantSpec) and _lookup_ok(w, spec):
        return _grid_lookup(w, spec)
    pieces = row_specs(w, spec, CPU_CHUNK_ELEMS if dev.type != "cuda" else CUDA_GRID_ELEMS) \
        if isinstance(spec, QuantSpec) else None
    if pieces is None:
        pieces = [(0, w.shape[0] if w.dim() else 1, spec)]
        whole = True
    else:
        whole = False
    nv = variants(spec)
    counts = torch.zeros(1 << nv, dtype=torch.int64)
    nonfinite = nonzero = False
    for r0, r1, s in pieces:
        part = (w if whole else w[r0:r1]).to(dev)
        counts += _mask_counts(part, s, nv).cpu()
        nonfinite = nonfinite or not bool(torch.isfinite(part).all())
        nonzero = nonzero or bool((part != 0).any())
    return GridStats(w.numel(), int(counts[0]), frozenset(int(m) for m in counts.nonzero().reshape(-1)),
                     nonfinite, nonzero)


CUDA_GRID_ELEMS = 1 << 24  # elements per GPU chunk of the grid test: memory a few times 64 MB


def _mask_counts(w: torch.Tensor, spec, nv: int) -> torch.Tensor:
    """Counts of each variant mask over `w`, with formats.off_grid_count's comparison (values: -0.0
    equals 0.0; NaN equals NaN), so counts[0] is its result."""
    x = w.to(torch.float32)
    ps = getattr(spec, "post_scale", None)
    if ps is not None:  # as off_grid_count: the folded weight divided by the scale
        x = x / ps.to(torch.float32).reshape(-1).to(x.device)
    mask = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
    for v in range(nv):
        f = _post_scale(quantize(x, spec, v), spec, w.dtype)
        on = (w == f) | (torch.isnan(w) & torch.isnan(f)) if w.is_floating_point() else w == f
        mask |= on.to(torch.uint8) << v
        del f, on
    return torch.bincount(mask.reshape(-1), minlength=1 << nv)


_NONFINITE = 0x10  # in a lookup class: the bit pattern is NaN or Inf; bits 0-3: 1 << variant mask
_NONZERO = 0x20    # ... its value is not +-0
_tables: dict = {}


def _class_table(dtype: torch.dtype, spec: QuantSpec) -> np.ndarray:
    """uint8 per 16-bit pattern: 1 << (variant mask), | _NONFINITE; formats' math on all 65,536
    values at once (the same comparison as _mask_counts)."""
    key = (dtype, spec_key(spec))
    table = _tables.get(key)
    if table is None:
        x = _all_bit_patterns(dtype)
        mask = torch.zeros(x.shape, dtype=torch.int64)
        for v in range(variants(spec)):
            f = quantize(x.to(torch.float32), spec, v).to(dtype)
            mask |= ((x == f) | (torch.isnan(x) & torch.isnan(f))).to(torch.int64) << v
        cls = (torch.ones_like(mask) << mask) | torch.where(torch.isfinite(x), 0, _NONFINITE) \
            | torch.where(x != 0, _NONZERO, 0)
        table = cls.to(torch.uint8).numpy()
        if len(_tables) > 64:
            _tables.clear()
        _tables[key] = table
    return table


GRID_CHUNK_ELEMS = 1 << 18  # elements per gather of the grid lookup (the int32 indices: 1 MB, in L2)


def _grid_lookup(w: torch.Tensor, spec: QuantSpec) -> GridStats:
    """One gather per piece straight from w's memory (no copy of the weight): the class of each
    element, OR-reduced; elements off every variant are counted only in pieces that have any.
    torch's index_select with int32 indices converted from a uint16 view ran 2.3-2.5 GB/s per core
    against 1.6-1.9 for numpy's take (which needs 8-byte indices); numpy where torch has no uint16."""
    table = _class_table(w.dtype, spec)
    if not hasattr(torch, "uint16"):
        return _grid_lookup_numpy(w, table)
    src = w.contiguous().reshape(-1).view(torch.uint16)
    size = min(src.numel(), GRID_CHUNK_ELEMS)
    idx, cls, ttable = torch.empty(size, dtype=torch.int32), torch.empty(size, dtype=torch.uint8), torch.from_numpy(table)
    c, tmp = cls.numpy(), np.empty(size, dtype=np.uint8)
    seen = off = 0
    for i in range(0, src.numel(), size):
        n = min(size, src.numel() - i)
        idx[:n].copy_(src[i:i + n])
        torch.index_select(ttable, 0, idx[:n], out=cls[:n])
        got = int(np.bitwise_or.reduce(c[:n]))
        if got & 1:
            off += int(np.count_nonzero(np.bitwise_and(c[:n], 1, out=tmp[:n])))
        seen |= got
    return _lookup_stats(src.numel(), off, seen)


def _grid_lookup_numpy(w: torch.Tensor, table: np.ndarray) -> GridStats:
    bits = _bits(w)
    idx = np.empty(min(bits.size, CPU_CHUNK_ELEMS), dtype=np.intp)
    cls = np.empty(idx.size, dtype=np.uint8)
    tmp = np.empty(idx.size, dtype=np.uint8)
    seen, off = 0, 0
    for i in range(0, bits.size, idx.size):
        b = bits[i:i + idx.size]
        n = b.size
        np.copyto(idx[:n], b, casting="unsafe")
        np.take(table, idx[:n], out=cls[:n], mode="clip")
        got = int(np.bitwise_or.reduce(cls[:n]))
        if got & 1:
            off += int(np.count_nonzero(np.bitwise_and(cls[:n], 1, out=tmp[:n])))
        seen |= got
    return _lookup_stats(bits.size, off, seen)


def _lookup_stats(numel: int, off: int, seen: int) -> GridStats:
    masks = frozenset(m for m in range(4) if seen & (1 << m))
    return GridStats(numel, off, masks, bool(seen & _NONFINITE), bool(seen & _NONZERO))


def spec_key(spec) -> tuple:
    """A hashable identity of a spec, amax values included (QuantSpec's own equality leaves them out)."""
    def t(x):
        if x is None:
            return None
        x = x.detach().to(torch.float32).cpu().contiguous()
        return (tuple(x.shape), x.numpy().tobytes())
    if isinstance(spec, QuantSpec):
        return (spec.fmt, spec.num_bits, spec.unsigned, spec.narrow_range, spec.block_size, t(spec.amax))
    return ("chain", tuple(spec_key(p) for p in spec.parts), t(getattr(spec, "post_scale", None)))

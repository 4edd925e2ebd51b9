"""The folds as single fused Triton passes: load the 16/32-bit weight, do formats.py's float32
operations in the same order in registers, store in the weight's dtype. One read and one write per
element, no float32 tensors in memory. Same bits as formats.py on the GPU because each operation is
the same IEEE operation: divisions are libdevice div_rn (torch's CUDA division is IEEE; Triton's `/`
is approximate), rounding is rint (half to even), float8 casts are RNE, no operation is fused into
an FMA (no multiply feeds an add), and a tensor divided by a Python scalar is a multiplication by the
scalar's float32 reciprocal, as torch's CUDA kernel does it. Imported only on CUDA (quant/staging.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .formats import E4M3_MAX, EPS, FP4_MAX, INV_2688, MX_ELEMENT_MAX, QuantSpec, _broadcast_amax

BLOCK = 2048  # elements per program of the scaled kernel


@triton.jit
def _clamp(v, lo, hi):
    """torch.clamp on CUDA: NaN passes, else min(max(v, lo), hi) with the same max/min instructions
    (which also decide the sign of a zero)."""
    return tl.where(v != v, v, tl.minimum(tl.maximum(v, lo), hi))


@triton.jit
def _clamp_max(v, hi):
    """torch.clamp(v, max=hi) on CUDA."""
    return tl.where(v != v, v, tl.minimum(v, hi))


@triton.jit
def _fp8_scales(a):
    """formats.fake_fp8_e4m3's scale and inverse scale from a float32 amax: safe = 1 where
    amax <= 2**-24, s = 448 / safe, d = 1 / s, both IEEE divisions as torch's on the CPU."""
    safe = tl.where(a <= 5.9604644775390625e-08, 1.0, a)
    s = libdevice.div_rn(tl.zeros_like(safe) + 448.0, safe)
    return s, libdevice.div_rn(tl.zeros_like(s) + 1.0, s)


@triton.jit
def _int_scales(a, max_bound):
    """formats.fake_int's multiplier and divisor from a float32 amax: scale = max_bound / amax
    (IEEE), replaced by 0 (multiplier) and 1 (divisor) where amax <= 2**-24."""
    scale = libdevice.div_rn(tl.zeros_like(a) + max_bound, a)
    zero = a <= 5.9604644775390625e-08
    return tl.where(zero, 0.0, scale), tl.where(zero, 1.0, scale)


@triton.jit
def _apply(x, s, d, lo, hi, FP8: tl.constexpr):
    """The elementwise part of formats.fake_fp8_e4m3 / fake_int with its scales s and d."""
    if FP8:
        y = _clamp(x * s, -448.0, 448.0).to(tl.float8e4nv).to(tl.float32) * d
    else:
        y = libdevice.div_rn(_clamp(libdevice.rint(x * s), lo, hi), d)
    return y


@triton.jit
def _scaled_kernel(x_ptr, out_ptr, a_ptr, s_ptr, d_ptr, s0, d0, cols, per_row, lo, hi,
                   FP8: tl.constexpr, SCALE: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """FP8 / INT over (row, BLOCK columns) programs, with one scale per tensor (SCALE 0: s0, d0
    computed on the host), per row (1: from the row's amax, here), per column (2) or per static
    block of GROUP columns (3) (s and d arrays: the multiplier and FP8's inverse scale or INT's
    divisor, computed on the host)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < cols
    x = tl.load(x_ptr + row * cols + c, mask=m, other=0.0).to(tl.float32)
    if SCALE == 0:
        s = s0
        d = d0
    elif SCALE == 1:  # one amax per program: its two divisions cost nothing per element
        a = tl.load(a_ptr + row)
        if FP8:
            s, d = _fp8_scales(a)
        else:
            s, d = _int_scales(a, hi)
    elif SCALE == 2:
        s = tl.load(s_ptr + c, mask=m, other=1.0)
        d = tl.load(d_ptr + c, mask=m, other=1.0)
    else:
        k = row * per_row + c // GROUP
        s = tl.load(s_ptr + k, mask=m, other=1.0)
        d = tl.load(d_ptr + k, mask=m, other=1.0)
    tl.store(out_ptr + row * cols + c, _apply(x, s, d, lo, hi, FP8).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _static_block_kernel(x_ptr, out_ptr, a_ptr, nblocks, lo, hi,
                         FP8: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr):
    """INT (or FP8) with one amax per static block of BS contiguous elements (the last dim a
    multiple of BS, so block b is elements b*BS.. and amax b), TB blocks per program: the scales
    are computed here, once per block."""
    b = tl.program_id(0).to(tl.int64) * TB + tl.arange(0, TB)
    mb = b < nblocks
    offs = b[:, None] * BS + tl.arange(0, BS)[None, :]
    x = tl.load(x_ptr + offs, mask=mb[:, None], other=0.0).to(tl.float32)
    a = tl.load(a_ptr + b, mask=mb, other=1.0)
    if FP8:
        s, d = _fp8_scales(a)
    else:
        s, d = _int_scales(a, hi)
    y = _apply(x, s[:, None], d[:, None], lo, hi, FP8)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mb[:, None])


@triton.jit
def _fp4_round(a):
    """formats._fp4_round_magnitude (tie=0): E2M1 round half to even, saturating at 6."""
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    return _clamp_max(libdevice.rint(libdevice.div_rn(a, step)) * step, 6.0)


@triton.jit
def _pow2(e):
    """formats._pow2: 2**e for int32 e in [-127, 127] from its bits."""
    bits = tl.where(e >= -126, (e + 127) << 23, 1 << 22)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _block_kernel(x_ptr, out_ptr, nblocks, g, six_g, inv_elem_max,
                  FMT: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr):
    """Dynamic blocks of BS along the last dim, TB blocks per program. FMT 0: NVFP4 (E4M3 block
    scales from the global amax, formats.fake_nvfp4 with tie 0); 1: MXFP8; 2: MXFP4 (formats.fake_mx)."""
    b = tl.program_id(0).to(tl.int64) * TB + tl.arange(0, TB)
    offs = b[:, None] * BS + tl.arange(0, BS)[None, :]
    m = (b < nblocks)[:, None]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    xa = tl.abs(x)
    if FMT == 0:
        bmax = tl.max(xa, axis=1)
        s = _clamp_max(libdevice.div_rn(bmax, six_g), 448.0).to(tl.float8e4nv).to(tl.float32) * g
        s = tl.where(s >= 1e-5, s, 1.0)
        q = _fp4_round(libdevice.div_rn(xa, s[:, None])) * s[:, None]
        y = tl.where(x >= 0, q, 0.0 - q)
    else:
        bmax = tl.max(_clamp_max(xa, 3.4028234663852886e38), axis=1)
        bits = (bmax * inv_elem_max).to(tl.int32, bitcast=True)
        field = (bits >> 23) & 0xFF
        sig = bits & 0x7FFFFF
        up = (sig > 0) & (field != 0xFE) & ((field != 0) | (sig > 0x400000))
        e = tl.where(up, field - 126, field - 127)
        scaled = (bmax != 0) & (bmax == bmax)  # clamped to FLT_MAX: finite unless NaN
        e = tl.where(scaled, e, 0)
        a = xa * _pow2(-e)[:, None]
        if FMT == 1:
            q = _clamp_max(a, 448.0).to(tl.float8e4nv).to(tl.float32)
        else:
            q = _fp4_round(a)
        y = q * _pow2(e)[:, None]
        y = tl.where(x > 0, y, y * -1.0)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def _f32(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def _host_scales(fp8: bool, a: torch.Tensor, max_bound: float):
    """(s, d) from a float32 CPU amax with formats' own torch ops (fake_fp8_e4m3, fake_int)."""
    if fp8:
        safe = torch.where(a <= EPS, torch.ones_like(a), a)
        s = torch.full_like(safe, E4M3_MAX) / safe
        return s, torch.ones_like(s) / s
    scale = torch.full_like(a, max_bound) / a
    zero = a <= EPS
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero, torch.ones_like(scale), scale)


def _up(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float32 host tensor on x's GPU, queued on the current stream: a few values from pageable
    memory (the driver stages them at once), more (block amax) through page-locked memory, since a
    large pageable copy may wait for the stream."""
    t = t.to(torch.float32).contiguous()
    if t.numel() > 4096:
        t = t.pin_memory()
    return t.to(x.device, non_blocking=True)


def _scaled(x: torch.Tensor, spec: QuantSpec, out: torch.Tensor) -> bool:
    """FP8 / INT with a per-tensor, per-row, per-column or static-block amax. The amax stays a CPU
    tensor (as fqcheck's resolver reads it): no launch, no host-GPU round trip and no float32
    pass on the GPU before the fold; per-row and aligned block scales are computed in the kernel
    from the amax, the others on the host from a few values."""
    rows, cols = x.shape
    fp8 = spec.fmt == "fp8"
    if not fp8 and spec.num_bits > 24:
        return False
    a = spec.amax.detach().to(torch.float32).cpu()
    max_bound = lo = 0.0
    if not fp8:
        if bool((a < 0).any()):
            return False  # formats raises: let it
        max_bound = float(2.0 ** (spec.num_bits - 1 + int(spec.unsigned)) - 1.0)  # formats.fake_int
        lo = 0.0 if spec.unsigned else (-max_bound if spec.narrow_range else -max_bound - 1.0)
    mode, per_row, group, s0, d0 = 0, 0, 1, 0.0, 0.0
    arr = s = d = x  # unused pointer arguments
    if not fp8 and spec.block_size:
        bs = spec.block_size
        per_row = -(-cols // bs)
        if a.numel() != rows * per_row:
            return False
        if cols % bs == 0 and bs & (bs - 1) == 0 and 4 <= bs <= 1024:
            tb = max(1, 2048 // bs)
            nblocks = rows * per_row
            _static_block_kernel[(triton.cdiv(nblocks, tb),)](x, out, _up(a.reshape(-1), x), nblocks, lo, max_bound,
                                                              FP8=False, BS=bs, TB=tb)
            return True
        mode, group = 3, bs  # a partial last block: per-element scale lookup
        s, d = (_up(t, x) for t in _host_scales(False, a.reshape(-1), max_bound))
    else:
        try:
            a = _broadcast_amax(a, x)
        except ValueError:
            return False
        if a.numel() == 1:
            s0, d0 = (float(t) for t in _host_scales(fp8, a, max_bound))
        elif a.dim() == 2 and a.shape == (rows, 1):
            mode, arr = 1, _up(a.reshape(-1), x)
        elif a.dim() == 2 and a.shape == (1, cols):
            mode = 2
            s, d = (_up(t.reshape(-1), x) for t in _host_scales(fp8, a, max_bound))
        else:
            return False
    grid = (rows, triton.cdiv(cols, BLOCK))
    _scaled_kernel[grid](x, out, arr, s, d, s0, d0, cols, per_row, lo, max_bound, FP8=fp8, SCALE=mode,
                         GROUP=group, BLOCK=BLOCK)
    return True


def fold_into(x: torch.Tensor, spec: QuantSpec, out: torch.Tensor) -> bool:
    """out = formats.quantize(x.float(), spec).to(out.dtype) for a contiguous 2-D CUDA x, in one
    pass; False (nothing written) when the kernels do not cover this spec or layout."""
    rows, cols = x.shape
    if not x.numel():
        return False
    if spec.fmt in ("fp8", "int"):
        return _scaled(x, spec, out)
    bs = spec.block_size or (16 if spec.fmt == "nvfp4" else 32)
    if cols % bs or bs not in (8, 16, 32, 64, 128):
        return False  # padded blocks: formats' path
    nblocks = x.numel() // bs
    g = six_g = inv = 1.0
    if spec.fmt == "nvfp4":
        fmt = 0
        gt = spec.amax.to(torch.float32).cpu().amax() * INV_2688
        gt = torch.where(gt > 0, gt, torch.tensor(1e-12, dtype=torch.float32))
        g, six_g = float(gt), float(FP4_MAX * gt)
    elif spec.fmt in MX_ELEMENT_MAX:
        fmt = 1 if spec.fmt == "mxfp8" else 2
        inv = float(_f32(1.0) / _f32(MX_ELEMENT_MAX[spec.fmt]))
    else:
        return False
    tb = max(1, 2048 // bs)
    _block_kernel[(triton.cdiv(nblocks, tb),)](x, out, nblocks, g, six_g, inv, FMT=fmt, BS=bs, TB=tb)
    return True

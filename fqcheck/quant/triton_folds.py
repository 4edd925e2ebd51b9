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
def _scaled_kernel(x_ptr, out_ptr, s_ptr, d_ptr, cols, per_row, lo, hi,
                   FP8: tl.constexpr, SCALE: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    """FP8 / INT with one scale per tensor (SCALE 0), per row (1), per column (2) or per static
    block of GROUP columns (3). s: the multiplier, d: FP8's inverse scale or INT's divisor."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < cols
    x = tl.load(x_ptr + row * cols + c, mask=m, other=0.0).to(tl.float32)
    if SCALE == 0:  # one scale: loaded once per program
        s = tl.load(s_ptr)
        d = tl.load(d_ptr)
    elif SCALE == 1:
        s = tl.load(s_ptr + row)
        d = tl.load(d_ptr + row)
    elif SCALE == 2:
        s = tl.load(s_ptr + c, mask=m, other=1.0)
        d = tl.load(d_ptr + c, mask=m, other=1.0)
    else:
        k = row * per_row + c // GROUP
        s = tl.load(s_ptr + k, mask=m, other=1.0)
        d = tl.load(d_ptr + k, mask=m, other=1.0)
    if FP8:
        y = _clamp(x * s, -448.0, 448.0).to(tl.float8e4nv).to(tl.float32) * d
    else:
        y = libdevice.div_rn(_clamp(libdevice.rint(x * s), lo, hi), d)
    tl.store(out_ptr + row * cols + c, y.to(out_ptr.dtype.element_ty), mask=m)


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


def _on_device(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float32 amax where its scales are best computed: a few values stay on the host (no kernel
    launches for them), block amax go to x's GPU through page-locked memory (no host pass)."""
    a = a.to(torch.float32)
    if a.numel() <= 4096:
        return a.cpu()
    if a.device.type == "cpu":
        a = a.pin_memory()
    return a.to(x.device, non_blocking=True)


def _scales(spec: QuantSpec, x: torch.Tensor):
    """(mode, s, d, lo, hi, per_row, group) as formats computes them, or None, on x's GPU: the same
    float32 IEEE divisions and comparisons as formats' on the CPU, done where _on_device put the
    amax (each operand a tensor, so no division becomes a multiplication by a reciprocal)."""
    rows, cols = x.shape
    if spec.fmt == "int" and spec.block_size:
        per_row = -(-cols // spec.block_size)
        if spec.amax.numel() != rows * per_row:
            return None
        a, mode = _on_device(spec.amax, x).reshape(-1), 3
    else:
        try:
            a = _broadcast_amax(spec.amax.to(torch.float32).cpu(), x)
        except ValueError:
            return None
        per_row = 0
        if a.numel() == 1:
            mode = 0
        elif a.dim() == 2 and a.shape == (rows, 1):
            mode = 1
        elif a.dim() == 2 and a.shape == (1, cols):
            mode = 2
        else:
            return None
        a = _on_device(a.reshape(-1), x)
    if spec.fmt == "fp8":  # formats.fake_fp8_e4m3, variant 0
        safe = torch.where(a <= EPS, torch.ones_like(a), a)
        s = torch.full_like(safe, E4M3_MAX) / safe
        return mode, s.to(x.device, non_blocking=True), (torch.ones_like(s) / s).to(x.device, non_blocking=True), 0.0, 0.0, per_row, spec.block_size or 1
    if bool((a < 0).any()):
        return None  # formats raises: let it
    max_bound = float(2.0 ** (spec.num_bits - 1 + int(spec.unsigned)) - 1.0)  # formats.fake_int
    lo = 0.0 if spec.unsigned else (-max_bound if spec.narrow_range else -max_bound - 1.0)
    scale = torch.full_like(a, max_bound) / a
    zero = a <= EPS
    s = torch.where(zero, torch.zeros_like(scale), scale)
    d = torch.where(zero, torch.ones_like(scale), scale)
    return mode, s.to(x.device, non_blocking=True), d.to(x.device, non_blocking=True), lo, max_bound, per_row, spec.block_size or 1


def fold_into(x: torch.Tensor, spec: QuantSpec, out: torch.Tensor) -> bool:
    """out = formats.quantize(x.float(), spec).to(out.dtype) for a contiguous 2-D CUDA x, in one
    pass; False (nothing written) when the kernels do not cover this spec or layout."""
    rows, cols = x.shape
    if not x.numel():
        return False
    if spec.fmt in ("fp8", "int"):
        if spec.fmt == "int" and spec.num_bits > 24:
            return False
        sc = _scales(spec, x)
        if sc is None:
            return False
        mode, s, d, lo, hi, per_row, group = sc
        grid = (rows, triton.cdiv(cols, BLOCK))
        _scaled_kernel[grid](x, out, s, d, cols, per_row, lo, hi, FP8=spec.fmt == "fp8", SCALE=mode,
                             GROUP=group, BLOCK=BLOCK)
        return True
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

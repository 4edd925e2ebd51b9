"""Fake-quant formats: (weight, QuantSpec) -> the weight Model Optimizer's TensorQuantizer produces.

The FakeQuant export folds a weight as `quantizer(w.float()).to(w.dtype)`
(modelopt/torch/export/plugins/vllm_fakequant_hf.py, _fakequant_module_weights); `fold` does the
same. Every formula below was read from nvidia-modelopt 0.47.0 (file paths relative to its
`modelopt/torch/`) and is checked bit for bit against it in tests/test_quant.py where modelopt runs.

Bit identity between CPU and CUDA: scales that depend only on amax are computed once on the CPU in
float32 and moved; the rest are plain elementwise float32 ops (IEEE mul/div, no fused ops, no
matmul, so no TF32), round-half-even `torch.round`, torch's RNE float8 casts, and exact amax
reductions. Importing this module imports torch: only deep checks and fix --deep import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS = 1.0 / (1 << 24)  # modelopt's "amax treated as zero" threshold (tensor_quant.py)
E4M3_MAX = 448.0
FP4_MAX = 6.0
FLT_MAX = float(torch.finfo(torch.float32).max)
MX_ELEMENT_MAX = {"mxfp8": E4M3_MAX, "mxfp4": FP4_MAX}  # OCP MX: E4M3 or E2M1 elements, E8M0 scales


@dataclass(frozen=True)
class QuantSpec:
    """What a weight quantizer does. `fmt`: "fp8" (E4M3, per-tensor or per-channel via amax shape),
    "int" (num_bits, per-tensor / per-channel / static blocks), "nvfp4" (dynamic E2M1 blocks of 16
    with E4M3 block scales; amax is the per-tensor global amax), "mxfp8" / "mxfp4" (dynamic E4M3 /
    E2M1 blocks with power-of-two E8M0 scales from the block alone; no amax)."""
    fmt: str
    amax: object = field(compare=False, repr=False)  # float32 CPU tensor (scalar, per-channel or per-block)
    num_bits: int = 8
    unsigned: bool = False
    narrow_range: bool = True
    block_size: int | None = None  # static INT blocks along the last dim, or the NVFP4 block

    @property
    def name(self) -> str:
        if self.fmt == "nvfp4":
            return f"NVFP4 (E2M1, block {self.block_size}, E4M3 block scales)"
        if self.fmt in MX_ELEMENT_MAX:
            elem = "E4M3" if self.fmt == "mxfp8" else "E2M1"
            return f"{self.fmt.upper()} ({elem}, block {self.block_size}, E8M0 block scales)"
        n = self.amax.numel()
        gran = "per-tensor" if n == 1 else (f"block {self.block_size}" if self.block_size else "per-channel")
        if self.fmt == "fp8":
            return f"FP8 E4M3 {gran}"
        return f"{'U' if self.unsigned else ''}INT{self.num_bits} {gran}"


@dataclass(frozen=True)
class Chain:
    """Several quantizers applied in turn, then an optional per-input-channel scale. `parts`: a
    SequentialQuantizer (a list `cfg`, e.g. W4A8_AWQ: INT4 blocks, then FP8 per-tensor) applies
    `quantizer.i` in order on float32 (modelopt/torch/quantization/nn/modules/tensor_quantizer.py
    SequentialQuantizer.forward). `post_scale`: the input quantizer's pre_quant_scale, which the
    FakeQuant export folds into the weight when that input quantizer is disabled (INT4_AWQ weight
    only): `(quantizer(w.float()).to(w.dtype) * pqs[None, :]).to(w.dtype)`
    (export/plugins/vllm_fakequant_hf.py `_fakequant_module_weights`)."""
    parts: tuple
    post_scale: object = field(default=None, compare=False, repr=False)  # CPU tensor (in_features,)
    fmt = "chain"

    @property
    def name(self) -> str:
        n = " then ".join(p.name for p in self.parts)
        return n + (" with its pre_quant_scale folded in" if self.post_scale is not None else "")


def resolve_device(device: str | None = "auto") -> torch.device:
    """--device auto|cpu|cuda[:N]: auto takes the GPU when torch sees one."""
    d = (device or "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(d)  # raises RuntimeError on nonsense
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: use auto, cpu or cuda[:N]")
    return dev


def _broadcast_amax(amax: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel amax as modelopt keeps it (keepdims, e.g. (out, 1)) broadcasts as is; a flat
    per-channel vector is laid along the axis whose length it matches (modelopt:
    `axis = amax.shape.index(amax.numel())` in tensor_quant.py fake_quant_impl)."""
    if amax.numel() == 1:
        return amax.reshape(())
    if amax.dim() == x.dim():
        return amax
    flat = amax.reshape(-1)
    axis = list(x.shape).index(flat.numel())
    shape = [1] * x.dim()
    shape[axis] = flat.numel()
    return flat.reshape(shape)


def fake_fp8_e4m3(x: torch.Tensor, amax: torch.Tensor, eager: bool = False) -> torch.Tensor:
    """FP8 E4M3, per-tensor or per-channel. kernels/quantization/gemm/tensor_quant_gpu_fp8.cu
    `fake_e4m3fy[_with_axis]` (the CUDA extension a GPU export runs):
        safe_amax = amax <= 2**-24 ? 1 : amax        (float32)
        scale = 448 / safe_amax  (IEEE division);  inv_scale = 1 / scale
        out = float(e4m3_rne_satfinite(x * scale)) * inv_scale
    eager=True is quantization/tensor_quant.py `_fp8_eager` (modelopt on CPU, or on a GPU where the
    extension did not build): the same except `448.0 / safe_amax` is Python's Tensor.__rtruediv__,
    i.e. reciprocal(safe_amax) * 448, which differs from the division by an ulp for ~25% of amax
    values (measured on an H100 against both). Saturation: clamp to +-448 before torch's RNE cast."""
    a = _broadcast_amax(amax.to(torch.float32).cpu(), x)
    safe = torch.where(a <= EPS, torch.ones_like(a), a)
    scale = safe.reciprocal() * 448.0 if eager else torch.full_like(safe, 448.0) / safe
    inv_scale = torch.ones_like(scale) / scale
    scale, inv_scale = scale.to(x.device), inv_scale.to(x.device)
    q = (x * scale).clamp(min=-E4M3_MAX, max=E4M3_MAX).to(torch.float8_e4m3fn)
    return q.to(torch.float32) * inv_scale


def fake_int(x: torch.Tensor, amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False,
             narrow_range: bool = True) -> torch.Tensor:
    """Integer fake quant. quantization/tensor_quant.py `_tensor_quant` (the CPU path; the CUDA
    extension tensor_quant_gpu.cu `fake_tensor_quant_device` is the same except that it zeroes
    when amax < 2**-24 where the CPU path zeroes when amax <= 2**-24):
        max_bound = 2**(bits-1+unsigned) - 1; min_bound = 0 | -max_bound (narrow) | -max_bound-1
        scale = max_bound / amax; where amax <= 2**-24: scale = 0
        out = clamp(round_half_even(x * scale), min_bound, max_bound) / (scale or 1 where zeroed)"""
    a = _broadcast_amax(amax.to(torch.float32).cpu(), x)
    if bool((a < 0).any()):
        raise ValueError("negative amax")
    max_bound = float(2.0 ** (num_bits - 1 + int(unsigned)) - 1.0)
    min_bound = 0.0 if unsigned else (-max_bound if narrow_range else -max_bound - 1.0)
    scale = torch.tensor(max_bound, dtype=torch.float32) / a
    zero = a <= EPS
    scale_q = torch.where(zero, torch.zeros_like(scale), scale).to(x.device)
    scale_d = torch.where(zero, torch.ones_like(scale), scale).to(x.device)
    q = torch.clamp(torch.round(x * scale_q), min_bound, max_bound)
    return q / scale_d


def fake_int_block(x: torch.Tensor, amax: torch.Tensor, block: int, num_bits: int = 4,
                   unsigned: bool = False, narrow_range: bool = True) -> torch.Tensor:
    """Static blocks along the last dim (INT4 AWQ: block_sizes {-1: 128, "type": "static"}).
    quantization/nn/modules/tensor_quantizer.py `_setup_for_blockquant` / `_process_for_blockquant`:
    zero-pad the last dim to a multiple of the block, view as (-1, block), quantize with one amax per
    block (amax shape (n_blocks, 1)), view back and cut the padding."""
    shape = x.shape
    pad = (-shape[-1]) % block
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    nblocks = xp.numel() // block
    if amax.numel() != nblocks:
        raise ValueError(f"amax has {amax.numel()} values for {nblocks} blocks of {block}")
    out = fake_int(xp.reshape(-1, block), amax.reshape(nblocks, 1), num_bits, unsigned, narrow_range)
    out = out.reshape(xp.shape)
    return out[..., :shape[-1]] if pad else out


def _to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(rows, n_blocks, block) view of x's last dim, zero padded to a multiple of the block (as the
    dynamic block kernels read it)."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    pad = (-x2.shape[-1]) % block
    xp = torch.nn.functional.pad(x2, (0, pad)) if pad else x2
    return xp.reshape(xp.shape[0], -1, block)


def _from_blocks(y: torch.Tensor, shape) -> torch.Tensor:
    """Undo _to_blocks: drop the padding, restore the shape."""
    cols = shape[-1] if len(shape) else 1
    return y.reshape(y.shape[0], -1)[:, :cols].reshape(shape)


def _fp4_round_magnitude(a: torch.Tensor, tie: int = 0) -> torch.Tensor:
    """kernels/quantization/common/nvfp4_quant.py `fp4_round_magnitude`: a cascade of thresholds
    (<= 0.25 -> 0, < 0.75 -> 0.5, <= 1.25 -> 1, < 1.75 -> 1.5, <= 2.5 -> 2, < 3.5 -> 3, <= 5 -> 4,
    else 6), i.e. round half to even on the E2M1 grid, saturating at 6. Computed in fewer passes as
    round_half_even(a / step) * step with step 0.5 below 2, 1 below 4, else 2 (all exact in float32);
    tests/test_quant.py checks it against the cascade at every threshold and its float32 neighbours.
    tie=+1/-1 nudges `a` up/down by 2**-20 (relative) first: see fake_nvfp4."""
    if tie:
        a = a * (1.0 + tie * 2.0 ** -20)
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    return torch.clamp(torch.round(a / step) * step, max=FP4_MAX)


INV_2688 = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(FP4_MAX * E4M3_MAX, dtype=torch.float32)


def fake_nvfp4(x: torch.Tensor, global_amax: torch.Tensor, block: int = 16, tie: int = 0) -> torch.Tensor:
    """NVFP4, dynamic E4M3 block scales. quantization/tensor_quant.py `_dynamic_block_quantize_impl`
    (amax with several values is reduced with .amax()) -> kernels/quantization/gemm/
    fp4_kernel_hopper.py `fp4_fake_quant_block` + common/nvfp4_quant.py `fp8_quantize_scale`:
        gs = float32(global_amax) * fl32(1/2688)   (torch on CUDA divides by a Python scalar as a
             multiplication by its float32 reciprocal: measured, it is not IEEE amax / 2688)
        gs = gs > 0 ? gs : 1e-12
        per block of 16 along the last dim (zero padded): bmax = max |x|
        s = float(e4m3_rne(min(bmax / (6 * gs), 448))) * gs;  s = s >= 1e-5 ? s : 1
        out = x >= 0 ? q : 0 - q, q = fp4_round_magnitude(|x| / s) * s   (never -0.0: measured)
    Divisions here are IEEE. Triton's fp32 division in modelopt's kernel is approximate, so where
    |x| / s lands exactly on an E2M1 rounding threshold modelopt may round either way (measured: a
    few elements in 10^4 for bf16 weights); tie=+1/-1 gives those alternatives for conformance."""
    g = global_amax.to(torch.float32).cpu().amax() * INV_2688
    g = torch.where(g > 0, g, torch.tensor(1e-12, dtype=torch.float32))
    six_g = (FP4_MAX * g).to(x.device)
    g = g.to(x.device)
    blocks = _to_blocks(x, block)
    xa = blocks.abs()
    bmax = xa.amax(dim=-1, keepdim=True)
    s = torch.clamp(bmax / six_g, max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32) * g
    s = torch.where(s >= 1e-5, s, torch.ones_like(s))
    y = _fp4_round_magnitude(xa / s, tie) * s
    y = torch.where(blocks >= 0, y, 0.0 - y)  # Triton negates as 0 - y: a negative x rounded to 0 gives +0.0
    return _from_blocks(y, x.shape)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2**e in float32 for int32 e in [-127, 127], built from its bits: exact on every device
    (2**-127 is the subnormal 0x00400000)."""
    bits = torch.where(e >= -126, (e + 127) << 23, torch.full_like(e, 1 << 22))
    return bits.view(torch.float32)


def fake_mx(x: torch.Tensor, fmt: str, block: int = 32) -> torch.Tensor:
    """MXFP8 / MXFP4: quantization/tensor_quant.py `_dynamic_block_quantize_impl` with scale_bits
    (8, 0) -> the CUDA extension kernels/quantization/gemm/tensor_quant_mx.cu
    `amax_and_convert_kernel` (modelopt has no CPU path for MX):
        per block along the last dim (zero padded): bmax = max min(|x|, FLT_MAX)
        bmax 0, inf or NaN: scale = unscale = 1; else `compute_scale_e8m0_NV`:
            ratio = bmax / elem_max (float32);  e = ceil(log2(ratio)) read off ratio's bits
            (exponent field - 126 when the significand is non-zero, the field is not 0xfe and
            ratio is not a subnormal <= 2**-127; else field - 127);  unscale = 2**e, scale = 2**-e
        out = sign(x) * convert(|x| * scale) * unscale
    convert: E4M3 is __nv_fp8_e4m3 (RNE, saturating: clamp to 448 then torch's RNE cast); E2M1 is
    the round-half-even table saturating at 6 (tensor_quant_mx.h round_to_even, as for NVFP4).
    The kernel's sign is +1 for x > 0 and -1 otherwise (it is left unset for x == 0, which the
    compiled kernel treats as -1: measured on an H100), so every zero, and every negative x that
    rounds to zero, comes out -0.0."""
    elem_max = MX_ELEMENT_MAX[fmt]
    blocks = _to_blocks(x, block)
    xa = blocks.abs()
    bmax = xa.clamp(max=FLT_MAX).amax(dim=-1, keepdim=True)
    bits = (bmax / elem_max).view(torch.int32)
    field, significand = (bits >> 23) & 0xFF, bits & 0x7FFFFF
    up = (significand > 0) & (field != 0xFE) & ~((field == 0) & (significand <= 0x400000))
    e = torch.where(up, field - 126, field - 127)
    scaled = (bmax != 0) & torch.isfinite(bmax)
    e = torch.where(scaled, e, torch.zeros_like(e))
    a = xa * _pow2(-e)
    if fmt == "mxfp8":
        q = a.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    else:
        q = _fp4_round_magnitude(a)
    y = q * _pow2(e)
    y = torch.where(blocks > 0, y, -y)
    return _from_blocks(y, x.shape)


def quantize(x: torch.Tensor, spec: QuantSpec, variant: int = 0) -> torch.Tensor:
    """The quantizer on a float32 tensor (what TensorQuantizer.forward returns for it). variant 0 is
    modelopt's GPU path; the others are what modelopt may also have produced (see variants())."""
    if spec.fmt == "chain":
        for part in spec.parts:
            x = quantize(x, part, variant if variant < variants(part) else 0)
        return x
    if spec.fmt == "fp8":
        return fake_fp8_e4m3(x, spec.amax, eager=variant == 1)
    if spec.fmt == "int":
        if spec.block_size:
            return fake_int_block(x, spec.amax, spec.block_size, spec.num_bits, spec.unsigned, spec.narrow_range)
        return fake_int(x, spec.amax, spec.num_bits, spec.unsigned, spec.narrow_range)
    if spec.fmt == "nvfp4":
        return fake_nvfp4(x, spec.amax, spec.block_size or 16, tie=(0, 1, -1)[variant])
    if spec.fmt in MX_ELEMENT_MAX:
        return fake_mx(x, spec.fmt, spec.block_size or 32)
    raise ValueError(f"unsupported format {spec.fmt!r}")


def variants(spec: QuantSpec) -> int:
    """How many results modelopt can give for this format: FP8 through its CUDA extension or its
    eager fallback (2); NVFP4 with either rounding at exact E2M1 thresholds (3); INT (1: its CPU
    path and CUDA extension agree, measured)."""
    if spec.fmt == "chain":
        return max(variants(p) for p in spec.parts)
    return {"fp8": 2, "nvfp4": 3}.get(spec.fmt, 1)


def _post_scale(out: torch.Tensor, spec, dtype: torch.dtype) -> torch.Tensor:
    """The export's `(w_quant * pqs[None, :]).to(w_quant.dtype)`: the product of two floats of at
    most float32 precision is computed in float32 and rounded once to the weight's dtype, as torch
    does for bf16*bf16 and for bf16*float32 (promoted) alike."""
    s = getattr(spec, "post_scale", None)
    if s is None:
        return out.to(dtype)
    s = s.to(torch.float32).reshape(-1).to(out.device)
    return (out.to(dtype).to(torch.float32) * s).to(dtype)


def fold(weight: torch.Tensor, spec: QuantSpec, device: torch.device | str | None = None,
         variant: int = 0) -> torch.Tensor:
    """`quantizer(w.float()).to(w.dtype)` on `device`; returns a CPU tensor in the weight's dtype."""
    dev = torch.device(device) if device is not None else weight.device
    if dev.type == "cuda" and weight.device.type == "cpu":
        # page-locked staging: pageable copies ran at ~1 GB/s on the H100 machine, pinned at ~13 GB/s
        out = quantize(weight.pin_memory().to(dev, non_blocking=True).to(torch.float32), spec, variant)
        host = torch.empty(out.shape, dtype=weight.dtype, pin_memory=True)
        host.copy_(_post_scale(out, spec, weight.dtype))
        return host
    out = _post_scale(quantize(weight.to(dev).to(torch.float32), spec, variant), spec, weight.dtype)
    return out.cpu() if out.device.type != "cpu" else out


def off_grid_count(weight: torch.Tensor, spec: QuantSpec, device=None) -> int:
    """Elements of `weight` that no modelopt variant of the fold reproduces (on the grid = equal to
    what the quantizer produces, compared as values)."""
    dev = torch.device(device) if device is not None else weight.device
    w = weight.to(dev)
    x = w.to(torch.float32)
    ps = getattr(spec, "post_scale", None)
    if ps is not None:  # a folded weight divided by the scale lands within rounding of its grid point
        x = x / ps.to(torch.float32).reshape(-1).to(dev)
    off = None
    for v in range(variants(spec)):
        f = _post_scale(quantize(x, spec, v), spec, weight.dtype)
        miss = (w != f) & ~(torch.isnan(w) & torch.isnan(f)) if w.is_floating_point() else w != f
        off = miss if off is None else off & miss
        del f
    return int(off.sum())


def off_grid_fraction(weight: torch.Tensor, spec: QuantSpec, device=None) -> float:
    """Fraction of elements where fold(weight) != weight (a weight already equal to what the
    quantizer produces is on the grid). Compared as values: -0.0 == 0.0, because NVFP4 maps a
    folded -0.0 to +0.0 (its kernel takes the sign from x >= 0), so bits are not a fixed point."""
    n = weight.numel()
    return off_grid_count(weight, spec, device) / n if n else 0.0



_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """Number of elements whose bytes differ; -0.0 differs from 0.0, any NaN equals any NaN (NaN
    payloads are not part of the math: weights holding NaN are never re-folded, TEN003 reports them)."""
    v = _INT_VIEW[a.element_size()]
    a, b = a.contiguous(), b.contiguous()
    diff = a.view(v) != b.view(v)
    if a.is_floating_point():
        diff &= ~(torch.isnan(a) & torch.isnan(b))
    return int(diff.sum())

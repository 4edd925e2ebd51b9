"""fqcheck.quant.formats: Model Optimizer's TensorQuantizer math, hand-computed cases, identity with
modelopt where it runs (skipped without it), idempotence, and CPU == CUDA bit for bit (GPU only)."""
import math

import pytest
import torch

from fqcheck.quant.formats import (QuantSpec, differing, fake_fp8_e4m3, fake_int, fake_int_block, fake_nvfp4,
                                   fold, off_grid_count, off_grid_fraction, resolve_device)

NAN = float("nan")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    n = differing(a, b)
    assert n == 0, f"{n} of {a.numel()} differ; first: {a[a != b][:4].tolist()} vs {b[a != b][:4].tolist()}"


# ---- FP8 E4M3: scale = 448/amax, RNE, saturating, NaN kept -------------------------------------
def test_fp8_ties_to_even_saturation_subnormals_nan():
    x = t(0.0, -0.0, 1.0, 1.0625, 1.1875, 500.0, -500.0, 2 ** -9, 2 ** -10, 3 * 2 ** -10, 240.0, 464.0, NAN)
    # amax 448 -> scale 1: plain E4M3 rounding. 1.0625 is halfway 1|1.125 -> even 1.0; 1.1875 halfway
    # 1.125|1.25 -> 1.25; beyond 448 saturates; 2^-9 is the smallest subnormal, 2^-10 ties to 0,
    # 3*2^-10 ties between 2^-9 and 2^-8 -> 2^-8 (even mantissa).
    want = t(0.0, -0.0, 1.0, 1.0, 1.25, 448.0, -448.0, 2 ** -9, 0.0, 2 ** -8, 240.0, 448.0, NAN)
    same(fake_fp8_e4m3(x, torch.tensor(448.0)), want)


def test_fp8_scale_and_inverse_are_float32():
    # amax 1: scale 448, inv_scale = fl32(1/448); 0.5 -> 224 exactly -> 224 * fl32(1/448)
    inv = 1 / torch.tensor(448.0)
    same(fake_fp8_e4m3(t(0.5, -1.0), torch.tensor(1.0)), t(224.0) .mul(inv).repeat(2) * t(1.0, -2.0))


def test_fp8_gpu_extension_divides_eager_multiplies_by_the_reciprocal():
    # amax 2.9: fl(448 / 2.9) != fl(fl(1 / 2.9) * 448); the CUDA extension (variant 0) divides,
    # modelopt's eager path (Python 448.0 / tensor = reciprocal * 448) multiplies.
    a = torch.tensor(2.9)
    div, rcp = torch.tensor(448.0) / a, a.reciprocal() * 448.0
    assert div != rcp
    x = t(1.0, -0.37, 2.5)
    e4 = lambda v: v.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    same(fake_fp8_e4m3(x, a), e4(x * div) * (1 / div))
    same(fake_fp8_e4m3(x, a, eager=True), e4(x * rcp) * (1 / rcp))


def test_fp8_weight_folded_by_either_modelopt_path_is_on_the_grid():
    torch.manual_seed(3)
    w = (torch.randn(64, 64) * 0.7).to(torch.bfloat16)
    spec = QuantSpec("fp8", torch.tensor(2.9))
    for v in (0, 1):
        assert off_grid_count(fold(w, spec, variant=v), spec) == 0


def test_fp8_tiny_amax_acts_as_one():
    # amax <= 2^-24 is replaced by 1 (no zeroing in _fp8_eager / fake_e4m3fy)
    x = t(0.5, 3.0)
    same(fake_fp8_e4m3(x, torch.tensor(2.0 ** -25)), fake_fp8_e4m3(x, torch.tensor(1.0)))
    same(fake_fp8_e4m3(x, torch.tensor(0.0)), fake_fp8_e4m3(x, torch.tensor(1.0)))


def test_fp8_per_channel_amax_along_axis():
    x = torch.tensor([[1.0, 500.0], [1.0, 500.0]])
    amax = torch.tensor([[448.0], [896.0]])  # keepdims, as modelopt stores per-channel amax
    out = fake_fp8_e4m3(x, amax)
    same(out[0], t(1.0, 448.0))
    same(out[1], t(1.0, 512.0))  # scale 0.5: 250 -> 256 (E4M3 step 16 there) -> 512
    same(fake_fp8_e4m3(x, amax.reshape(-1)), out)  # a flat vector goes along the matching axis


# ---- INT: scale = max_bound/amax, round half even, narrow range, amax <= 2^-24 -> 0 --------------
def test_int8_round_half_even_and_clamp():
    x = t(0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0, 126.5, NAN)
    a = torch.tensor(127.0)  # scale 1
    same(fake_int(x, a, 8, narrow_range=True), t(0.0, 2.0, 2.0, -0.0, -2.0, 127.0, -127.0, 126.0, NAN))
    same(fake_int(x, a, 8, narrow_range=False), t(0.0, 2.0, 2.0, -0.0, -2.0, 127.0, -128.0, 126.0, NAN))
    same(fake_int(t(3.0, 300.0), torch.tensor(255.0), 8, unsigned=True), t(3.0, 255.0))  # [0, 255]


def test_int8_zero_and_tiny_amax_give_zero():
    x = t(1.0, -3.0, 0.0)
    same(fake_int(x, torch.tensor(0.0)), t(0.0, -0.0, 0.0))
    same(fake_int(x, torch.tensor(2.0 ** -24)), t(0.0, -0.0, 0.0))
    with pytest.raises(ValueError):
        fake_int(x, torch.tensor(-1.0))


def test_int8_per_channel_scale_division():
    x = torch.tensor([[1.0, -2.0], [0.3, 100.0]])
    amax = torch.tensor([[127.0], [12.7]])
    out = fake_int(x, amax)
    same(out[0], t(1.0, -2.0))
    s = torch.tensor(127.0) / torch.tensor(12.7)
    same(out[1], torch.stack([torch.round(t(0.3)[0] * s), torch.tensor(127.0)]) / s)


def test_int4_blocks_with_padding():
    # block 4, amax per block [7, 14]: block 1 scale 1, block 2 scale 0.5; INT4 narrow range [-7, 7]
    x = t(1.4, -7.5, 3.5, 0.2, 1.0, 3.0, 20.0, -13.0)
    same(fake_int_block(x.reshape(1, 8), t(7.0, 14.0), 4, 4).reshape(-1),
         t(1.0, -7.0, 4.0, 0.0, 0.0, 4.0, 14.0, -12.0))
    # width 6: the second block is zero-padded to 4 and the padding cut off again
    y = fake_int_block(x[:6].reshape(1, 6), t(7.0, 14.0), 4, 4)
    same(y.reshape(-1), t(1.0, -7.0, 4.0, 0.0, 0.0, 4.0))
    with pytest.raises(ValueError):
        fake_int_block(x.reshape(1, 8), t(7.0), 4, 4)


# ---- NVFP4: gs = amax/2688, block scale E4M3(bmax/(6 gs)) * gs, E2M1 thresholds -----------------
def test_nvfp4_e2m1_thresholds_and_block_scales():
    b1 = t(0.25, 0.26, 0.75, 0.74, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 6.0, -2.6, -0.1, 0.0, 1.5, 3.0)
    w1 = t(0.0, 0.5, 1.0, 0.5, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -3.0, 0.0, 0.0, 1.5, 3.0)  # -0.1 -> +0.0
    b2 = b1 * 2  # bmax 12 -> scale 2
    b3 = torch.full((16,), 1e-6)  # scale underflows E4M3 to 0 -> < 1e-5 -> 1 -> everything rounds to 0
    b4 = torch.zeros(16)
    b4[0] = 6.375  # bmax/6 = 1.0625 ties to E4M3 1.0 -> scale 1 -> 6.375 -> 6
    x = torch.stack([torch.cat([b1, b2]), torch.cat([b3, b4])])
    out = fake_nvfp4(x, torch.tensor(2688.0))  # global scale exactly 1
    same(out[0], torch.cat([w1, w1 * 2]))
    same(out[1], torch.cat([torch.zeros(16), t(6.0, *[0.0] * 15)]))


def test_nvfp4_global_scale_and_partial_block():
    x = torch.tensor([[6.0, 3.0, -1.0]])  # 3 columns: one block, zero padded
    gs = torch.tensor(2688.0 / 16)       # global scale 1/16: 6/(6/16) = 16 in E4M3 -> scale 1
    same(fake_nvfp4(x, gs), x)
    same(fake_nvfp4(torch.zeros(2, 32), torch.tensor(0.0)), torch.zeros(2, 32))  # gs 0 -> 1e-12


# ---- fold, conformance, idempotence --------------------------------------------------------------
SPECS = [
    lambda w: QuantSpec("fp8", w.float().abs().amax()),
    lambda w: QuantSpec("fp8", w.float().abs().amax(dim=1, keepdim=True)),
    lambda w: QuantSpec("int", w.float().abs().amax(), 8, False, False),
    lambda w: QuantSpec("int", w.float().abs().amax(dim=1, keepdim=True), 8, False, True),
    lambda w: QuantSpec("int", w.float().reshape(-1, 16).abs().amax(dim=1, keepdim=True), 4, False, True, 16),
    lambda w: QuantSpec("nvfp4", w.float().abs().amax(), block_size=16),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("make", SPECS)
def test_refold_is_idempotent_and_conformant(dtype, make):
    torch.manual_seed(1)
    w = (torch.randn(32, 64) * 0.05).to(dtype)
    spec = make(w)
    f = fold(w, spec)
    assert f.dtype == dtype and f.shape == w.shape
    same(fold(f, spec), f)  # fold(fold(w)) == fold(w), bit for bit
    assert off_grid_fraction(f, spec) == 0.0
    assert off_grid_fraction(w, spec) > 0.5  # raw weights are mostly off any grid


def test_fold_casts_back_through_float32():
    w = torch.tensor([[1.0, 1.0625, 300.0]], dtype=torch.bfloat16)
    same(fold(w, QuantSpec("fp8", torch.tensor(448.0))), torch.tensor([[1.0, 1.0, 288.0]], dtype=torch.bfloat16))


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises((ValueError, RuntimeError)):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            resolve_device("cuda:0")


# ---- identity with nvidia-modelopt (a test dependency: the [test] extra installs it) ----------
def _modelopt_quantizer(**attrs):
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer
    return TensorQuantizer(QuantizerAttributeConfig(**attrs))


def _edge_weights(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=g) * 10 ** (torch.rand(1, generator=g).item() * 4 - 3)
    w[0, :6] = t(0.0, -0.0, 1e-30, -1e-8, 2 ** -24, 2 ** -25)
    w[1, :] = 0.0  # an all-zero channel (amax 0)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", ["fp8", "fp8_axis", "int8", "int8_axis_narrow", "int4_block"])
def test_bit_identical_to_modelopt_tensor_quantizer_on_cpu(dtype, case):
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (the [test] extra) is the oracle")
    attrs = {"fp8": dict(num_bits=(4, 3)), "fp8_axis": dict(num_bits=(4, 3), axis=0),
             "int8": dict(num_bits=8), "int8_axis_narrow": dict(num_bits=8, axis=0, narrow_range=True),
             "int4_block": dict(num_bits=4, block_sizes={-1: 32, "type": "static"})}[case]
    q = _modelopt_quantizer(**attrs)
    for seed in range(4):
        w = _edge_weights(dtype, seed)
        x = w.float()
        if case == "int4_block":
            amax = x.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
            spec = QuantSpec("int", amax, 4, False, False, 32)
        elif "axis" in case:
            amax = x.abs().amax(dim=1, keepdim=True)
            spec = QuantSpec("fp8", amax) if case.startswith("fp8") else QuantSpec("int", amax, 8, False, True)
        else:
            amax = x.abs().amax()
            spec = QuantSpec("fp8", amax) if case == "fp8" else QuantSpec("int", amax, 8, False, False)
        q.amax = amax
        want = q(x).to(dtype)  # exactly the export's quantizer(w.float()).to(w.dtype)
        # modelopt on CPU runs FP8 through _fp8_eager: fqcheck's variant 1 (variant 0 is its CUDA extension)
        same(fold(w, spec, variant=1 if case.startswith("fp8") else 0), want)


# ---- CUDA: the same bytes as the CPU, and as modelopt's own CUDA/Triton kernels -------------------
def _all_specs(w):
    x = w.float()
    return [QuantSpec("fp8", x.abs().amax()), QuantSpec("fp8", x.abs().amax(1, keepdim=True)),
            QuantSpec("int", x.abs().amax(), 8, False, False), QuantSpec("int", x.abs().amax(1, keepdim=True), 8, False, True),
            QuantSpec("int", x.reshape(-1, 128).abs().amax(1, keepdim=True), 4, False, True, 128),
            QuantSpec("nvfp4", x.abs().amax(), block_size=16)]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_and_cpu_folds_are_bit_identical(dtype):
    for seed in range(6):
        w = _edge_weights(dtype, seed)
        w[2, :8] = torch.tensor([NAN, math.inf, -math.inf, 1.0, -1.0, 3.0, 5e-3, 7.0]).to(dtype)
        for spec in _all_specs(w.nan_to_num(0.0, 0.0, 0.0)):
            same(fold(w, spec, "cuda"), fold(w, spec, "cpu"))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_bit_identical_to_modelopt_kernels(dtype):
    """modelopt on the GPU: FP8 and INT through its CUDA extension (or its eager fallback), NVFP4
    through its Triton kernel fp4_fake_quant_block."""
    tq = pytest.importorskip("modelopt.torch.quantization.tensor_quant")
    attrs = [dict(num_bits=(4, 3)), dict(num_bits=(4, 3), axis=0), dict(num_bits=8), dict(num_bits=8, axis=0, narrow_range=True),
             dict(num_bits=4, block_sizes={-1: 128, "type": "static"}),
             dict(num_bits=(2, 1), block_sizes={-1: 16, "type": "dynamic", "scale_bits": (4, 3)})]
    del tq
    bad = {}
    for seed in range(4):
        w = _edge_weights(dtype, seed).cuda()
        for a, spec in zip(attrs, _all_specs(w.cpu())):
            q = _modelopt_quantizer(**a).cuda()
            q.amax = spec.amax.reshape(-1, 1) if spec.block_size and spec.fmt == "int" else spec.amax
            q.amax = q.amax.cuda()
            want = q(w.float()).to(dtype).cpu()
            n = differing(fold(w, spec, "cuda"), want)
            if spec.fmt == "nvfp4":
                # Triton's approximate fp32 division may round exact E2M1 ties either way: modelopt's
                # output must still be on fqcheck's grid, and differ from variant 0 only at such ties
                assert off_grid_count(want, spec, "cuda") == 0, (spec.name, seed)
                assert n <= w.numel() // 500, (spec.name, seed, n)
            elif n:
                bad[f"{spec.name} seed {seed}"] = n
    assert not bad, bad


# ---- MXFP8 / MXFP4: power-of-two E8M0 block scales from the block alone ---------------------------
E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _e4m3_grid():
    """Every non-negative finite E4M3 value, in code order (the index parity is the mantissa LSB)."""
    out = []
    for code in range(0x7F):  # 0x7f is NaN
        exp, man = code >> 3, code & 7
        out.append(man * 2.0 ** -9 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    return out


def _f32(v: float) -> float:
    import struct
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _ref_mx_block(vals, grid):
    """One MX block by the OCP definition, written independently of fqcheck: ceil(log2(float32
    (bmax / elem_max))) clamped to [-127, 127] via frexp; round half to even on the element grid."""
    bmax = max(min(abs(v), 3.4028234663852886e38) for v in vals)
    e = 0
    if bmax != 0 and math.isfinite(bmax):
        m, ex = math.frexp(_f32(bmax / grid[-1]))
        e = min(127, max(-127, ex - 1 if m == 0.5 else ex))
    out = []
    for v in vals:
        a = abs(v) * 2.0 ** -e
        i = min(range(len(grid)), key=lambda k: (abs(grid[k] - a), k % 2))  # nearest, ties to even
        q = grid[-1] if a > grid[-1] else grid[i]
        out.append(q * 2.0 ** e if v > 0 else -q * 2.0 ** e)  # modelopt's kernel: zeros come out -0.0
    return out


def test_mx_hand_computed_cases():
    from fqcheck.quant.formats import fake_mx
    # bmax 448 -> ratio 1 -> scale 1: plain E4M3 (0.3 -> 0.3125); bmax 449 -> ratio just above 1 ->
    # unscale 2: 449 -> 224.5*2 -> 224*2 = 448, 1.0 -> 0.5 -> 1.0; a negative value rounded to zero,
    # and any zero, is -0.0 (the sign modelopt's kernel gives them)
    x = torch.zeros(3, 32)
    x[0, :3] = t(448.0, 0.3, -1e-6)
    x[1, :2] = t(449.0, 1.0)
    got = fake_mx(x, "mxfp8")
    assert got[0, :3].tolist() == [448.0, 0.3125, -0.0] and math.copysign(1, got[0, 2]) == -1
    assert got[1, :2].tolist() == [448.0, 1.0] and got[2].eq(0).all() and torch.signbit(got[2]).all()
    # MXFP4: bmax 6 -> scale 1: 5 ties to 4, 2.5 ties to 2; bmax 7 -> unscale 2: 7 -> 3.5 ties up to 4 -> 8
    y = torch.zeros(2, 32)
    y[0, :3] = t(6.0, 5.0, 2.5)
    y[1, :2] = t(7.0, -0.7)
    got = fake_mx(y, "mxfp4")
    assert got[0, :3].tolist() == [6.0, 4.0, 2.0] and got[1, :2].tolist() == [8.0, -1.0]


@pytest.mark.parametrize("fmt,grid", [("mxfp8", _e4m3_grid()), ("mxfp4", E2M1_GRID)])
def test_mx_matches_an_independent_reference(fmt, grid):
    from fqcheck.quant.formats import fake_mx
    g = torch.Generator().manual_seed(7)
    rows = []
    for scale in (1e-30, 2.0 ** -130, 1e-3, 1.0, 448.0, 3e4, 1e38):  # subnormal ratios to the top binade
        rows.append(torch.randn(40, generator=g) * scale)  # 40: one full block and one padded block
    x = torch.stack(rows).to(torch.float32)
    x[1, 5] = -0.0
    got = fake_mx(x, fmt)
    for r in range(x.shape[0]):
        vals = x[r].tolist()
        want = _ref_mx_block(vals[:32], grid) + _ref_mx_block(vals[32:], grid)
        same(got[r], torch.tensor(want, dtype=torch.float32))


def test_mx_fold_is_idempotent_and_on_its_grid():
    for fmt in ("mxfp8", "mxfp4"):
        spec = QuantSpec(fmt, None, block_size=32)
        w = (torch.randn(16, 96) * 0.02).to(torch.bfloat16)
        once = fold(w, spec)
        # by value: a folded -0.0 folds to +0.0 (the kernel's sign is -1 only for x < 0)
        assert torch.equal(fold(once, spec), once) and off_grid_count(once, spec) == 0 and off_grid_fraction(w, spec) > 0.5
        assert spec.name.startswith(fmt.upper())


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mx_cuda_bit_identical_to_cpu_and_to_modelopt(dtype):
    """modelopt runs MX only through its CUDA extension (tensor_quant_mx.cu, built on first use)."""
    for fmt, num_bits in (("mxfp8", (4, 3)), ("mxfp4", (2, 1))):
        spec = QuantSpec(fmt, None, block_size=32)
        try:
            q = _modelopt_quantizer(num_bits=num_bits, block_sizes={-1: 32, "type": "dynamic", "scale_bits": (8, 0)}).cuda()
            q(torch.ones(1, 32, device="cuda"))
        except Exception as e:  # noqa: BLE001 - the extension needs nvcc on the machine
            pytest.skip(f"modelopt's MX CUDA extension did not build: {str(e)[:200]}")
        for seed in range(4):
            w = _edge_weights(dtype, seed)
            w[3, :40] = torch.linspace(-3, 3, 40).to(dtype)  # exact ties at this scale
            folded = fold(w, spec, "cuda")
            same(folded, fold(w, spec, "cpu"))
            want = q(w.cuda().float()).to(dtype).cpu()
            same(folded, want)

"""quant.kernels.fold_fast / off_grid_count_fast: formats.fold and formats.off_grid_count bit for
bit, on the CPU (lookup table, row chunks) and on the GPU (Triton passes, staged pipeline)."""
import math
import warnings

import pytest
import torch

from fqcheck.quant import kernels
from fqcheck.quant.formats import QuantSpec, differing, fold, off_grid_count
from fqcheck.quant.kernels import fold_fast, off_grid_count_fast

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _weight(shape, dtype, seed=0, special=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.3
    if special:
        w.view(-1)[:6] = torch.tensor([0.0, -0.0, 1e-30, -1e-8, 2 ** -24, 2 ** -25])
        if len(shape) == 2 and shape[0] > 3:
            w[3] = 0.0  # an all-zero channel (amax 0)
            w[2, :8] = torch.linspace(-3, 3, 8)  # exact ties at this scale
    return w.to(dtype)


def _specs(w):
    x = w.float()
    pad = (-x.shape[-1]) % 32
    blocks = torch.nn.functional.pad(x, (0, pad)).reshape(-1, 32).abs().amax(1, keepdim=True)
    return [QuantSpec("fp8", x.abs().amax()), QuantSpec("fp8", x.abs().amax(1, keepdim=True)),
            QuantSpec("fp8", x.abs().amax(0)), QuantSpec("int", x.abs().amax(), 8, False, False),
            QuantSpec("int", x.abs().amax(1, keepdim=True), 8, False, True),
            QuantSpec("int", x.abs().amax(0, keepdim=True), 4, True, True),
            QuantSpec("int", blocks, 4, False, True, 32), QuantSpec("nvfp4", x.abs().amax(), block_size=16),
            QuantSpec("mxfp8", None, block_size=32), QuantSpec("mxfp4", None, block_size=32)]


def _same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert differing(a, b) == 0, f"{what}: {differing(a, b)} of {a.numel()} differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_fold_fast_is_formats_fold_bit_for_bit(dtype, monkeypatch):
    monkeypatch.setattr(kernels, "CPU_CHUNK_ELEMS", 1000)  # many pieces, a ragged last one
    for shape in ((300, 260), (64, 136)):
        w = _weight(shape, dtype)
        for spec in _specs(w):
            _same(fold_fast(w, spec, "cpu"), fold(w, spec, "cpu"), f"{dtype} {shape} {spec.name}")


def test_cpu_lookup_covers_every_bit_pattern_nan_and_inf():
    """The table path folds all 65,536 bf16 values, NaN and Inf included, exactly as formats does."""
    w = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    w = torch.cat([w, w]).reshape(512, 256)
    for spec in (QuantSpec("fp8", torch.tensor(2.9)), QuantSpec("int", torch.tensor(0.7), 8, False, True)):
        assert kernels._lookup_ok(w, spec)
        _same(fold_fast(w, spec, "cpu"), fold(w, spec, "cpu"), spec.name)


def test_cpu_unsplittable_layouts_fall_back_to_formats():
    w3 = _weight((4, 6, 32), torch.bfloat16)
    spec = QuantSpec("nvfp4", w3.float().abs().amax(), block_size=16)
    _same(fold_fast(w3, spec, "cpu"), fold(w3, spec, "cpu"), "3-D")
    bad = QuantSpec("int", torch.ones(7, 1), 4, False, True, 32)  # amax does not fit: formats' error
    with pytest.raises(ValueError):
        fold_fast(_weight((64, 64), torch.bfloat16), bad, "cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_off_grid_count_fast_is_formats_count(dtype, monkeypatch):
    monkeypatch.setattr(kernels, "CPU_CHUNK_ELEMS", 8192)
    w = _weight((160, 130), dtype)
    w[5, :3] = torch.tensor([math.nan, math.inf, -math.inf]).to(dtype)
    for spec in _specs(w.nan_to_num(0.0, 0.0, 0.0)):
        half = fold(w, spec, "cpu").contiguous()
        half.view(-1)[::3] = w.reshape(-1)[::3]
        for x in (w, half):
            assert off_grid_count_fast(x, spec, "cpu") == off_grid_count(x, spec, "cpu"), spec.name


# ---- CUDA: Triton passes and the staged pipeline against formats on the same GPU ------------------
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("triton", ["1", "0"])
def test_cuda_fold_fast_is_formats_fold_bit_for_bit(dtype, triton, monkeypatch):
    from fqcheck.quant import staging
    monkeypatch.setenv("FQCHECK_TRITON", triton)
    monkeypatch.setattr(staging, "_triton", {})
    monkeypatch.setattr(staging, "PIECE_BYTES", 64 << 10)  # several pieces through both slots
    for seed, shape in enumerate(((300, 256), (512, 160), (64, 136), (1000, 96))):
        w = _weight(shape, dtype, seed)
        for spec in _specs(w):
            _same(fold_fast(w, spec, "cuda"), fold(w, spec, "cuda"), f"{dtype} {shape} {spec.name} triton={triton}")
    if triton == "1":
        assert staging._folds() is not None, "Triton did not load on the GPU machine"


def _more_specs(w):
    """Layouts the kernels take other paths for: a flat per-row amax (scales computed in the
    kernel), static blocks of 64 (whole blocks: one amax load per block; else a partial last
    block), a zero per-tensor amax, an unsigned per-row INT4."""
    x = w.float()
    pad = (-x.shape[-1]) % 64
    blocks = torch.nn.functional.pad(x, (0, pad)).reshape(-1, 64).abs().amax(1)
    return [QuantSpec("fp8", x.abs().amax(1)), QuantSpec("int", x.abs().amax(1), 8, False, False),
            QuantSpec("int", blocks, 8, False, True, 64), QuantSpec("int", torch.tensor(0.0), 8, False, True),
            QuantSpec("fp8", torch.tensor(0.0)), QuantSpec("int", x.abs().amax(1, keepdim=True), 4, True, False)]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_paths_and_host_threads_are_formats_fold(dtype, monkeypatch):
    from fqcheck.quant import staging
    monkeypatch.setattr(staging, "_triton", {})
    for piece, slots, threads in ((64 << 10, 2, 1), (48 << 10, 4, 3)):  # pieces smaller than a host thread's share
        monkeypatch.setattr(staging, "PIECE_BYTES", piece)
        monkeypatch.setattr(staging, "SLOTS", slots)
        monkeypatch.setattr(staging, "HOST_THREADS", threads)
        for seed, shape in enumerate(((300, 256), (64, 136), (1000, 192), (4200, 128))):  # 8400 block amax
            w = _weight(shape, dtype, seed)
            for spec in _more_specs(w):
                want = fold(w, spec, "cuda")
                _same(fold_fast(w, spec, "cuda"), want, f"{dtype} {shape} {spec.name}")
                on_gpu = staging.fold_on_device(w.cuda(), spec)  # the weight already on the GPU
                _same(on_gpu.cpu(), want, f"{dtype} {shape} {spec.name} on device")


@pytest.mark.cuda
@cuda
def test_cuda_fold_fast_reads_a_read_only_mapped_source(tmp_path):
    """The fix writer hands fold_fast a view of a read-only mapping: the host threads read it."""
    import mmap
    w = _weight((2048, 1024), torch.bfloat16, 3)
    (tmp_path / "w.bin").write_bytes(b"\0" * 6 + w.view(torch.uint8).numpy().tobytes())  # misaligned start
    with open(tmp_path / "w.bin", "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():  # torch warns once per process that it may not write the buffer
        warnings.simplefilter("ignore", UserWarning)
        mapped = torch.frombuffer(mm, dtype=torch.uint8)[6:].view(torch.bfloat16).reshape(w.shape)
    for spec in (QuantSpec("fp8", w.float().abs().amax(1, keepdim=True)), QuantSpec("mxfp4", None, block_size=32)):
        _same(fold_fast(mapped, spec, "cuda"), fold(w, spec, "cpu"), spec.name)


def test_piece_rows_cover_the_weight_with_a_ramp_at_both_ends():
    from fqcheck.quant.staging import piece_rows
    for rows, row_bytes, piece, ramp in ((8192, 16384, 32 << 20, 3), (1000, 192, 64 << 10, 3), (7, 10, 10, 2),
                                         (100, 16384, 32 << 20, 3), (4096, 16384, 32 << 20, 0)):
        b = piece_rows(rows, row_bytes, piece, ramp)
        assert b[0][0] == 0 and b[-1][1] == rows and all(p[1] == q[0] for p, q in zip(b, b[1:]))
        assert all(0 < (r1 - r0) * row_bytes <= max(piece, row_bytes) for r0, r1 in b)
    sizes = [r1 - r0 for r0, r1 in piece_rows(8192, 16384, 32 << 20, 3)]
    assert sizes[:3] == [256, 512, 1024] and sizes[-3:] == [1024, 512, 256] and max(sizes) <= 2048


@pytest.mark.cuda
@cuda
def test_cuda_fold_fast_result_is_page_locked_and_input_untouched():
    w = _weight((256, 256), torch.bfloat16)
    before = w.clone()
    out = fold_fast(w, QuantSpec("nvfp4", w.float().abs().amax(), block_size=16), "cuda")
    assert out.is_pinned() and out.device.type == "cpu" and torch.equal(w.view(torch.int16), before.view(torch.int16))



# ---- grid_stats: the one pass of the grid test, against formats' own comparisons --------------------
def _reference_grid(w, spec):
    """What formats says, the long way: off_grid_count, and per element which variants reproduce it."""
    from fqcheck.quant.formats import _post_scale, quantize, variants
    x = w.to(torch.float32)
    mask = torch.zeros(w.shape, dtype=torch.int64)
    for v in range(variants(spec)):
        f = _post_scale(quantize(x, spec, v), spec, w.dtype)
        mask |= ((w == f) | (torch.isnan(w) & torch.isnan(f))).to(torch.int64) << v
    return (off_grid_count(w, spec, "cpu"), frozenset(mask.unique().tolist()),
            not bool(torch.isfinite(w).all()), bool((w != 0).any()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grid_stats_is_formats_grid_test(dtype, monkeypatch):
    """Off count, FP8-form masks, NaN/Inf and all-zero: the lookup (16-bit, per-tensor) and the row
    chunks (everything else) give formats' answers on folded, half-folded, raw and special weights."""
    monkeypatch.setattr(kernels, "CPU_CHUNK_ELEMS", 8192)  # several pieces, a ragged last one
    monkeypatch.setattr(kernels, "GRID_CHUNK_ELEMS", 8192)
    w = _weight((300, 260), dtype)
    specials = w.clone()
    specials[5, :3] = torch.tensor([math.nan, math.inf, -math.inf]).to(dtype)
    for spec in _specs(w):
        half = fold(w, spec, "cpu").contiguous()
        half.view(-1)[::3] = w.reshape(-1)[::3]
        for x in (w, fold(w, spec, "cpu"), half, specials, torch.zeros_like(w)):
            g = kernels.grid_stats(x, spec, "cpu")
            assert (g.off, g.masks, g.nonfinite, g.nonzero) == _reference_grid(x, spec), spec.name
            if kernels._lookup_ok(x, spec):  # numpy's gather, for a torch without uint16
                assert kernels._grid_lookup_numpy(x, kernels._class_table(x.dtype, spec)) == g
    per_tensor = QuantSpec("fp8", w.float().abs().amax())
    assert kernels._lookup_ok(w, per_tensor) == (dtype != torch.float32)


def test_grid_stats_reads_a_read_only_map_without_copying(tmp_path):
    """The grid test runs on a tensor over the mapped file (what the deep pass hands it): no write."""
    import mmap
    w = _weight((512, 256), torch.bfloat16)
    p = tmp_path / "w.bin"
    p.write_bytes(w.view(torch.uint8).numpy().tobytes())
    from fqcheck.quant.state import tensor_over
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        t = tensor_over(memoryview(mm), "BF16").reshape(w.shape)
        spec = QuantSpec("fp8", w.float().abs().amax())
        g = kernels.grid_stats(t, spec, "cpu")
    assert g.off == off_grid_count(w, spec, "cpu") > 0
    assert p.read_bytes() == w.view(torch.uint8).numpy().tobytes()


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_grid_stats_is_the_cpu_grid_stats(dtype, monkeypatch):
    monkeypatch.setattr(kernels, "CUDA_GRID_ELEMS", 10000)  # several row chunks on the GPU
    w = _weight((300, 260), dtype)
    w[5, :3] = torch.tensor([math.nan, math.inf, -math.inf]).to(dtype)
    for spec in _specs(w.nan_to_num(0.0, 0.0, 0.0)):
        half = fold(w, spec, "cpu").contiguous()
        half.view(-1)[::3] = w.reshape(-1)[::3]
        for x in (w, half):
            assert kernels.grid_stats(x, spec, "cuda") == kernels.grid_stats(x, spec, "cpu"), spec.name

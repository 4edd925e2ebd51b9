"""QNT002 (deep): weights whose weight quantizer is enabled but whose values are off its grid.
torch is imported only when the check runs (deep lint), never at import."""
from __future__ import annotations

from ..checkpoint.safetensors import FLOAT_DTYPES
from ..engine import Hit, check
from ..fix.edits import ReplaceTensor


class Refold:
    """ReplaceTensor producer: original weight bytes -> folded weight bytes (same dtype and shape).
    It carries the amax itself, so it still works after the QNT001 fix drops the amax tensor from
    the shard (the writer reads the original file; edits are applied in one pass). It reads the
    bytes in place (the writer hands over a view of the mapped source) and returns a view of the
    folded tensor: no Python byte copies on the way to the output file."""

    def __init__(self, spec, st_dtype: str, shape, device: str = "auto"):
        self.spec, self.st_dtype, self.shape, self.device = spec, st_dtype, tuple(shape), device

    def __call__(self, raw) -> memoryview:
        import warnings

        import torch

        from ..quant.formats import resolve_device
        from ..quant.kernels import fold_fast
        from ..quant.state import ST_TORCH_DTYPES
        dt = getattr(torch, ST_TORCH_DTYPES[self.st_dtype])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only map: the fold only reads it
            w = torch.frombuffer(raw, dtype=dt).reshape(self.shape)
        out = fold_fast(w, self.spec, resolve_device(self.device))
        return memoryview(out.contiguous().reshape(-1).view(torch.uint8).numpy())


def _has_pre_quant_scale(state, module: str) -> bool:
    import torch
    for q in state.quantizers.values():
        p = q.pre_quant_scale
        if q.module == module and isinstance(p, torch.Tensor) and not bool((p == 1).all()):
            return True
    return False


@check("QNT002")
def unquantized_weights(ckpt, **options):
    try:
        import torch  # noqa: F401
    except ImportError:  # deep checks need torch; without it there is nothing to compare
        return
    from ..checkpoint.data import ShardData
    from ..quant.formats import resolve_device
    from ..quant.kernels import off_grid_count_fast as off_grid_count  # formats' count, at speed
    from ..quant.state import _clean_header, load_state, read_tensor, weight_spec

    device_opt = options.get("device") or "auto"
    device = resolve_device(device_opt)
    state = load_state(ckpt)
    for qname in sorted(state.quantizers):
        q = state.quantizers[qname]
        wname = q.weight_name if q.is_weight else None
        loc = ckpt.tensor(wname) if wname else None
        if loc is None:
            continue
        fname, entry = loc
        h = ckpt.header(fname)
        if entry.dtype not in FLOAT_DTYPES or not _clean_header(h) or not entry.nbytes:
            continue
        spec, _why = weight_spec(state, q, entry.shape)
        if spec is None or _has_pre_quant_scale(state, q.module):
            continue  # pre_quant_scale folded into the weight is not on the bare grid
        with ShardData(h) as sd:
            w = read_tensor(sd, entry)  # one tensor in memory at a time
        if not bool(torch.isfinite(w).all()):
            continue  # TEN003 reports NaN/Inf; re-folding them would hide that
        try:
            n = off_grid_count(w, spec, device)
        except ValueError:
            continue  # amax does not fit the weight (shape): QNT003's business
        del w
        if not n:
            continue
        frac = n / entry.numel
        scales = f"amax from {q.amax_where}" if spec.amax is not None else "scales from the weight itself"
        yield Hit(f"{wname}: {n:,} of {entry.numel:,} values ({frac:.1%}) are off the {spec.name} grid "
                  f"of its enabled weight quantizer {qname} ({scales}): the export left it "
                  f"unquantized", file=fname, tensor=wname,
                  fix=ReplaceTensor(fname, wname, Refold(spec, entry.dtype, entry.shape, device_opt)))

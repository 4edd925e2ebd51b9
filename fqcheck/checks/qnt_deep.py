"""QNT002 (deep): weights whose weight quantizer is enabled but whose values are off its grid.
torch is imported only when the check runs (deep lint), never at import."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..checkpoint.safetensors import FLOAT_DTYPES
from ..engine import Hit, check
from ..fix.edits import ReplaceTensor
from .qnt import OLD_AMAX_NAME

STAGE_RE = re.compile(r"(?:\.\d+)+$")  # SequentialQuantizer stage suffix: weight_quantizer.0


class Refold:
    """ReplaceTensor producer: original weight bytes -> folded weight bytes (same dtype and shape).
    It carries the amax itself, so it still works after the QNT001 fix drops the amax tensor from
    the shard (the writer reads the original file; edits are applied in one pass). It reads the
    bytes in place (the writer hands over a view of the mapped source) and returns a view of the
    folded tensor: no Python byte copies on the way to the output file."""

    def __init__(self, spec, st_dtype: str, shape, device: str = "auto", variant: int = 0):
        self.spec, self.st_dtype, self.shape, self.device = spec, st_dtype, tuple(shape), device
        self.variant = variant  # FP8: 0 Model Optimizer's CUDA form, 1 its CPU eager form

    def __call__(self, raw) -> memoryview:
        import warnings

        import torch

        from ..quant.formats import fold, resolve_device
        from ..quant.kernels import fold_fast
        from ..quant.state import ST_TORCH_DTYPES
        dt = getattr(torch, ST_TORCH_DTYPES[self.st_dtype])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a read-only map: the fold only reads it
            w = torch.frombuffer(raw, dtype=dt).reshape(self.shape)
        device = resolve_device(self.device)
        # variant 0 (Model Optimizer's CUDA form) at speed; the CPU eager form is formats.fold's alone
        out = fold_fast(w, self.spec, device) if self.variant == 0 else fold(w, self.spec, device, self.variant)
        return memoryview(out.contiguous().reshape(-1).view(torch.uint8).numpy())


@check("QNT002")
def unquantized_weights(ckpt, **options):
    if not _has_quantizer_state(ckpt):
        return  # nothing names a quantizer: no torch import, no reading (issue 15)
    try:
        import torch  # noqa: F401
    except ImportError:  # deep checks need torch; without it there is nothing to compare
        return
    yield from weight_hits(ckpt, options.get("device") or "auto", options.get("quant_format"))


def _has_quantizer_state(ckpt) -> bool:
    from ..checkpoint import STATE_NAME
    from ..quant.state import leaked_tensors
    return STATE_NAME in ckpt.names or OLD_AMAX_NAME in ckpt.names or next(leaked_tensors(ckpt), None) is not None


def weight_hits(ckpt, device_opt: str = "auto", quant_format: str | None = None):
    """QNT002 hits: weights off their quantizer's grid (with a re-fold), and weights whose leaked
    amax is evidence of a quantizer but whose format nothing decides (no fix: the evidence stays)."""
    for v in verdicts(ckpt, device_opt, quant_format):
        if v.hit is not None:
            yield v.hit


@dataclass
class Verdict:
    weight: str
    decided: bool          # on the grid, off it (hit carries the re-fold), or not quantized by design
    why: str = ""          # why it is undecided
    hit: Hit | None = None


def verdicts(ckpt, device_opt: str = "auto", quant_format: str | None = None, only=None):
    """One Verdict per stored weight that has a weight quantizer. `only`: restrict to these weight
    names (fix reads just the weights whose amax leaked)."""
    import torch

    from ..quant.formats import resolve_device
    from ..quant.kernels import off_grid_count_fast as off_grid_count  # formats' count, at speed
    from ..quant.resolve import Resolver
    from ..quant.state import load_state

    device = resolve_device(device_opt)
    res = Resolver(ckpt, load_state(ckpt), quant_format, device)
    if OLD_AMAX_NAME in ckpt.names:  # weights unfolded by design: vLLM quantizes them at load time
        yield from (Verdict(w, True) for w in sorted(res.groups()) if only is None or w in only)
        return
    for wname, parts in sorted(res.groups().items()):
        if only is not None and wname not in only:
            continue
        loc = ckpt.tensor(wname)
        if loc is None:
            continue  # e.g. a tied lm_head: no stored weight to judge
        fname, entry = loc
        if entry.dtype not in FLOAT_DTYPES or not entry.nbytes:
            yield Verdict(wname, False, f"stored as {entry.dtype} with {entry.nbytes} bytes")
            continue
        spec, source, why = res.spec(wname, parts, entry.shape)
        leaked = [q for q in parts if q.amax_where and q.amax_where.endswith(".safetensors")]
        if spec is None:
            if why and why.startswith("its quantizer is disabled"):
                yield Verdict(wname, True)
            elif leaked and why:
                yield Verdict(wname, False, why, Hit(f"{wname}: cannot verify that it is quantized: {why}",
                                                    file=fname, tensor=wname))
            else:
                yield Verdict(wname, False, why or "no amax")
            continue
        w = res.read(wname)
        if w is None:
            yield Verdict(wname, False, "its shard cannot be read safely (see the SFT findings)")
            continue
        if not bool(torch.isfinite(w).all()):  # TEN003 reports NaN/Inf; re-folding would hide them
            yield Verdict(wname, False, "it holds NaN or Inf (TEN003)")
            continue
        try:
            n = off_grid_count(w, spec, device)
        except ValueError as e:  # amax does not fit the weight (shape): QNT003's business
            yield Verdict(wname, False, f"its amax does not fit it: {e}")
            continue
        del w
        if not n:
            yield Verdict(wname, True)
            continue
        frac = n / entry.numel
        where = {q.amax_where for q in parts if q.amax_where}
        scales = f"amax from {', '.join(sorted(where))}" if where else "scales from the weight itself"
        qname = STAGE_RE.sub("", parts[0].name)
        yield Verdict(wname, True, hit=Hit(
            f"{wname}: {n:,} of {entry.numel:,} values ({frac:.1%}) are off the {spec.name} grid of its "
            f"enabled weight quantizer {qname} ({scales}; format {source}): the export left it "
            f"unquantized", file=fname, tensor=wname,
            fix=ReplaceTensor(fname, wname, Refold(spec, entry.dtype, entry.shape, device_opt, res.variant(spec)))))

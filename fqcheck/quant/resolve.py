"""Which fake-quant format a weight's quantizer has, and where that came from.

Sources, first that decides wins (issue 13):
  1. vllm_fq_modelopt_state.pth: quant_cfg / quantizer_state (a list `cfg` is a SequentialQuantizer);
  2. hf_quant_config.json `quantization.quant_algo`, or config.json `quantization_config.quant_algo`;
  3. inferred from the weights the export did fold: a weight whose own leaked amax puts it exactly
     on the grid of one format is a folded sibling; used only when every folded sibling agrees;
  4. the caller's `quant_format` (--quant-format): fp8, int8, int4 or nvfp4.
Granularity (per-tensor, per-channel, blocks) always comes from the leaked amax's shape.
Imports torch: deep checks and fix call it, never header-only lint.
"""
from __future__ import annotations

import math

import torch

from .formats import Chain, QuantSpec
from .kernels import GridStats
from .state import FORMAT_UNKNOWN, STAGE_RE, QuantState, read_tensor, spec_from_attrs, weight_spec

FORMATS = ("fp8", "int8", "int4", "nvfp4")
# A weight on a coarse grid is also on the finer grids that contain it (INT4 values k*amax/7 are
# exact FP8 values of the same amax): among the formats every folded sibling is on, the coarsest wins.
COARSE_FIRST = ("int4", "nvfp4", "int8", "fp8")
# modelopt's quant_algo names (modelopt/torch/export/model_config.py QUANTIZATION_*) -> format
ALGO_FORMATS = (("NVFP4", "nvfp4"), ("FP8", "fp8"), ("INT8", "int8"), ("W8A8", "int8"),
                ("W4A16", "int4"), ("INT4", "int4"))


def spec_for_format(fmt: str, amax, shape) -> QuantSpec | None:
    """The spec of `fmt` whose granularity the amax's shape gives, or None if it fits no layout."""
    if amax is None or not shape:
        return None
    a = amax.detach().to(torch.float32)
    n, rows, cols = a.numel(), shape[0], shape[-1]
    if fmt == "nvfp4":
        return QuantSpec("nvfp4", a.reshape(()), block_size=16) if n == 1 else None
    if fmt == "fp8":
        if n == 1:
            return QuantSpec("fp8", a.reshape(()))
        return QuantSpec("fp8", a.reshape(rows, *[1] * (len(shape) - 1))) if n == rows else None
    bits = {"int8": 8, "int4": 4}.get(fmt)
    if bits is None:
        return None
    if n == 1:
        return QuantSpec("int", a.reshape(()), bits, False, False)
    if n == rows and len(shape) > 1 and bits == 8:
        return QuantSpec("int", a.reshape(rows, *[1] * (len(shape) - 1)), bits, False, False)
    lead = math.prod(shape[:-1])
    if n % lead:
        return None
    per_row = n // lead
    block = -(-cols // per_row)
    if -(-cols // block) != per_row:
        return None
    return QuantSpec("int", a.reshape(n, 1), bits, False, False, block)


class Resolver:
    """Format decisions for the weight quantizers of one checkpoint (cached inference)."""

    def __init__(self, ckpt, state: QuantState, quant_format: str | None = None, device="cpu",
                 workers: list | None = None):
        self.ckpt, self.state, self.device = ckpt, state, device
        self.workers = workers or [str(device)]  # --jobs: where whole weights are tested (workers.devices)
        self.quant_format = quant_format.lower() if quant_format else None
        self._inferred: tuple | None = None
        self._variant: int | None = None

    def groups(self) -> dict[str, list]:
        """weight tensor name -> its weight quantizer(s) (SequentialQuantizer stages in order)."""
        out: dict[str, list] = {}
        for name in sorted(self.state.quantizers, key=_stage_key):
            q = self.state.quantizers[name]
            if not q.is_weight:
                continue
            base = STAGE_RE.sub("", name)
            wname = type(q)(base).weight_name
            if wname:
                out.setdefault(wname, []).append(q)
        return out

    def spec(self, wname: str, parts: list, shape) -> tuple[object, str, str | None]:
        """(spec or None, where the format came from as a phrase ("from X", "inferred from ..."), why not)."""
        spec, why = self._from_state(parts, shape)
        if why != FORMAT_UNKNOWN:
            return self._with_pqs(spec, parts, why, "from vllm_fq_modelopt_state.pth")
        if len(parts) == 1:  # formats named elsewhere are one quantizer each
            amax = parts[0].amax
            for source, fmt in (self._declared(), self._infer(), ("from --quant-format", self.quant_format)):
                if fmt:
                    spec = spec_for_format(fmt, amax, shape)
                    why = None if spec else (f"a {fmt} amax of shape "
                                             f"{list(amax.shape) if amax is not None else None} does not fit it")
                    return self._with_pqs(spec, parts, why, source)
        return None, "", ("format unknown: no quant_cfg, hf_quant_config.json or quantization_config names "
                          "it, the folded weights do not agree on one, and no --quant-format was given")

    def _from_state(self, parts, shape):
        base = STAGE_RE.sub("", parts[0].name)
        enabled, attrs = self.state.config_for(base)
        if len(parts) == 1 and parts[0].name == base:
            return weight_spec(self.state, parts[0], shape)
        if enabled is False:
            return None, "its quantizer is disabled in the quant config"
        if not isinstance(attrs, list) or len(attrs) != len(parts):
            return None, FORMAT_UNKNOWN
        specs = []
        for a, q in zip(attrs, parts):
            s, why = spec_from_attrs(a, q, shape)
            if s is None:
                return None, why
            specs.append(s)
        return Chain(tuple(specs)), None

    def _with_pqs(self, spec, parts, why, source):
        """Wrap in the input quantizer's pre_quant_scale when the export folded it into the weight
        (its input quantizer disabled, e.g. INT4_AWQ weight-only); a scale whose input quantizer's
        state is unknown leaves the weight undecidable."""
        if spec is None:
            return None, source, why
        module = STAGE_RE.sub("", parts[0].name).rsplit(".", 1)[0]
        iq = self.state.quantizers.get(f"{module}.input_quantizer")
        p = getattr(iq, "pre_quant_scale", None)
        if not isinstance(p, torch.Tensor) or bool((p == 1).all()):
            return spec, source, None
        enabled, _ = self.state.config_for(f"{module}.input_quantizer")
        if enabled is None and iq.attrs.get("_disabled") is not None:
            enabled = not iq.attrs["_disabled"]
        if enabled is None:
            return None, source, "a pre_quant_scale is stored and whether the export folded it is unknown"
        if enabled:
            return spec, source, None  # applied to activations at run time, not folded
        parts_ = spec.parts if isinstance(spec, Chain) else (spec,)
        return Chain(tuple(parts_), post_scale=p.detach().reshape(-1)), source, None

    def _declared(self) -> tuple[str, str | None]:
        ckpt = self.ckpt
        for fname, getter in (("hf_quant_config.json", lambda d: (d.get("quantization") or {}).get("quant_algo")),
                              ("config.json quantization_config",
                               lambda d: (d.get("quantization_config") or {}).get("quant_algo"))):
            jf = ckpt._json(fname.split()[0]) if fname.split()[0] in ckpt.names else None
            data = jf.data if jf is not None and not jf.error else None
            algo = getter(data) if isinstance(data, dict) else None
            if isinstance(algo, str):
                for key, fmt in ALGO_FORMATS:
                    if key in algo.upper():
                        return f"from {fname}", fmt
        return "", None

    def _infer(self) -> tuple[str, str | None]:
        """A format every folded sibling agrees on (siblings: weights whose own leaked amax puts them
        exactly on some format's grid)."""
        if self._inferred is None:
            todo = []  # (weight, format, spec) for every sibling with its own leaked amax
            for wname, parts in self.groups().items():
                if len(parts) != 1 or parts[0].amax is None or parts[0].amax_where == "vllm_fq_modelopt_state.pth":
                    continue
                loc = self.ckpt.tensor(wname)
                if loc is None:
                    continue
                todo += [(wname, fmt, spec) for fmt in FORMATS
                         for spec in [spec_for_format(fmt, parts[0].amax, tuple(loc[1].shape))] if spec is not None]
            stats = self.grid_many([(w, spec) for w, _, spec in todo])
            on: dict[str, set] = {}
            for (wname, fmt, _), g in zip(todo, stats):
                if isinstance(g, GridStats) and not g.nonfinite:  # unreadable or NaN/Inf: no evidence
                    on.setdefault(wname, set())
                    if not g.off:
                        on[wname].add(fmt)
            agreed, folded = None, 0
            for fmts in on.values():
                if fmts:
                    folded += 1
                    agreed = fmts if agreed is None else agreed & fmts
            fmt = next((f for f in COARSE_FIRST if f in agreed), None) if agreed else None
            self._inferred = (f"inferred from {folded} folded weight(s)", fmt)
        return self._inferred

    def variant(self, spec) -> int:
        """Which FP8 form to re-fold with: the export's device when its folded weights tell (an element
        that only Model Optimizer's CPU eager form reproduces -> 1, only its CUDA form -> 0), else the
        CUDA form (0), which exports of large models run. Other formats have one form on both."""
        parts = spec.parts if isinstance(spec, Chain) else (spec,)
        if not any(p.fmt == "fp8" for p in parts):
            return 0
        if self._variant is None:
            self._variant = 0
            sibs = []
            for wname, qs in self.groups().items():
                if len(qs) != 1 or qs[0].amax is None or qs[0].amax_where == "vllm_fq_modelopt_state.pth":
                    continue
                loc = self.ckpt.tensor(wname)
                sib, _, _ = self.spec(wname, qs, tuple(loc[1].shape)) if loc is not None else (None, "", "")
                if isinstance(sib, QuantSpec) and sib.fmt == "fp8":
                    sibs.append((wname, sib))
            # variant masks (bit v: FP8 form v reproduces the element), one pass per sibling, shared
            # with the grid test of the same weight
            for g in self.grid_many(sibs):
                if not isinstance(g, GridStats) or g.nonfinite:
                    continue
                if 3 not in g.masks:
                    continue  # no element both forms reproduce: a raw weight, no evidence
                only_cpu, only_cuda = 2 in g.masks, 1 in g.masks
                if only_cpu != only_cuda:
                    self._variant = 1 if only_cpu else 0
                    break
        return self._variant

    # ---- the grid test of whole weights: one pass each, memoised per checkpoint, spread over --jobs

    def grid(self, wname: str, spec):
        """GridStats of the stored weight under `spec`; None when it cannot be read; the ValueError
        when the spec does not fit it (amax shape)."""
        return self.grid_many([(wname, spec)])[0]

    def grid_many(self, todo: list) -> list:
        """grid() for [(weight, spec)], the missing ones computed by the workers (whole weights, in
        file order), each once per checkpoint (the lint, the fix's evidence and the re-fold's FP8
        form all ask). A fix's re-lint takes a weight whose bytes the fix copied verbatim from the
        first lint's memo (fqcheck.carry)."""
        from .kernels import spec_key
        memo = self.ckpt.once("qnt.grid", dict)
        keys, need = [], {}
        for wname, spec in todo:
            loc = self.ckpt.tensor(wname)
            key = (loc[0] if loc else None, wname, spec_key(spec))
            keys.append(key)
            if key in memo or key in need:
                continue
            carried = self._carried(key)
            if carried is not None:
                memo[key] = carried
            else:
                need[key] = (loc, spec)
        if need:
            order = sorted(need, key=lambda k: (k[0] or "", need[k][0][1].begin if need[k][0] else 0))
            from ..workers import spread
            results = spread(lambda k, dev: self._grid_one(need[k], dev), order, self.workers)
            by_tensor = self.ckpt.once("qnt.grid.by_tensor", dict)  # the TEN pass reads NaN/Inf, zeros here
            for k, g in zip(order, results):
                memo[k] = g
                if isinstance(g, GridStats):
                    by_tensor[(k[0], k[1])] = g
        return [memo[k] for k in keys]

    def _grid_one(self, item, device):
        from .kernels import grid_stats
        loc, spec = item
        w = self.view(loc) if loc is not None else None
        if w is None:
            return None
        try:
            return grid_stats(w, spec, device)
        except ValueError as e:  # the amax does not fit the weight: the caller says so
            return e

    def _carried(self, key):
        carry = getattr(self.ckpt, "carry", None)
        src = carry.source(key[0], key[1]) if carry is not None and key[0] else None
        if src is None:
            return None
        src_ckpt, src_file = src
        return src_ckpt.once("qnt.grid", dict).get((src_file, key[1], key[2]))

    def view(self, loc):
        """A read-only CPU tensor over the stored weight's bytes in the mapped file (no copy), or None
        when unreadable. The mapping lives as long as the tensor."""
        from ..checkpoint.data import ShardData
        from .state import _clean_header, tensor_over
        fname, entry = loc
        h = self.ckpt.header(fname)
        if not _clean_header(h) or not entry.nbytes or entry.dtype not in ("F32", "F16", "BF16"):
            return None
        sd = ShardData(h)
        try:
            raw = sd.view(entry)
        except ValueError:
            sd.close()
            return None
        w = tensor_over(raw, entry.dtype)  # the grid test only reads it
        sd.close()  # the map itself stays until the tensor over it is collected
        return w.reshape(entry.shape)

    def read(self, wname: str):
        """The stored weight as a CPU tensor, or None when absent or unreadable."""
        from ..checkpoint.data import ShardData
        from .state import _clean_header
        loc = self.ckpt.tensor(wname)
        if loc is None:
            return None
        fname, entry = loc
        h = self.ckpt.header(fname)
        if not _clean_header(h) or not entry.nbytes or entry.dtype not in ("F32", "F16", "BF16"):
            return None
        with ShardData(h) as sd:
            return read_tensor(sd, entry)


def _stage_key(name: str):
    m = STAGE_RE.search(name)
    return (STAGE_RE.sub("", name), [int(x) for x in m.group(0).split(".")[1:]] if m else [])

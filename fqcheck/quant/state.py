"""Quantizer state of a FakeQuant export: which weight quantizers exist, their format and amax.

Two sources (nvidia-modelopt 0.47.0, modelopt/torch/export/plugins/vllm_fakequant_hf.py):
(a) quantizer buffers leaked into the shards by accelerate's save_pretrained (PR 1194):
    `<module>.<x>_quantizer._amax`, `<module>.<x>_quantizer._pre_quant_scale`, ...
(b) `vllm_fq_modelopt_state.pth`, written by `export_hf_vllm_fq_checkpoint` with
    `safe_save(modelopt_state, ...)`:
      {"modelopt_state_dict": [(mode, {"config": {...}, "metadata": {...}}), ...],
       "modelopt_version": "0.47.0",
       "modelopt_state_weights": {"<quantizer>": {"_amax": tensor, "_pre_quant_scale": tensor, ...}}}
    The "quantize" mode's config holds "quant_cfg": a list of {"quantizer_name": glob,
    "parent_class": str|None, "enable": bool, "cfg": {num_bits, axis, block_sizes, unsigned,
    narrow_range, ...}|None} (older releases: a dict glob -> attributes); later entries win.
    metadata["quantizer_state"] maps quantizer names to TensorQuantizer.get_modelopt_state()
    (`_num_bits`, `_axis`, `_block_sizes`, `_unsigned`, `_narrow_range`, `_disabled`, ...).
    Since weights are folded before saving, the export drops weight-quantizer entries from both
    dicts (is_weight_quantizer_state_key) and disables them first; older exports kept them.
torch is imported lazily: nothing here runs on the header-only path.
"""
from __future__ import annotations

import fnmatch
import re
import threading
import warnings
from dataclasses import dataclass, field

from ..checkpoint import STATE_NAME

# `<module>.<attr>_quantizer[.<i>].<buffer>`; the group named q is the quantizer's name.
LEAK_RE = re.compile(r"^(?P<q>(?:(?P<module>.+)\.)?(?P<attr>\w*quantizers?)(?:\.\d+)*)\.(?P<buf>_\w+)$")
STAGE_RE = re.compile(r"(?:\.\d+)+$")  # a SequentialQuantizer stage suffix: weight_quantizer.0
WEIGHT_Q_RE = re.compile(r"(?:^|\.)(?:\w+_)?weight_quantizers?(?:\.\d+)*$")

FORMAT_UNKNOWN = "format unknown (no quant_cfg or quantizer_state names it)"

ST_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                   "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                   "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@dataclass
class Quantizer:
    name: str                       # e.g. model.layers.0.self_attn.q_proj.weight_quantizer
    amax: object = None             # torch tensor (CPU) or None
    amax_where: str | None = None   # the file it came from
    pre_quant_scale: object = None
    attrs: dict = field(default_factory=dict)  # _num_bits, _axis, _block_sizes, ... when known

    @property
    def is_weight(self) -> bool:
        return bool(WEIGHT_Q_RE.search(self.name))

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    @property
    def weight_name(self) -> str | None:
        """The tensor this weight quantizer folds: `<module>.<attr minus _quantizer>`."""
        m = re.search(r"(?:^|\.)((?:\w+_)?weight)_quantizer$", self.name)
        if not m:
            return None
        return f"{self.module}.{m.group(1)}" if self.module else m.group(1)


@dataclass
class QuantState:
    quantizers: dict = field(default_factory=dict)   # name -> Quantizer
    quant_cfg: list = field(default_factory=list)    # normalized [(glob, parent_class, enable, cfg|None)]
    state_loaded: bool = False
    problems: list = field(default_factory=list)     # (file, tensor, message) for QNT003

    def quantizer(self, name: str) -> Quantizer:
        q = self.quantizers.get(name)
        if q is None:
            q = self.quantizers[name] = Quantizer(name)
        return q

    def config_for(self, qname: str) -> tuple[bool | None, dict | list]:
        """(enabled, attributes) for a quantizer from the quant_cfg globs (later entries win; entries
        restricted to a parent class are skipped: module classes are not in the checkpoint). A list
        `cfg` (SequentialQuantizer, e.g. W4A8_AWQ) gives a list of attribute dicts, one per stage."""
        enabled, attrs = None, {}
        for glob, parent, enable, cfg in self.quant_cfg:
            if parent or not fnmatch.fnmatch(qname, glob):
                continue
            if isinstance(cfg, dict):
                attrs = {**attrs, **cfg} if isinstance(attrs, dict) else dict(cfg)
                enabled = bool(cfg.get("enable", True)) if enable is None else bool(enable)
            elif isinstance(cfg, list):  # a SequentialQuantizer: one attribute dict per stage
                attrs = [dict(c) for c in cfg]
                enabled = True if enable is None else bool(enable)
            elif enable is not None:
                enabled = bool(enable)
        return enabled, attrs


def _torch():
    import torch
    return torch


_WARN_LOCK = threading.Lock()


def tensor_over(raw, st_dtype: str):
    """A flat CPU tensor over a read-only buffer (a mapped file), no copy; never written. torch warns
    about read-only buffers: the warning is silenced under a lock, since warnings.catch_warnings is
    not thread-safe and the --jobs workers create these side by side."""
    torch = _torch()
    with _WARN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(raw, dtype=getattr(torch, ST_TORCH_DTYPES[st_dtype]))


def read_tensor(shard, entry):
    """A CPU torch tensor over one safetensors entry (copied; callers hold one tensor at a time)."""
    torch = _torch()
    dt = ST_TORCH_DTYPES.get(entry.dtype)
    if dt is None:
        raise ValueError(f"dtype {entry.dtype} is not readable as a torch tensor")
    raw = shard.view(entry)
    if not len(raw):
        return torch.empty(entry.shape, dtype=getattr(torch, dt))
    return tensor_over(raw, entry.dtype).reshape(entry.shape).clone()  # the copy: callers may write it


def _clean_header(h) -> bool:
    """Offsets are trustworthy (a bad __metadata__ alone does not matter for reading data)."""
    from ..checkpoint import safetensors as st
    return not [p for p in h.problems if p.kind != st.METADATA]


def leaked_tensors(ckpt):
    """(file, tensor_name, match) for every quantizer buffer stored in the shards the loaders read (a
    shard the index does not name is stale, IDX008: its amax belong to an earlier export)."""
    named = _indexed(ckpt)
    for fname, h in ckpt.headers().items():
        if named is not None and fname not in named:
            continue
        for t in h.names:
            m = LEAK_RE.match(t)
            if m and "quantizer" in m.group("attr"):
                yield fname, t, m


def _indexed(ckpt) -> set | None:
    """The shard files a readable index names, or None when there is no usable index."""
    idx = ckpt.index
    wm = idx.data.get("weight_map") if idx is not None and not idx.error and isinstance(idx.data, dict) else None
    return {f for f in wm.values() if isinstance(f, str)} if isinstance(wm, dict) else None


def _normalize_cfg(quant_cfg) -> list:
    out = []
    if isinstance(quant_cfg, dict):  # older releases: {glob: attrs | {"enable": False}}
        for glob, cfg in quant_cfg.items():
            if isinstance(cfg, dict) and isinstance(glob, str):
                out.append((glob, None, cfg.get("enable"), cfg))
    elif isinstance(quant_cfg, (list, tuple)):
        for e in quant_cfg:
            if isinstance(e, dict) and isinstance(e.get("quantizer_name"), str):
                cfg = e.get("cfg")
                if isinstance(cfg, (list, tuple)):
                    cfg = [c for c in cfg if isinstance(c, dict)] or None
                out.append((e["quantizer_name"], e.get("parent_class"), e.get("enable"),
                            cfg if isinstance(cfg, (dict, list)) else None))
    return out


def _pickle_scan_refuses(ckpt, name: str) -> str | None:
    """Ask the PKL001 scanner about the file (its scan is shared with the PKL rule: one per run)."""
    from ..checkpoint.pickle_scan import scan_cached
    try:
        res = scan_cached(ckpt, name)
    except Exception as e:  # noqa: BLE001 - an unreadable pickle is a finding, not a crash
        return f"pickle scan failed: {e}"
    bad = res.problems
    if bad:
        first = bad[0]
        return f"pickle scan refused it: {getattr(first, 'message', first)}"
    return None


def load_state_file(ckpt, state: QuantState) -> None:
    if STATE_NAME not in ckpt.names:
        return
    path = ckpt.path(STATE_NAME)
    why = _pickle_scan_refuses(ckpt, STATE_NAME)
    if why:
        state.problems.append((STATE_NAME, None, f"{STATE_NAME} not loaded: {why}"))
        return
    torch = _torch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is QNT003
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        state.problems.append((STATE_NAME, None, f"{STATE_NAME} does not load with torch.load(weights_only=True): {msg}"))
        return
    if not isinstance(data, dict):
        state.problems.append((STATE_NAME, None, f"{STATE_NAME} holds a {type(data).__name__}, not a modelopt state dict"))
        return
    state.state_loaded = True
    modes = data.get("modelopt_state_dict")
    for item in modes if isinstance(modes, (list, tuple)) else []:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict)):
            continue
        mode, mstate = item
        cfg = mstate.get("config") if isinstance(mstate.get("config"), dict) else {}
        if mode == "quantize" and "quant_cfg" in cfg:
            state.quant_cfg = _normalize_cfg(cfg["quant_cfg"])
        md = mstate.get("metadata") if isinstance(mstate.get("metadata"), dict) else {}
        qs = md.get("quantizer_state")
        for qname, attrs in (qs.items() if isinstance(qs, dict) else ()):
            if isinstance(qname, str) and isinstance(attrs, dict):
                state.quantizer(qname).attrs.update({k: v for k, v in attrs.items() if k.startswith("_")})
    weights = data.get("modelopt_state_weights")
    for qname, bufs in (weights.items() if isinstance(weights, dict) else ()):
        if not (isinstance(qname, str) and isinstance(bufs, dict)):
            continue
        q = state.quantizer(qname)
        if isinstance(bufs.get("_amax"), torch.Tensor):
            q.amax, q.amax_where = bufs["_amax"], STATE_NAME
        if isinstance(bufs.get("_pre_quant_scale"), torch.Tensor):
            q.pre_quant_scale = bufs["_pre_quant_scale"]


def load_state(ckpt) -> QuantState:
    """Everything known about quantizers: the state file, then leaked buffers (which win: they are
    what was live in the model when its weights were saved). Loaded once per Checkpoint (QNT002,
    QNT003 and the fix's evidence all ask); callers only read it."""
    return ckpt.once("quant.state", lambda: _load_state(ckpt))


def _load_state(ckpt) -> QuantState:
    from ..checkpoint.data import ShardData
    state = QuantState()
    load_state_file(ckpt, state)
    by_file: dict = {}
    for fname, t, m in leaked_tensors(ckpt):
        by_file.setdefault(fname, []).append((t, m))
    for fname, items in by_file.items():
        h = ckpt.header(fname)
        if not _clean_header(h):
            continue  # SFT rules report it; offsets cannot be trusted
        with ShardData(h) as sd:
            for t, m in items:
                buf = m.group("buf")
                if buf not in ("_amax", "_pre_quant_scale", "_global_amax"):
                    continue
                try:
                    val = read_tensor(sd, h.tensors[t])
                except ValueError as e:
                    state.problems.append((fname, t, f"{t}: {e}"))
                    continue
                q = state.quantizer(m.group("q"))
                if buf == "_amax":
                    q.amax, q.amax_where = val, fname
                elif buf == "_pre_quant_scale":
                    q.pre_quant_scale = val
    return state


def weight_spec(state: QuantState, q: Quantizer, weight_shape) -> tuple[object, str | None]:
    """(QuantSpec, None) for an enabled weight quantizer with a usable amax, else (None, why not)."""
    enabled, attrs = state.config_for(q.name)
    if enabled is False:
        return None, "its quantizer is disabled in the quant config"
    return spec_from_attrs(attrs if isinstance(attrs, dict) else {}, q, weight_shape)


def spec_from_attrs(attrs: dict, q: Quantizer, weight_shape) -> tuple[object, str | None]:
    """(QuantSpec, None) from quant_cfg attributes overlaid by the quantizer's own saved state."""
    from .formats import QuantSpec
    torch = _torch()
    a = dict(attrs)
    a.update({k[1:]: v for k, v in q.attrs.items() if k in ("_num_bits", "_axis", "_block_sizes",
                                                             "_unsigned", "_narrow_range")})
    num_bits = a.get("num_bits")
    if num_bits is None:
        return None, FORMAT_UNKNOWN
    if isinstance(num_bits, list):
        num_bits = tuple(num_bits)
    bs = a.get("block_sizes")
    bs = dict(bs) if isinstance(bs, dict) else None
    if bs is not None and all(v is None for k, v in bs.items() if isinstance(k, int)):
        bs = None  # per-channel written as block_sizes {dim: None}
    unsigned, narrow = bool(a.get("unsigned", False)), bool(a.get("narrow_range", False))
    if a.get("backend") or a.get("rotate") not in (None, False) or a.get("bias"):
        return None, "quantizer uses a backend/rotation/bias fqcheck does not model"
    if bs is not None and bs.get("type") == "dynamic" and tuple(bs.get("scale_bits") or ()) == (8, 0):
        fmt = {(4, 3): "mxfp8", (2, 1): "mxfp4"}.get(num_bits)
        block = bs.get(-1) or bs.get(len(weight_shape) - 1)
        if fmt is None or block not in (8, 16, 32):  # the block sizes modelopt's MX kernel takes
            return None, f"MX format num_bits={num_bits} block {block} not supported"
        return QuantSpec(fmt, None, block_size=int(block)), None  # MX scales come from the weight alone
    if q.amax is None or not isinstance(q.amax, torch.Tensor) or q.amax.is_meta:
        return None, "no amax"
    amax = q.amax.detach().to(torch.float32)
    if amax.numel() == 0 or not bool(torch.isfinite(amax).all()) or bool((amax < 0).any()):
        return None, "invalid amax (QNT003)"
    if bs is not None:
        block = bs.get(-1) or bs.get(len(weight_shape) - 1)
        other = [k for k, v in bs.items() if isinstance(k, int) and v and v != block]
        if not block or other:
            return None, f"block_sizes {bs} not supported"
        if bs.get("type") == "dynamic":
            if num_bits == (2, 1) and tuple(bs.get("scale_bits") or ()) == (4, 3):
                return QuantSpec("nvfp4", amax, block_size=int(block)), None
            return None, f"dynamic block format num_bits={num_bits} scale_bits={bs.get('scale_bits')} not supported"
        if isinstance(num_bits, int):
            return QuantSpec("int", amax, num_bits, unsigned, narrow, int(block)), None
        return None, f"static block format num_bits={num_bits} not supported"
    if num_bits == (4, 3):
        return QuantSpec("fp8", amax), None
    if isinstance(num_bits, int):
        return QuantSpec("int", amax, num_bits, unsigned, narrow), None
    return None, f"num_bits={num_bits} not supported"


def deep_state_problems(ckpt):
    """QNT003's deep half, as data: (message, file, tensor) for an unloadable state file, an amax
    that is non-finite, <= 0 or meta, and quantizers naming modules absent from the weights."""
    from ..deep import tie_word_embeddings
    torch = _torch()
    state = load_state(ckpt)
    for fname, tensor, msg in state.problems:
        yield (msg, fname, tensor)
    modules = set()  # every dotted prefix of a tensor name: attention bmm quantizers sit on parents
    for n in ckpt.tensor_files:
        parts = n.split(".")
        modules.update(".".join(parts[:i]) for i in range(1, len(parts)))
    for name in sorted(state.quantizers):
        q = state.quantizers[name]
        where = q.amax_where or STATE_NAME
        tensor = f"{name}._amax" if where != STATE_NAME else None
        if q.amax is not None and isinstance(q.amax, torch.Tensor):
            if q.amax.is_meta:
                yield (f"{name}._amax is a meta tensor (no data)", where, tensor)
            elif q.amax.numel():
                a = q.amax.detach().to(torch.float32)
                bad = int((~torch.isfinite(a)).sum())
                if bad:
                    yield (f"{name}._amax has {bad} non-finite value(s) of {a.numel()}", where, tensor)
                nonpos = int((a <= 0).sum())
                if nonpos:
                    yield (f"{name}._amax has {nonpos} value(s) <= 0 of {a.numel()} (min {float(a.min()):g})",
                           where, tensor)
        # A disabled quantizer with no tensors (lm_head's in every default config) carries nothing
        # to load; a tied lm_head stores no weight of its own.
        live = q.amax is not None or q.pre_quant_scale is not None or not q.attrs.get("_disabled", False)
        tied = q.module == "lm_head" and tie_word_embeddings(ckpt)
        if state.state_loaded and q.module and q.module not in modules and live and not tied and \
                (q.amax_where == STATE_NAME or q.attrs):
            yield (f"{STATE_NAME} names quantizer {name} of module {q.module}, which has no tensors in the weights",
                   STATE_NAME, None)

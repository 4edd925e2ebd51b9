"""ARC: the checkpoint's tensors against the model that config.json declares.

The model is built on the meta device with transformers (no weights read, no download, never
remote code), then its state-dict keys and shapes are compared with the safetensors headers the way
transformers 5's `from_pretrained` matches them: tied weights may be stored once, non-persistent
buffers are not expected, `_keys_to_ignore_on_load_*` patterns are honoured, and checkpoint keys go
through the same renamings / expert-merging conversions transformers applies on load (both the
original per-expert layout and the fused one load). torch and transformers are imported inside the
functions below only: this module is imported on every lint.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

from ..checkpoint import CONFIG_NAME, Checkpoint
from ..engine import Context, Hit, check
from ..options import Options
from ..fixer.edits import DropTensor

# Real-quantized exports store, next to (or instead of) a module's `weight`, tensors the float model
# does not have. quant_method (config.json quantization_config, or "modelopt" when
# hf_quant_config.json is present) -> (tensor names a quantized module may add, whether the
# module's stored weight may be packed to another shape or stored under one of those names).
QUANT_LAYOUTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "fp8": (("weight_scale", "weight_scale_inv", "input_scale", "output_scale", "k_scale", "v_scale"), False),
    "fbgemm-fp8": (("weight_scale", "input_scale_ub"), False),
    "modelopt": (("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "k_scale",
                  "v_scale", "output_scale"), True),  # NVFP4 / INT4-AWQ pack two values a byte
    "compressed-tensors": (("weight_scale", "weight_zero_point", "weight_g_idx", "weight_packed",
                            "weight_shape", "weight_global_scale", "input_scale", "input_zero_point",
                            "input_global_scale", "output_scale", "k_scale", "v_scale"), True),
    "gptq": (("qweight", "qzeros", "scales", "g_idx"), True),
    "awq": (("qweight", "qzeros", "scales"), True),
    "bitsandbytes": (("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state",
                      "SCB", "weight_format"), True),
}
UNKNOWN_QUANT: tuple[tuple[str, ...], bool] = ((), True)  # a method we do not know: no ARC003 on weights

# QNT001 reports leaked quantizer state (`*_quantizer._amax`, ...); ARC001 leaves those names to it.
_QUANTIZER_RE = re.compile(r"_quantizers?(\.\d+)*\.")


def is_quantizer_state(name: str) -> bool:
    return bool(_QUANTIZER_RE.search(name) or _leak_re().match(name))


@functools.cache
def _leak_re() -> re.Pattern:
    from ..quant import state  # imported when ARC runs, not on the header-only path
    return state.LEAK_RE


@dataclass
class Comparison:
    not_checkable: str | None = None
    unexpected: list[tuple[str, str]] = field(default_factory=list)        # (file, tensor)
    missing: list[tuple[str, tuple]] = field(default_factory=list)         # (tensor, expected shape)
    mismatched: list[tuple[str, str, tuple, tuple]] = field(default_factory=list)  # file, tensor, expected, found
    model_class: str = ""


def compare(ckpt: Checkpoint) -> Comparison:
    """Build the model once per Checkpoint and compare; the three ARC checks share the result."""
    def make() -> Comparison:
        try:
            return _compare(ckpt)
        except _NotCheckable as e:
            return Comparison(not_checkable=str(e))
    return ckpt.once("arc.comparison", make)


class _NotCheckable(Exception):
    pass


def _config(ckpt: Checkpoint) -> dict:
    cfg = ckpt.config
    if cfg is None:
        raise _NotCheckable("no config.json")
    if not isinstance(cfg.data, dict):
        raise _NotCheckable(f"config.json unusable ({cfg.error or 'not a JSON object'})")
    return cfg.data


def quant_layout(ckpt: Checkpoint, cfg: dict) -> tuple[tuple[str, ...], bool] | None:
    qc = cfg.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method is None and "hf_quant_config.json" in ckpt.names:
        method = "modelopt"
    if method is None:
        return None
    return QUANT_LAYOUTS.get(str(method).lower().replace("_", "-"), UNKNOWN_QUANT)


def build_meta_model(cfg: dict):
    """The model config.json declares, on the meta device, from transformers' own classes only."""
    try:
        import torch
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError as e:
        raise _NotCheckable(f"needs torch and transformers ({e})") from None
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        why = " (its architecture is remote code named by auto_map)" if "auto_map" in cfg else ""
        raise _NotCheckable(f"model_type {model_type!r} is not built into transformers "
                            f"{transformers.__version__}{why}; remote code is never run")
    # The float architecture: quantized layers are checked against QUANT_LAYOUTS instead.
    clean = {k: v for k, v in cfg.items() if k not in ("auto_map", "quantization_config")}
    try:
        config = CONFIG_MAPPING[model_type].from_dict(clean)
    except Exception as e:  # noqa: BLE001 - a config transformers rejects is not checkable
        raise _NotCheckable(f"transformers rejects config.json: {_one_line(e)}") from None
    cls = _model_class(cfg, config)
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # building never downloads; make sure of it
    try:
        with torch.device("meta"):
            return cls._from_config(config) if hasattr(cls, "_from_config") else cls.from_config(config)
    except Exception as e:  # noqa: BLE001
        raise _NotCheckable(f"transformers cannot build {getattr(cls, '__name__', cls)}: {_one_line(e)}") from None
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _model_class(cfg: dict, config):
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
    for name in cfg.get("architectures") or []:
        cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel) and isinstance(config, cls.config_class):
            return cls
    for auto in (AutoModelForCausalLM, AutoModel):
        cls = auto._model_mapping.get(type(config), None)
        if cls is not None:
            return cls
    raise _NotCheckable(f"transformers has no model class for {type(config).__name__}")


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0][:200] if s else ''}"


def _conversions(model):
    """(renamings, converters) transformers applies to checkpoint keys on load, and the expected
    checkpoint layout (what save_pretrained writes: conversions reverted) as {key: shape}."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], [], None
    try:
        mapping = get_model_conversion_mapping(model) or []
    except Exception:  # noqa: BLE001
        mapping = []
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    return renamings, converters, mapping


def _saved_layout(model, state: dict) -> dict:
    try:
        from transformers.core_model_loading import revert_weight_conversion
        return {k: tuple(v.shape) for k, v in revert_weight_conversion(model, dict(state)).items()}
    except Exception:  # noqa: BLE001 - no reverse for this model: the model's own keys
        return {k: tuple(v.shape) for k, v in state.items()}


# A config is untrusted too: the meta build costs memory and time per module, so the counts that
# multiply modules may not exceed what the checkpoint stores by more than this (or an MTP layer).
MAX_EXTRA_LAYERS = 16
MAX_EXPERTS_UNBACKED = 1024
_INDEXED = re.compile(r"(?:^|\.)(layers|h|blocks|experts)\.(\d+)\.")


def check_build_cost(cfg: dict, stored) -> None:
    """Refuse to build a model whose layer or expert count the stored tensors do not back (a 200-byte
    config.json declaring 250000 layers made transformers allocate 11.7 GB): the header half then
    reports the layers that are missing."""
    top = {"layers": -1, "experts": -1}
    for name in stored:
        for kind, idx in _INDEXED.findall(name):
            kind = "experts" if kind == "experts" else "layers"
            if int(idx) > top[kind]:
                top[kind] = int(idx)
    layers = cfg.get("num_hidden_layers")
    if isinstance(layers, int) and layers > 2 * (top["layers"] + 1) + MAX_EXTRA_LAYERS:
        raise _NotCheckable(f"config.json declares num_hidden_layers={layers} and the checkpoint stores "
                            f"{top['layers'] + 1} layers: the model is not built (its cost grows with the layers)")
    from .arc_layers import EXPERT_KEYS
    for key in EXPERT_KEYS:
        n = cfg.get(key)
        if isinstance(n, int) and n > max(MAX_EXPERTS_UNBACKED, 2 * (top["experts"] + 1)):
            raise _NotCheckable(f"config.json declares {key}={n} and the checkpoint stores "
                                f"{top['experts'] + 1} experts a layer: the model is not built")


def _compare(ckpt: Checkpoint) -> Comparison:
    cfg = _config(ckpt)
    stored_all = stored_tensors(ckpt)
    check_build_cost(cfg, stored_all)
    model = build_meta_model(cfg)
    out = Comparison(model_class=type(model).__name__)

    state = model.state_dict()  # parameters and persistent buffers only
    for k in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(k, None)
    model_shapes = {k: tuple(v.shape) for k, v in state.items()}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source
    saved = _saved_layout(model, {k: v for k, v in state.items() if k not in tied})
    renamings, converters, _ = _conversions(model)
    modules = {n for n, _ in model.named_modules()}

    ign_missing = _regex(getattr(model, "_keys_to_ignore_on_load_missing", None))
    unexpected_patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):  # transformers adds these two itself
        unexpected_patterns.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        unexpected_patterns.add(r"(^|\.)position_ids$")
    ign_unexpected = _regex(unexpected_patterns)

    extra_names, packed = quant_layout(ckpt, cfg) or ((), False)
    prefix = getattr(model, "base_model_prefix", "") or None

    def to_model_key(key: str) -> tuple[str, bool]:
        """The model key a checkpoint key loads into, and whether a converter (merge) produces it."""
        try:
            from transformers.core_model_loading import rename_source_key
            new, pattern = rename_source_key(key, renamings, converters, prefix, model_shapes)
            if new not in model_shapes and key in model_shapes:
                return key, False
            return new, pattern is not None
        except Exception:  # noqa: BLE001
            return key, False

    stored: set[str] = set()  # checkpoint keys in the saved layout
    direct: set[str] = set()  # model keys the checkpoint stores as such (no merge needed)
    for tensor, (fname, found) in sorted(stored_all.items()):
        if is_quantizer_state(tensor):
            continue  # QNT001's
        if tensor in saved or tensor in model_shapes:  # the common case: no renaming to look up
            expected = saved[tensor] if tensor in saved else model_shapes[tensor]
            stored.add(tensor)
            if tensor in model_shapes:
                direct.add(tensor)
            if found != expected and not _may_differ(tensor, packed):
                out.mismatched.append((fname, tensor, expected, found))
            continue
        owner, _, leaf = tensor.rpartition(".")
        if leaf in extra_names and (f"{owner}.weight" in saved or _is_module(owner, modules, prefix)):
            if packed:  # e.g. GPTQ qweight / compressed-tensors weight_packed stand in for weight
                stored.add(f"{owner}.weight")
                direct.add(f"{owner}.weight")
            continue
        key, converted = to_model_key(tensor)  # legacy names, base-model prefix, fused experts
        if key in model_shapes and not converted:  # a renamed key (or the fused layout)
            direct.add(key)
            if found != model_shapes[key] and not _may_differ(tensor, packed):
                out.mismatched.append((fname, tensor, model_shapes[key], found))
            continue
        # A merged key outside the saved layout (an expert index beyond the config's) is unexpected.
        if ign_unexpected and (ign_unexpected.search(tensor) or ign_unexpected.search(key)):
            continue
        out.unexpected.append((fname, tensor))

    # Tied weights load from whichever of the pair is stored (transformers ties symmetrically).
    stand_ins = {source for target, source in tied.items() if target in direct}
    for key, shape in saved.items():
        if key in stored or key in stand_ins:
            continue
        mkey = to_model_key(key)[0]
        if mkey in direct or (ign_missing and (ign_missing.search(key) or ign_missing.search(mkey))):
            continue
        out.missing.append((key, shape))
    return out


def stored_tensors(ckpt: Checkpoint) -> dict[str, tuple[str, tuple]]:
    """{tensor: (file, shape)}: the safetensors headers', or, for a checkpoint of torch.save'd state
    dicts (pytorch_model*.bin) and no safetensors, the state dicts' own, read by
    torch.load(weights_only=True, mmap=True, map_location="meta"): shapes only, no data read."""
    if ckpt.safetensors_names:
        return {t: (files[0], tuple(ckpt.headers()[files[0]].tensors[t].shape))
                for t, files in ckpt.tensor_files.items()}
    bins = [n for n in ckpt.pickle_names if n.startswith("pytorch_model") and n.endswith(".bin")]
    if not bins:
        return {}
    import torch

    from ..checkpoint.pickle_scan import scan_cached
    out: dict[str, tuple[str, tuple]] = {}
    for name in bins:
        refusal = scan_cached(ckpt, name).weights_only_refusal()
        if refusal:
            raise _NotCheckable(f"{name} does not load with weights_only=True ({refusal})")
        try:
            state = torch.load(ckpt.path(name), weights_only=True, mmap=True, map_location="meta")
        except Exception as e:  # noqa: BLE001 - e.g. the legacy (non-zip) format, which mmap cannot map
            raise _NotCheckable(f"{name}: {_one_line(e)}") from None
        if not isinstance(state, dict):
            raise _NotCheckable(f"{name} holds a {type(state).__name__}, not a state dict")
        for k, v in state.items():
            if isinstance(k, str) and isinstance(v, torch.Tensor):
                out.setdefault(k, (name, tuple(v.shape)))
    return out


def _may_differ(tensor: str, packed: bool) -> bool:
    return packed and tensor.endswith(".weight")


def _is_module(name: str, modules: set[str], prefix: str | None) -> bool:
    if name in modules:
        return True
    return bool(prefix) and (f"{prefix}.{name}" in modules or name.removeprefix(f"{prefix}.") in modules)


def _regex(patterns) -> re.Pattern | None:
    patterns = [p for p in (patterns or ()) if isinstance(p, str)]
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def _shape(s: tuple) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def _meta(options: Options) -> bool:
    """Build the model on the meta device (--arch, or --deep which includes it)?"""
    return options.arch or options.deep


def _header_half(ckpt: Checkpoint):
    """The header-only comparison (fqcheck.checks.arc_layers); every lint runs it."""
    from .arc_layers import analyse
    cfg = ckpt.config.data if ckpt.config is not None and isinstance(ckpt.config.data, dict) else None
    layout = quant_layout(ckpt, cfg) if cfg is not None else None
    return analyse(ckpt, cfg, packed=bool(layout and layout[1]), quantized=layout is not None)


def header_findings(ckpt: Checkpoint):
    """Computed once per Checkpoint; the three ARC checks share it."""
    return ckpt.once("arc.header", lambda: _header_half(ckpt))


def _in_file(ckpt: Checkpoint, tensor: str) -> str | None:
    hit = ckpt.tensor(tensor)
    return hit[0] if hit else None


@check("ARC001")
def unexpected_tensors(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    c = compare(ckpt) if _meta(ctx.options) else None
    if c is None or c.not_checkable:
        if c is not None:
            yield Hit(f"architecture not checkable: {c.not_checkable}; the header-only comparison of the "
                      "layers ran instead", file=CONFIG_NAME, severity="info", fixable="no")
        for tensor, why, fixable in header_findings(ckpt).unexpected:
            fname = _in_file(ckpt, tensor)
            yield Hit(f"{tensor} is unexpected: {why}. {UNEXPECTED_EFFECT}", file=fname, tensor=tensor,
                      fixable=fixable, fix=DropTensor(fname, tensor) if fname else None)
        return
    for fname, tensor in c.unexpected:
        yield Hit(f"{tensor} is not a tensor of {c.model_class}. {UNEXPECTED_EFFECT}",
                  file=fname, tensor=tensor, fix=DropTensor(fname, tensor) if fname else None,
                  fixable=None if fname else "no")


def _in_missing_shard(ckpt: Checkpoint, tensor: str) -> bool:
    """The index maps the tensor to a shard that is not there: IDX003 reports that."""
    idx = ckpt.index
    wm = idx.data.get("weight_map") if idx is not None and isinstance(idx.data, dict) else None
    f = wm.get(tensor) if isinstance(wm, dict) else None
    return isinstance(f, str) and f not in ckpt.names


@check("ARC002")
def missing_tensors(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    c = compare(ckpt) if _meta(ctx.options) else None
    if c is None or c.not_checkable:
        for tensor, why in header_findings(ckpt).missing:
            if not _in_missing_shard(ckpt, tensor):
                yield Hit(f"{tensor} is missing: {why}. {MISSING_EFFECT}", file=CONFIG_NAME, tensor=tensor)
        return
    for tensor, shape in c.missing:
        if _in_missing_shard(ckpt, tensor):
            continue
        yield Hit(f"{tensor} (expected shape {_shape(shape)}) is missing: {c.model_class} needs it. "
                  f"{MISSING_EFFECT}", file=CONFIG_NAME, tensor=tensor)


@check("ARC003")
def mismatched_shapes(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    c = compare(ckpt) if _meta(ctx.options) else None
    if c is None or c.not_checkable:
        for tensor, found, expected, why in header_findings(ckpt).mismatched:
            yield Hit(f"{tensor} has shape {_shape(found)}, expected {_shape(expected)}: {why}. {SHAPE_EFFECT}",
                      file=_in_file(ckpt, tensor), tensor=tensor)
        return
    for fname, tensor, expected, found in c.mismatched:
        yield Hit(f"{tensor} has shape {_shape(found)}, {c.model_class} expects {_shape(expected)}. "
                  f"{SHAPE_EFFECT}", file=fname, tensor=tensor)


# What loaders do, measured with vLLM 0.32.0 (CPU build) and transformers 5: see conformance/.
UNEXPECTED_EFFECT = ("vLLM 0.32 refuses to load (ValueError: There is no module or parameter named ...); "
                     "transformers 5 drops it as an unexpected key")
MISSING_EFFECT = ("vLLM 0.32 loads without it, silently, and serves garbage; transformers 5 initialises it "
                  "randomly (missing key)")
SHAPE_EFFECT = ("vLLM 0.32's weight loader fails (e.g. RuntimeError: start (0) + length (N) exceeds "
                "dimension size (M)); transformers 5 reports a size mismatch")

"""The quantization config vLLM 0.33 will use, resolved as its loader resolves it, and what it refuses.

Sources (vLLM 0.33.0 unless noted; reference/serve-conformance.md §1.1, §2): weight_utils.py
get_quant_config (config.json wins over hf_quant_config.json / quantize_config.json),
modelopt.py ModelOptQuantConfigBase.from_config and ModelOptNvFp4Config._from_config, fp8.py
Fp8Config, compressed_tensors.py CompressedTensorsConfig, auto_gptq.py, auto_awq.py."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..checkpoint import Checkpoint

MODELOPT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8",
                  "MIXED_PRECISION")  # modelopt.py QUANT_ALGOS
MODELOPT_MODELLED = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4")
CT_FORMATS = ("dense", "int-quantized", "float-quantized", "naive-quantized", "pack-quantized",
              "nvfp4-pack-quantized", "mxfp4-pack-quantized", "mxfp8-quantized", "mixed-precision",
              "marlin-24", "sparse-bitmask", "sparse-24-bitmask")  # compressed_tensors config/base.py


@dataclass(frozen=True)
class Layout:
    """The tensor contract of one quantized linear (formats.py reads it)."""
    kind: str            # fp8 fp8_pcpt fp8_pbwo nvfp4 w4a16_nvfp4 fp8_block ct_float ct_int ct_pack ct_nvfp4 gptq awq
    label: str           # e.g. "ModelOpt NVFP4", used in messages
    static_input: bool = False   # an input scale is a loaded parameter
    act: bool = False            # activations quantized at all (static or dynamic)
    group: int = 0               # group size (NVFP4, pack-quantized, GPTQ/AWQ); -1 = per channel
    block: tuple = (128, 128)    # block FP8 [bn, bk]
    bits: int = 8
    sym: bool = True
    input_sym: bool = True
    strategy: str = "tensor"     # compressed-tensors weight strategy


@dataclass
class Resolved:
    family: str                      # modelopt, fp8, compressed-tensors, gptq, awq
    source: str                      # the file vLLM reads the config from
    raw: dict
    layout: Layout | None = None     # the one layout of single-scheme formats
    groups: list = field(default_factory=list)   # compressed-tensors: [(targets, Layout)]
    exclude: list = field(default_factory=list)  # the exclusion list as written
    kv: str | None = None            # "modelopt" / "compressed-tensors" when KV scales are declared
    problems: list = field(default_factory=list)  # SRV001 messages
    usable: bool = True              # False: vLLM refuses the config, the tensor rules have nothing to hold to
    extra: dict = field(default_factory=dict)


def _side_file(ckpt: Checkpoint, name: str):
    f = ckpt._json(name)  # parsed once per run, shared with the QNT format resolver
    return f.data if f is not None and f.error is None and isinstance(f.data, dict) else None


def effective_config(ckpt: Checkpoint) -> tuple[dict, str] | None:
    """(quantization config, file) as vLLM's get_quant_config picks it, or None (not quantized)."""
    cfg = ckpt.config.data if ckpt.config is not None and ckpt.config.error is None else None
    if isinstance(cfg, dict):
        for holder in (cfg, cfg.get("text_config")):
            if isinstance(holder, dict):
                for key in ("quantization_config", "compression_config"):
                    qc = holder.get(key)
                    if isinstance(qc, dict):
                        return qc, "config.json"
    hq = _side_file(ckpt, "hf_quant_config.json")
    if hq is not None:
        return {"quant_method": "modelopt", **hq}, "hf_quant_config.json"
    qc = _side_file(ckpt, "quantize_config.json")
    if qc is not None and "quant_method" in qc:
        return qc, "quantize_config.json"
    return None


def resolve(ckpt: Checkpoint) -> Resolved | None:
    found = effective_config(ckpt)
    if found is None:
        return None
    qc, source = found
    method = str(qc.get("quant_method", "")).lower()
    if method.startswith("modelopt"):
        hq = _side_file(ckpt, "hf_quant_config.json") if source == "config.json" else None
        if hq is not None and "quantized_layers" not in qc and str(_modelopt_fields(qc)[0]).upper() == "MIXED_PRECISION":
            qc, source = {"quant_method": "modelopt", **hq}, "hf_quant_config.json"  # weight_utils.py falls through
        r = _modelopt(qc, source)
        if source == "config.json":
            _modelopt_disagreement(r, _side_file(ckpt, "hf_quant_config.json"))
        return r
    if method == "fp8":
        return _fp8(qc, source)
    if method == "compressed-tensors":
        return _ct(qc, source)
    if method == "gptq":
        return _gptq(qc, source)
    if method == "awq":
        return _awq(qc, source)
    return None  # another method: its contract is not modelled here


def _refuse(r: Resolved, message: str) -> Resolved:
    r.problems.append(message)
    r.usable = False
    return r


# --- ModelOpt (modelopt.py from_config; reference §2.1, §2.2) ---

def _modelopt_fields(qc: dict) -> tuple[object, object, object, object, bool]:
    """(quant_algo, kv algo, exclude list, group_size, nested) from either spelling."""
    if "quantization" in qc:
        q = qc["quantization"] if isinstance(qc["quantization"], dict) else {}
        return q.get("quant_algo"), q.get("kv_cache_quant_algo"), q.get("exclude_modules", []), \
            q.get("group_size"), True
    kv = qc.get("kv_cache_scheme")
    kv_algo = "FP8" if isinstance(kv, dict) and kv.get("type") == "float" and kv.get("num_bits") == 8 else None
    return qc.get("quant_algo"), kv_algo, qc.get("ignore", qc.get("exclude_modules", [])), qc.get("group_size"), False


def _modelopt(qc: dict, source: str) -> Resolved:
    r = Resolved("modelopt", source, qc)
    if "quantization" in qc and not isinstance(qc["quantization"], dict):
        return _refuse(r, "ModelOpt config: 'quantization' is not an object; vLLM 0.33 raises "
                          "ValueError: Expected 'quantization' to be a dictionary in config")
    algo, kv, exclude, group, nested = _modelopt_fields(qc)
    if not algo:
        return _refuse(r, f"ModelOpt config ({source}) has no quant_algo; vLLM 0.33 raises "
                          "ValueError: Missing 'quant_algo' in quantization config")
    algo = str(algo).upper()
    if algo not in MODELOPT_ALGOS:
        return _refuse(r, f"ModelOpt quant_algo {algo!r} ({source}) is not servable by vLLM 0.33, which "
                          f"raises ValueError: ModelOpt currently only supports: {list(MODELOPT_ALGOS)}")
    if kv is not None and not isinstance(kv, str):
        return _refuse(r, f"kv_cache_quant_algo is {type(kv).__name__}, not a string; vLLM 0.33 raises ValueError")
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        return _refuse(r, "ModelOpt exclude list is not a list of strings; vLLM 0.33 raises "
                          "ValueError: exclude_modules must be a list")
    r.exclude = exclude
    if "FP4" in algo and nested:
        missing = [k for k in ("group_size", "kv_cache_quant_algo", "exclude_modules") if k not in qc["quantization"]]
        if missing:
            return _refuse(r, f"ModelOpt {algo} hf_quant_config.json lacks {missing}; vLLM 0.33 raises ValueError: "
                              f"NVFP4 quantization requires the following fields in hf_quant_config.json: {missing}")
    try:
        gs = 16 if group is None else int(group)
    except (TypeError, ValueError):
        return _refuse(r, f"ModelOpt group_size {group!r} is not an integer; vLLM 0.33 raises ValueError")
    if "FP4" in algo and (gs <= 0 or gs % 2):
        return _refuse(r, f"ModelOpt {algo} group_size {gs} cannot describe NVFP4 blocks (16 expected)")
    if algo == "MIXED_PRECISION":
        layers = (qc["quantization"] if nested else qc).get("quantized_layers")
        if not layers:  # get_quant_config falls back to hf_quant_config.json for this only when absent
            return _refuse(r, "ModelOpt MIXED_PRECISION without a quantized_layers map; vLLM 0.33 raises ValueError: "
                              "MIXED_PRECISION quant_algo requires a non-empty 'quantized_layers' mapping")
    if algo == "NVFP4" and not nested and _all_activations_null(qc):
        algo = "W4A16_NVFP4"  # modelopt.py: flat NVFP4 with no input_activations is served as W4A16
    if isinstance(kv, str) and kv.upper() in ("FP8", "NVFP4"):
        r.kv = "modelopt"
    if algo not in MODELOPT_MODELLED:
        return r  # MXFP8 / MIXED_PRECISION: valid, tensor contract not modelled here
    r.layout = Layout(
        kind={"FP8": "fp8", "FP8_PER_CHANNEL_PER_TOKEN": "fp8_pcpt", "FP8_PB_WO": "fp8_pbwo",
              "NVFP4": "nvfp4", "W4A16_NVFP4": "w4a16_nvfp4"}[algo],
        label=f"ModelOpt {algo}", static_input=algo in ("FP8", "NVFP4"), act=algo != "W4A16_NVFP4"
        and algo != "FP8_PB_WO", group=gs)
    return r


def _all_activations_null(qc: dict) -> bool:
    groups = qc.get("config_groups")
    return isinstance(groups, dict) and bool(groups) and all(
        isinstance(g, dict) and g.get("input_activations") is None for g in groups.values())


def _modelopt_disagreement(r: Resolved, hq: dict | None) -> None:
    """config.json and hf_quant_config.json both present: vLLM reads config.json only."""
    if hq is None or not r.usable:
        return
    a_algo, a_kv, a_ex, a_gs, _ = _modelopt_fields(r.raw)
    b_algo, b_kv, b_ex, b_gs, _ = _modelopt_fields({"quant_method": "modelopt", **hq})
    diffs = []
    if str(a_algo or "").upper() != str(b_algo or "").upper():
        diffs.append(f"quant_algo {a_algo!r} vs {b_algo!r}")
    if str(a_kv or "").upper() != str(b_kv or "").upper():
        diffs.append(f"KV cache {a_kv!r} vs {b_kv!r}")
    if isinstance(a_ex, list) and isinstance(b_ex, list) and set(map(str, a_ex)) != set(map(str, b_ex)):
        diffs.append(f"exclusion lists differ ({len(a_ex)} vs {len(b_ex)} entries)")
    if a_gs is not None and b_gs is not None and a_gs != b_gs:
        diffs.append(f"group_size {a_gs!r} vs {b_gs!r}")
    if diffs:
        r.problems.append("config.json quantization_config and hf_quant_config.json disagree ("
                          + "; ".join(diffs) + "): vLLM 0.33 uses config.json, other tools may read the other")


# --- fp8 (fp8.py Fp8Config; reference §2.3, §2.4) ---

def _fp8(qc: dict, source: str) -> Resolved:
    r = Resolved("fp8", source, qc)
    scheme = qc.get("activation_scheme")
    if scheme is None:
        return _refuse(r, "fp8 config has no activation_scheme; vLLM 0.33 raises ValueError: Cannot find any of "
                          "['activation_scheme'] in the model's quantization config.")
    if scheme not in ("static", "dynamic"):
        return _refuse(r, f"fp8 activation_scheme {scheme!r} is not static or dynamic; vLLM 0.33 refuses it")
    block = qc.get("weight_block_size")
    exclude = qc.get("ignored_layers", qc.get("modules_to_not_convert")) or []
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        return _refuse(r, "fp8 ignored_layers/modules_to_not_convert is not a list of strings")
    r.exclude = exclude
    if block is not None:
        if (not isinstance(block, list) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            return _refuse(r, f"fp8 weight_block_size {block!r} must be two positive integers; vLLM 0.33 raises "
                              "ValueError")
        if scheme == "static":
            return _refuse(r, "fp8 weight_block_size with activation_scheme static; vLLM 0.33 raises ValueError: "
                              "The block-wise quantization only supports dynamic activation scheme for now")
        r.layout = Layout("fp8_block", f"fp8 block {block[0]}x{block[1]}", block=tuple(block))
    else:
        r.layout = Layout("fp8", f"fp8 per-tensor ({scheme})", static_input=scheme == "static", act=True)
    return r


# --- compressed-tensors (compressed_tensors.py; reference §2.5) ---

def _ct(qc: dict, source: str) -> Resolved:
    r = Resolved("compressed-tensors", source, qc)
    fmt = qc.get("format", "dense")
    if fmt not in CT_FORMATS:
        return _refuse(r, f"compressed-tensors format {fmt!r} is unknown to compressed-tensors and vLLM 0.33")
    sparsity = qc.get("sparsity_config")
    if sparsity:
        return _refuse(r, "compressed-tensors sparsity_config is set; vLLM 0.33 raises DeprecationWarning: "
                          "Sparsity support has been removed")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(e, str) for e in ignore):
        return _refuse(r, "compressed-tensors ignore is not a list of strings")
    r.exclude = ignore
    bad = _bad_regex(e[3:] for e in ignore if e.startswith("re:"))
    if bad:
        return _refuse(r, f"compressed-tensors ignore entry re:{bad} is not a valid regular expression; vLLM 0.33 "
                          "fails on it at start-up")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return _refuse(r, "compressed-tensors config has no config_groups: vLLM 0.33 finds no scheme for any layer")
    for name, g in groups.items():
        if not isinstance(g, dict) or not isinstance(g.get("targets"), list):
            return _refuse(r, f"compressed-tensors config_groups.{name} has no targets list")
        w, a = g.get("weights"), g.get("input_activations")
        if not isinstance(w, dict):
            continue  # activation-only group: no weight contract
        targets = [t for t in g["targets"] if isinstance(t, str)]
        bad = _bad_regex(t[3:] for t in targets if t.startswith("re:"))
        if bad:
            return _refuse(r, f"compressed-tensors config_groups.{name} target re:{bad} is not a valid regular "
                              "expression; vLLM 0.33 fails on it at start-up")
        if targets and all(t.endswith("Attention") for t in targets):
            continue  # compressed_tensors.py drops attention-only groups with a warning
        if str(w.get("actorder")) in ("group", "dynamic"):
            return _refuse(r, f"compressed-tensors config_groups.{name} uses actorder={w.get('actorder')}; vLLM 0.33 "
                              "raises ValueError: Compressed-tensors group/dynamic activation ordering ... is no "
                              "longer supported")
        layout, why = _ct_layout(g.get("format") or fmt, w, a if isinstance(a, dict) else None)
        if why:
            return _refuse(r, f"compressed-tensors config_groups.{name}: {why}")
        if layout is not None:
            r.groups.append((targets, layout))
    kv = qc.get("kv_cache_scheme")
    if isinstance(kv, dict):
        r.kv = "compressed-tensors"
    return r


def _ct_layout(fmt: str, w: dict, a: dict | None) -> tuple[Layout | None, str | None]:
    bits, typ = w.get("num_bits"), w.get("type", "int")
    strategy, gs = w.get("strategy") or "tensor", w.get("group_size")
    sym = w.get("symmetric", True) is not False
    static_in = a is not None and a.get("dynamic") is False
    common = dict(act=a is not None, static_input=static_in, sym=sym, strategy=strategy,
                  input_sym=a is None or a.get("symmetric", True) is not False)
    if fmt == "nvfp4-pack-quantized":
        if (bits, typ, gs) != (4, "float", 16) or strategy != "tensor_group" or not sym:
            return None, ("nvfp4-pack-quantized needs num_bits 4, type float, strategy tensor_group, group_size 16, "
                          "symmetric (vLLM 0.33 compressed_tensors.py)")
        if a is not None and (a.get("num_bits"), a.get("type")) != (4, "float"):
            return None, ("ValueError: For NVFP4 weights, input quantization must also be NVFP4 format, "
                          "None for NVFP4A16")
        return Layout("ct_nvfp4", "compressed-tensors nvfp4-pack-quantized", bits=4, group=16, **common), None
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs <= 0):
        return None, f"group_size {gs!r} is not a positive integer"
    block = w.get("block_structure")
    if strategy == "block" and (not isinstance(block, list) or len(block) != 2
                                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        return None, f"block strategy with block_structure {block!r}: two positive integers expected"
    if strategy == "group" and gs is None:
        return None, "group strategy without group_size"
    if fmt == "pack-quantized":
        if bits not in (2, 4, 8) or typ != "int":
            return None, f"pack-quantized with num_bits {bits!r} type {typ!r} has no vLLM 0.33 scheme"
        if gs is None and strategy != "channel":
            return None, ("ValueError: Pack-quantized format requires group quantization or channelwise "
                          "quantization")
        return Layout("ct_pack", f"compressed-tensors pack-quantized W{bits}A16", bits=bits,
                      group=-1 if strategy == "channel" else int(gs), **common), None
    if fmt in ("float-quantized", "int-quantized", "naive-quantized") and bits == 8:
        kind = "ct_float" if typ == "float" else "ct_int"
        return Layout(kind, f"compressed-tensors {fmt} {typ}8 ({strategy})", bits=8, block=tuple(block or (128, 128)),
                      group=gs or 0, **common), None
    return None, None  # mixed / mx / marlin formats: not modelled


# --- GPTQ / AWQ (auto_gptq.py, auto_awq.py; reference §2.6) ---

def _gptq(qc: dict, source: str) -> Resolved:
    r = Resolved("gptq", source, qc)
    missing = [k for k in ("bits", "group_size", "desc_act", "sym") if k not in qc]
    if missing:
        return _refuse(r, f"GPTQ config lacks {missing}; vLLM 0.33 raises ValueError: Cannot find any of {missing}")
    bits, gs, sym = qc["bits"], qc["group_size"], qc["sym"]
    if (bits, sym) not in ((4, True), (8, True)):
        return _refuse(r, f"GPTQ bits={bits} sym={sym}: vLLM 0.33 raises ValueError: Unsupported quantization config: "
                          f"bits={bits}, sym={sym}")
    if not isinstance(gs, int) or (gs != -1 and gs <= 0):
        return _refuse(r, f"GPTQ group_size {gs!r} is not -1 or a positive integer")
    if qc["desc_act"] and gs != -1:
        return _refuse(r, "GPTQ desc_act=true with group_size != -1: vLLM 0.33 raises ValueError: GPTQ group "
                          "activation ordering (desc_act=True) is no longer supported")
    r.layout = Layout("gptq", f"GPTQ {bits}-bit g{gs}", bits=bits, group=gs)
    blocks = qc.get("modules_in_block_to_quantize")
    if isinstance(blocks, list):
        r.extra["quantize_only"] = [m for m in _flatten(blocks) if isinstance(m, str)]
    dyn = qc.get("dynamic")
    r.extra["dynamic_skip"] = [k[2:] for k in dyn if isinstance(k, str) and k.startswith("-:")] \
        if isinstance(dyn, dict) else []
    bad = _bad_regex(r.extra["dynamic_skip"])
    if bad:
        return _refuse(r, f"GPTQ dynamic rule -:{bad} is not a valid regular expression; vLLM 0.33 fails on it")
    r.extra["lm_head"] = bool(qc.get("lm_head", False))
    return r


def _awq(qc: dict, source: str) -> Resolved:
    r = Resolved("awq", source, qc)
    bits = qc.get("bits", qc.get("w_bit"))
    gs = qc.get("group_size", qc.get("q_group_size"))
    if bits is None or gs is None or "zero_point" not in qc:
        return _refuse(r, "AWQ config lacks bits/w_bit, group_size/q_group_size or zero_point; vLLM 0.33 raises "
                          "ValueError: Cannot find any of ...")
    if bits != 4:
        return _refuse(r, f"AWQ bits={bits}: vLLM 0.33 supports only 4-bit AWQ here and raises ValueError: "
                          f"Unsupported num_bits = {bits}. Supported: 4.")
    if not isinstance(gs, int) or gs <= 0:
        return _refuse(r, f"AWQ group_size {gs!r} is not a positive integer")
    r.layout = Layout("awq", f"AWQ 4-bit g{gs}", bits=4, group=gs, sym=not qc["zero_point"])
    r.extra["lm_head"] = bool(qc.get("lm_head", False))
    skip = qc.get("modules_to_not_convert")
    if isinstance(skip, list):
        r.exclude = [m for m in skip if isinstance(m, str)]
        r.extra["explicit"] = True
    return r


def _bad_regex(patterns) -> str | None:
    """The first pattern Python's re cannot compile (the loaders compile them at start-up)."""
    for p in patterns:
        try:
            re.compile(p)
        except re.error:
            return p
    return None


def _flatten(xs):
    for x in xs:
        if isinstance(x, list):
            yield from _flatten(x)
        else:
            yield x

"""Which modules vLLM 0.33 builds quantized: each config's exclusion/target list matched exactly as
that config's loader matches it (reference/serve-conformance.md §1.8), plus the modules the model
code builds unquantized whatever the list says."""
from __future__ import annotations

import re
from fnmatch import translate
from typing import Callable

from .config import Layout, Resolved

# (layout or None, why it is unquantized) for a module prefix
Decision = tuple[Layout | None, str]
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj", "w1", "w3")
ROUTERS = ("gate", "router")  # `….mlp.gate` (Qwen/DeepSeek MoE), `….router`
VISION = ("vision_tower", "vision_model", "visual", "vit_large_projector")  # modelopt.py hard-coded


def fused_name(module: str) -> str | None:
    """The vLLM fused layer a checkpoint shard loads into (llama.py packed_modules_mapping)."""
    parent, _, last = module.rpartition(".")
    if last in QKV:
        return f"{parent}.qkv_proj"
    if last in ("gate_proj", "up_proj"):
        return f"{parent}.gate_up_proj"
    if last in ("w1", "w3"):
        return f"{parent}.w13"
    return None


def is_embedding(module: str) -> bool:
    last = module.rpartition(".")[2]
    return "embed" in last or last in ("wte", "wpe")


def is_router(module: str) -> bool:
    return module.rpartition(".")[2] in ROUTERS


def decider(r: Resolved) -> Callable[[str], Decision]:
    return {"modelopt": _modelopt, "fp8": _fp8, "compressed-tensors": _ct, "gptq": _gptq, "awq": _awq}[r.family](r)


def _always_unquantized(module: str) -> str | None:
    if is_embedding(module):
        return "vLLM builds embeddings unquantized"
    return None


def _modelopt(r: Resolved) -> Callable[[str], Decision]:
    # modelopt.py is_layer_excluded: (1) exact or fused via is_layer_skipped, (2) legacy substring
    # (also with `language_model.` stripped), (3) fnmatch; `foo*` also means `foo` (apply_vllm_mapper).
    exact = set(r.exclude)
    plain = [e for e in r.exclude]
    wild = [e for e in r.exclude if any(c in e for c in "*?[")]
    for e in list(wild):
        if len(e) >= 2 and e[-1] == "*" and e[-2] != ".":
            wild.append(e[:-1] + ".*")
            plain.append(e[:-1])
    wild_re = re.compile("|".join(f"(?:{translate(w)})" for w in wild)) if wild else None

    def excluded(m: str) -> str | None:
        f = fused_name(m)
        if m in exact or (f is not None and f in exact):
            return f"listed in exclude_modules ({m if m in exact else f})"
        s = m.removeprefix("language_model.")
        for e in plain:
            if e in m or e in s:
                return f"excluded by substring {e!r}"
        if wild_re is not None and wild_re.match(m):
            return "excluded by a wildcard"
        if any(v in m for v in VISION):
            return "vLLM's modelopt config builds vision modules unquantized"
        return None

    def decide(m: str) -> Decision:
        why = _always_unquantized(m) or excluded(m)
        return (None, why) if why else (r.layout, "")
    return decide


def _fp8(r: Resolved) -> Callable[[str], Decision]:
    # fp8.py + quant_utils.is_layer_skipped: exact full prefix, a fused name listed directly also
    # matches; an MoE layer is skipped when an entry containing `experts` contains its prefix.
    # Fp8Config quantizes only LinearBase / experts / attention, so lm_head is unquantized; routers
    # are model-dependent (DeepSeek builds `mlp.gate` with quant_config=None), so not judged.
    exact = set(r.exclude)
    expert_entries = [e for e in r.exclude if "experts" in e]

    def decide(m: str) -> Decision:
        why = _always_unquantized(m)
        if why or m.rpartition(".")[2] == "lm_head" or m == "lm_head":
            return None, why or "vLLM's Fp8Config leaves lm_head unquantized"
        if m in exact or fused_name(m) in exact:
            return None, "listed in ignored_layers/modules_to_not_convert"
        i = m.find(".experts.")
        if i >= 0 and any(m[:i + 8] in e for e in expert_entries):
            return None, "its experts layer is listed in ignored_layers"
        if is_router(m):
            return None, "router: built unquantized by the model (DeepSeek) or listed"
        return r.layout, ""
    return decide


def _ct(r: Resolved) -> Callable[[str], Decision]:
    # compressed_tensors/utils.py: ignore is exact or `re:` with re.match (anchored at the start
    # only); targets are exact / `re:` on the name, else a class name matched case-insensitively
    # as a substring of vLLM's layer class (`Linear` matches every *Linear layer). A linear that no
    # target matches is silently unquantized.
    ign_exact = {e for e in r.exclude if not e.startswith("re:")}
    ign_re = [re.compile(e[3:]) for e in r.exclude if e.startswith("re:")]
    groups = []
    for targets, layout in r.groups:
        names = {t for t in targets if not t.startswith("re:") and "." in t}
        regs = [re.compile(t[3:]) for t in targets if t.startswith("re:")]
        classes = [t for t in targets if not t.startswith("re:") and "." not in t]
        groups.append((names, regs, any("linear" in c.lower() for c in classes), layout))

    def decide(m: str) -> Decision:
        why = _always_unquantized(m)
        if why or m == "lm_head" or m.endswith(".lm_head"):
            return None, why or "vLLM's compressed-tensors config leaves lm_head (not a LinearBase) unquantized"
        if m in ign_exact or any(p.match(m) for p in ign_re):
            return None, "listed in ignore"
        for names, regs, linear, layout in groups:
            if m in names or any(p.match(m) for p in regs) or linear:
                return layout, ""
        return None, "matched by no config_groups target"
    return decide


def _gptq(r: Resolved) -> Callable[[str], Decision]:
    only = r.extra.get("quantize_only")
    skip = [re.compile(p) for p in r.extra.get("dynamic_skip", [])]
    lm_head = r.extra.get("lm_head", False)

    def decide(m: str) -> Decision:
        why = _always_unquantized(m)
        if why:
            return None, why
        if m == "lm_head" or m.endswith(".lm_head"):
            return (r.layout, "") if lm_head else (None, "lm_head is quantized only with lm_head: true")
        if any(p.match(m) for p in skip):
            return None, "excluded by a `-:` dynamic rule"
        if only is not None and not any(o in m for o in only):
            return None, "not in modules_in_block_to_quantize"
        return r.layout, ""
    return decide


def _awq(r: Resolved) -> Callable[[str], Decision]:
    skip = r.exclude

    def decide(m: str) -> Decision:
        why = _always_unquantized(m)
        if why or m == "lm_head" or m.endswith(".lm_head"):
            return None, why or "vLLM's AWQ config leaves lm_head unquantized"
        for s in skip:
            if s in m:
                return None, f"excluded by substring {s!r} of modules_to_not_convert"
        return r.layout, ""
    return decide


def inferred(r: Resolved) -> bool:
    """GPTQ without modules_in_block_to_quantize and AWQ without modules_to_not_convert: vLLM infers
    the quantized set from the header dtypes (auto_gptq.py, auto_awq.py), so it cannot disagree."""
    if r.family == "gptq":
        return r.extra.get("quantize_only") is None
    if r.family == "awq":
        return not r.extra.get("explicit")
    return False

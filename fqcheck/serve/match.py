"""Which modules vLLM 0.33 builds quantized: each config's exclusion/target list matched exactly as
that config's loader matches it (reference/serve-conformance.md §1.8), plus the modules the model
code builds unquantized whatever the list says.

classify() answers for all linears at once: the ones built unquantized (with why), and for
compressed-tensors with several config groups the layout of each other one. It keeps the Python
work per module to a C-level filter or a set operation (a DeepSeek-R1 layout has 45k linears)."""
from __future__ import annotations

import re
from fnmatch import translate
from typing import Callable, Collection

from .config import Layout, Resolved

QKV = ("q_proj", "k_proj", "v_proj")
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "w1": "w13", "w3": "w13"}  # llama.py, mixtral.py
SHARDS = {"qkv_proj": QKV, "gate_up_proj": ("gate_proj", "up_proj"), "w13": ("w1", "w3")}
FUSED_TAILS = tuple(f".{t}" for t in FUSED)
ROUTER_TAILS = (".gate", ".router")   # `….mlp.gate` (Qwen/DeepSeek MoE), `….router`
LM_HEAD_TAILS = (".lm_head",)
# Where models keep lm_head (text models, and VLMs' language_model); looked up, not scanned for.
LM_HEADS = ("lm_head", "language_model.lm_head", "model.language_model.lm_head")
VISION = ("vision_tower", "vision_model", "vit_large_projector")  # vLLM 0.33 modelopt.py get_quant_method

Classified = tuple[dict[str, str], Callable[[str], Layout] | None]


def fused_name(module: str) -> str | None:
    """The vLLM fused layer a checkpoint shard loads into (packed_modules_mapping)."""
    parent, _, last = module.rpartition(".")
    f = FUSED.get(last)
    return f"{parent}.{f}" if f else None


def siblings(module: str) -> list[str]:
    """All shards of the fused layer `module` belongs to, itself included."""
    parent, _, last = module.rpartition(".")
    return [f"{parent}.{s}" for s in SHARDS[FUSED[last]]]


def _is_lm_head(m: str) -> bool:
    return m == "lm_head" or m.endswith(LM_HEAD_TAILS)


def _embeddings(mods) -> dict[str, str]:
    return {m: "vLLM builds embeddings unquantized" for m in [m for m in mods if "embed" in m or m.endswith(
        (".wte", ".wpe"))] if "embed" in m.rpartition(".")[2] or m.endswith((".wte", ".wpe"))}


def classify(r: Resolved, quantized: Collection[str], floats: list[str]) -> Classified:
    """The linears vLLM builds unquantized, with why, among those stored quantized and the 2-D float
    ones. Rules about what a module *is* (embedding, router) are asked of the float ones only."""
    return {"modelopt": _modelopt, "fp8": _fp8, "compressed-tensors": _ct, "gptq": _gptq,
            "awq": _awq}[r.family](r, quantized, floats)


def _lm_heads(quantized: Collection[str], floats: list[str]) -> list[str]:
    return [m for m in LM_HEADS if m in quantized] + [m for m in floats if _is_lm_head(m)]


def _all(quantized, floats):
    return [*quantized, *floats]


def _modelopt(r: Resolved, quantized: Collection[str], floats: list[str]) -> Classified:
    # modelopt.py is_layer_excluded: (1) exact or fused name (quant_utils.is_layer_skipped), (2) the
    # legacy substring test `entry in prefix` (the `language_model.`-stripped retry can only match
    # what this one matches), (3) fnmatch; apply_vllm_mapper turns `foo*` into `foo` and `foo.*`.
    unq = _embeddings(floats)
    entries = list(r.exclude)
    for e in r.exclude:
        if len(e) >= 2 and e[-1] == "*" and e[-2] != ".":
            entries += [e[:-1], e[:-1] + ".*"]
    exact = set(entries)
    sub = re.compile("|".join(map(re.escape, entries))) if entries else None
    wild = [e for e in entries if any(c in e for c in "*?[")]
    wild_re = re.compile("|".join(f"(?:{translate(w)})" for w in wild)) if wild else None
    for m in _all(quantized, floats):
        if m in unq:
            continue
        if m in exact or fused_name(m) in exact:
            unq[m] = "listed in the exclusion list"
        elif sub is not None and sub.search(m):
            unq[m] = f"the exclusion entry {sub.search(m).group()!r} is a substring of it"
        elif wild_re is not None and wild_re.match(m):
            unq[m] = "matched by a wildcard of the exclusion list"
        elif any(v in m for v in VISION):
            unq[m] = "vLLM's ModelOpt config builds vision modules unquantized"
    return unq, None


def modelopt_exact_splits(r: Resolved, fused_shards: list[str]) -> set[str]:
    """Fused layers whose shards ModelOpt's list names *exactly* for some and not others: vLLM 0.33's
    is_layer_excluded asks is_layer_skipped first, which raises "Detected some but not all shards"
    even when a substring or wildcard entry would exclude the other shards too."""
    exact = set(r.exclude)
    out = set()
    for m in fused_shards:
        f = fused_name(m)
        if f not in exact and f not in out and len({s in exact for s in siblings(m)}) > 1:
            out.add(f)
    return out


def _fp8(r: Resolved, quantized: Collection[str], floats: list[str]) -> Classified:
    # fp8.py + quant_utils.is_layer_skipped: exact full prefix (a fused name listed directly also
    # matches); an MoE layer is skipped when an entry containing `experts` contains its prefix.
    # Fp8Config quantizes only LinearBase / experts / attention, so lm_head is unquantized; routers
    # are model-dependent (DeepSeek builds `mlp.gate` with quant_config=None): a float router is
    # not judged, a quantized one is held to the format.
    unq = _embeddings(floats)
    exact = set(r.exclude)
    for m in [e for e in exact if e in quantized or e in floats]:
        unq[m] = "listed in ignored_layers/modules_to_not_convert"
    fused = {e for e in exact if e.rpartition(".")[2] in SHARDS}
    expert_entries = [e for e in r.exclude if "experts" in e]
    if fused or expert_entries:
        for m in _all(quantized, floats):
            i = m.find(".experts.")
            if fused_name(m) in fused:
                unq[m] = f"its fused layer {fused_name(m)} is listed in ignored_layers"
            elif i >= 0 and any(m[:i + 8] in e for e in expert_entries):
                unq[m] = "its experts layer is listed in ignored_layers"
    for m in [m for m in floats if m.endswith(ROUTER_TAILS)]:
        unq.setdefault(m, "a router: built unquantized by the model code (DeepSeek) or listed")
    for m in _lm_heads(quantized, floats):
        unq.setdefault(m, "vLLM's Fp8Config leaves lm_head unquantized")
    return unq, None


def _ct(r: Resolved, quantized: Collection[str], floats: list[str]) -> Classified:
    # compressed_tensors/utils.py: `ignore` is exact or `re:` with re.match (anchored at the start
    # only); targets are exact / `re:` on the name, else a class name matched case-insensitively as
    # a substring of vLLM's layer class (`Linear` matches every *Linear layer). A linear no target
    # matches is silently unquantized. ParallelLMHead is not a LinearBase: lm_head stays unquantized.
    unq = _embeddings(floats)
    mods = _all(quantized, floats)
    exact = {e for e in r.exclude if not e.startswith("re:")}
    regs = [e[3:] for e in r.exclude if e.startswith("re:")]
    ign_re = re.compile("|".join(f"(?:{p})" for p in regs)) if regs else None
    for m in [e for e in exact if e in quantized or e in floats]:
        unq[m] = "listed in ignore"
    for m in [m for m in mods if m.endswith(FUSED_TAILS) and fused_name(m) in exact] if exact else ():
        unq[m] = f"its fused layer {fused_name(m)} is listed in ignore"
    for m in _lm_heads(quantized, floats):
        unq.setdefault(m, "vLLM's compressed-tensors config leaves lm_head (not a LinearBase) unquantized")
    if ign_re is not None:
        for m in mods:
            if ign_re.match(m):
                unq.setdefault(m, "matched by an `re:` entry of ignore")
    groups = []
    for targets, layout in r.groups:
        names = {t for t in targets if not t.startswith("re:") and "." in t}
        tre = [t[3:] for t in targets if t.startswith("re:")]
        linear = any("linear" in t.lower() for t in targets if not t.startswith("re:") and "." not in t)
        groups.append((names, re.compile("|".join(f"(?:{p})" for p in tre)) if tre else None, linear, layout))
    if len(groups) == 1 and groups[0][2]:
        return unq, None   # one group targeting every Linear: r.groups[0] for all
    layouts: dict[str, Layout] = {}
    for m in mods:
        if m in unq:
            continue
        for names, tre, linear, layout in groups:
            if m in names or (tre is not None and tre.match(m)) or linear:
                layouts[m] = layout
                break
        else:
            unq[m] = "matched by no config_groups target"
    return unq, layouts.__getitem__


def _gptq(r: Resolved, quantized: Collection[str], floats: list[str]) -> Classified:
    # auto_gptq.py / utils/gptq_utils.py: modules_in_block_to_quantize by substring, `dynamic`
    # `-:` regexes by re.match; lm_head is quantized only with `lm_head: true`.
    only = r.extra.get("quantize_only")
    skip = [re.compile(p) for p in r.extra.get("dynamic_skip", [])]

    def why(m: str) -> str | None:
        if any(p.match(m) for p in skip):
            return "excluded by a `-:` dynamic rule"
        if only is not None and not any(o in m for o in only):
            return "not in modules_in_block_to_quantize"
        return None
    return _lm_head_or(r, quantized, floats, why)


def _awq(r: Resolved, quantized: Collection[str], floats: list[str]) -> Classified:
    # auto_awq.py: modules_to_not_convert by substring; lm_head is quantized only with `lm_head: true`.
    def why(m: str) -> str | None:
        hit = next((s for s in r.exclude if s in m), None)
        return None if hit is None else f"excluded by the substring {hit!r} of modules_to_not_convert"
    return _lm_head_or(r, quantized, floats, why)


def _lm_head_or(r: Resolved, quantized: Collection[str], floats: list[str], why) -> Classified:
    """GPTQ's and AWQ's walk: embeddings unquantized, lm_head quantized only with `lm_head: true`,
    every other module as `why(module)` says (a reason, or None: quantized)."""
    unq = _embeddings(floats)
    for m in _all(quantized, floats):
        if m in unq:
            continue
        if _is_lm_head(m):
            reason = None if r.extra.get("lm_head") else "lm_head is quantized only with lm_head: true"
        else:
            reason = why(m)
        if reason:
            unq[m] = reason
    return unq, None


def inferred(r: Resolved) -> bool:
    """GPTQ without modules_in_block_to_quantize and AWQ without modules_to_not_convert: vLLM infers
    the quantized set from the header dtypes (auto_gptq.py, auto_awq.py), so it cannot disagree."""
    if r.family == "gptq":
        return r.extra.get("quantize_only") is None
    if r.family == "awq":
        return not r.extra.get("explicit")
    return False

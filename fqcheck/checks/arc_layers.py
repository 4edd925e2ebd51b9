"""ARC header half: decoder layers against each other and, for families whose layout config.json
fixes, against config.json's sizes. Runs on every lint, so no torch, no transformers.

Why a header half: vLLM 0.32 loads a checkpoint with a layer's weight missing silently (and serves
garbage), and fails on a mis-shaped or unknown tensor only at load time; the meta-device build (the
ARC rules' --arch half) needs torch and transformers, seconds of imports against under a second for
the whole header lint. The defects seen most often show in the headers: the layers of one kind hold
the same modules with the same shapes, every expert the same tensors.

Cost: ~98 % of a DeepSeek-R1's ~90k names are expert tensors; one str.count per shard tells them
apart, two more over their joined names check their number, and only when it is off are they
compared name by name. The other names
are grouped per (template, layer, shape) with two regex passes over their joined text.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import repeat

from ..checkpoint import Checkpoint

# Each name's layer stack and index ("model.layers", "7"), or ("", "") outside a stack: one match a line.
_LAYER = re.compile(r"^(?:(.*?(?:^|\.)(?:layers|h|blocks))\.(\d+)\.)?.*$", re.M)
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
WEIGHT_LEAVES = ("weight", "bias")
PACKED_WEIGHTS = ("weight", "qweight", "weight_packed")  # a packed quantized weight stands in for `weight`
MAX_LAYER_FINDINGS = 4  # more whole layers missing than this: one finding for the range
EXPERT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts")
# Kept beside the layer's modules by old exports; transformers and vLLM skip them.
ALLOWED_EXTRA = re.compile(r"(^|\.)rotary_emb(\.|$)")


@dataclass
class LayerFindings:
    unexpected: list = field(default_factory=list)  # (tensor, why, fixable)
    missing: list = field(default_factory=list)     # (tensor, why)
    mismatched: list = field(default_factory=list)  # (tensor, found, expected, why)


@dataclass
class _Stack:
    name: str
    layers: dict = field(default_factory=dict)  # index -> {rest template: {shape: n}}


def analyse(ckpt: Checkpoint, cfg: dict | None, packed: bool, quantized: bool) -> LayerFindings:
    """packed: a declared quantization method may store weights packed (other shapes, other names);
    quantized: some quantization method is declared (its extra tensors are not unexpected)."""
    out = LayerFindings()
    names, shapes, experts = _split_experts(ckpt)
    if experts and not _experts_agree(experts.texts, cfg or {}, experts.lines, experts.first):
        names, shapes = [], []  # compare every name, the experts' too
        for h in ckpt.headers().values():
            names += h.names
            shapes += h.shapes()
    if not names:
        return out
    joined = "\n".join(names)
    marks = _LAYER.findall(joined)
    templates = _INDEX.sub("#", joined).split("\n")
    if len(marks) != len(names) or len(templates) != len(names):
        return out  # a name with a newline: SFT002's, and no layers to compare
    groups = Counter(zip(templates, marks, shapes))
    stacks: dict[str, _Stack] = {}
    top: dict[str, set] = {}  # names outside any layer stack -> shapes
    for (t, (stack, idx), shape), n in groups.items():
        if "quantizer" in t:  # leaked quantizer state is QNT001's
            continue
        if not stack:
            top.setdefault(t, set()).add(shape)
            continue
        rest = t.split(".", stack.count(".") + 2)[-1]
        s = stacks.setdefault(stack, _Stack(stack))
        by_shape = s.layers.setdefault(int(idx), {}).setdefault(rest, {})
        by_shape[shape] = by_shape.get(shape, 0) + n
    ctx = _Context(ckpt, names, templates, marks, packed, quantized, cfg or {})
    main = _main_stack(stacks)
    family = expected_layer(cfg) if cfg else None
    for s in stacks.values():
        if s is main:
            _layer_count(ctx, s, out)
        if s is main and family is not None:
            _against_config(ctx, s, family, out)
        else:
            _against_each_other(ctx, s, out, _int(ctx.cfg, "num_hidden_layers") if s is main else None)
    if main is not None and main.name == "model.layers" and family is not None:
        _top_against_config(ctx, top, out)
    return out


def _top_against_config(ctx: _Context, top: dict[str, set], out: LayerFindings) -> None:
    """The tensors outside the layers of a family from expected_layer: embedding, final norm, head."""
    h, vocab = _int(ctx.cfg, "hidden_size"), _int(ctx.cfg, "vocab_size")
    want = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for name, shapes in sorted(top.items()):
        if name in want:
            for shape in shapes:
                if shape != want[name] and None not in want[name] and not (ctx.packed and name == "lm_head.weight"):
                    out.mismatched.append((name, shape, want[name], f"config.json's sizes give {_fmt(want[name])}"))
        elif not ALLOWED_EXTRA.search(name) and not (ctx.quantized and name.rpartition(".")[0] in
                                                       ("model.embed_tokens", "model.norm", "lm_head")):
            out.unexpected.append((name, f"a {ctx.cfg.get('model_type')} model has no such tensor", "safe"))
    for name in ("model.embed_tokens.weight", "model.norm.weight"):  # a missing lm_head is TEN004's
        if name not in top:
            out.missing.append((name, f"every {ctx.cfg.get('model_type')} model has it"))


def _split_experts(ckpt: Checkpoint) -> tuple[list, list, _Experts | None]:
    """(names that are not an expert's, their shapes, the expert tensors as _Experts or None when
    there are none). A shard all experts or none is told by one str.count over its joined names;
    a shard that mixes (one in three on a DeepSeek-R1) is tested name by name (`in`, not a mapped
    str.__contains__: half the cost) for its few other names, and its joined text stands for its
    experts, not a copy of their lines: a line without ".experts." holds nothing _experts_agree
    counts but its newline, taken off the count of lines. That count is the number of names where
    the reader vouches that no name holds a newline (SafetensorsHeader.newline_free), else counted."""
    names: list = []
    shapes: list = []
    texts: list[str] = []
    lines = 0
    first = None
    for h in ckpt.headers().values():
        text = h.joined
        n = text.count(".experts.")
        if n == 0:
            names += h.names
            shapes += h.shapes()
            continue
        hn = h.names
        texts.append(text)
        # no backslash in the header's JSON: no name holds a newline, a name is a line
        lines += len(hn) if h.newline_free else text.count("\n")
        if n == len(hn) and ".experts." in hn[0]:
            if first is None:
                first = hn[0]
            continue
        other = [i for i, x in enumerate(hn) if ".experts." not in x]
        if first is None:
            first = next(x for x in hn if ".experts." in x)
        some = list(map(hn.__getitem__, other))
        names += some
        lines -= len(some) if h.newline_free else len(some) + sum(map(str.count, some, repeat("\n")))
        if other and h._columns is not None:  # their shapes from the kind columns, not every name's
            kinds, ids, _ = h._columns
            shapes += map([k[1] for k in kinds].__getitem__, map(ids.__getitem__, other))
        elif other:
            shapes += map(h.shapes().__getitem__, other)
    return names, shapes, (_Experts(texts, lines, first) if texts else None)


@dataclass
class _Experts:
    """The expert tensors: texts of whole lines (each an expert-holding shard's joined names, read
    as if joined: not copied into one), how many of their lines are the experts' (a mixed shard's
    text also holds its other names), and the first expert name (header order, shard by shard)."""
    texts: list[str]
    lines: int
    first: str


def _experts_agree(texts: list[str], cfg: dict, lines: int | None = None, first: str | None = None) -> bool:
    """Whether the expert tensors (98 % of a DeepSeek-R1's names; texts of whole lines, as
    _split_experts gives them, read as if joined), agree: there
    are (declared experts) x (MoE layers) x (tensors the first stored expert has) of them, the MoE
    layers being those that store expert 0. Two str.count scans of the texts joined, at C speed (the
    number of expert lines is `lines`, by default every line of the texts; the first expert's line is `first`'s
    first line, by default the texts' first line); when they do not agree the experts are compared
    name by name. The texts may hold other lines too, as long as none holds ".experts.": those can
    hold neither the first expert's prefix nor an expert-0 line end. What this misses (an expert's
    shape, a tensor too many in one place and too few in another, a layer whose experts are all
    gone) --arch finds."""
    declared = next((cfg[k] for k in EXPERT_KEYS if _int(cfg, k)), None)
    m = _FIRST_EXPERT.match((texts[0] if first is None else first).partition("\n")[0])
    if declared is None or m is None:
        return False  # no declared count, or fused experts (experts.gate_up_proj): few names
    first, line = m.group(1), f".experts.0.{m.group(2)}\n"
    # One text, copied (~0.1 ms for 4.7 MB): CPython 3.10+ counts a pattern of under 100 characters
    # by its two-way search only in a text of 30,000 characters or more, by a plain scan below, and a
    # DeepSeek-R1 shard's names are ~29,500: the two counts take 2.5 against 5.5 ms shard by shard.
    text = "".join(texts)
    if lines is None:
        lines = text.count("\n")
    # the first expert's tensors: the lines that start with its prefix
    own = text.count("\n" + first) + text.startswith(first)
    if not own or lines % (declared * own):
        return False  # no number of expert-0 lines makes up the count: the last scan is not needed
    return lines == declared * text.count(line) * own


_FIRST_EXPERT = re.compile(r"(.*\.experts\.\d+\.)(\S+)$")


@dataclass
class _Context:
    ckpt: Checkpoint
    names: list
    templates: list
    marks: list
    packed: bool
    quantized: bool
    cfg: dict

    def concrete(self, stack: str, idx: int, rest: str) -> list[str]:
        """The stored names of one (layer, template): a slow pass, run only for a finding."""
        mark = (stack, str(idx))
        tail = "." + rest if rest else ""
        return [n for n, t, m in zip(self.names, self.templates, self.marks) if m == mark and t.endswith(tail)
                and t.split(".", stack.count(".") + 2)[-1] == rest]


def _main_stack(stacks: dict[str, _Stack]) -> _Stack | None:
    """The decoder whose layers num_hidden_layers counts: the language model's, not a vision tower's."""
    cands = [s for s in stacks.values() if s.name.endswith("layers")]
    return max(cands, key=lambda s: (s.name == "model.layers", "language_model" in s.name, len(s.layers)),
               default=None)


def _module(rest: str) -> str:
    return rest.rpartition(".")[0]


def _leaf(rest: str) -> str:
    return rest.rpartition(".")[2]


def _name(stack: str, idx: int, rest: str) -> str:
    """A concrete name for a template with no index but the layer's (an expert template keeps '#')."""
    return f"{stack}.{idx}.{rest}"


def _layer_count(ctx: _Context, s: _Stack, out: LayerFindings) -> None:
    """Layers config.json declares that store nothing (a retired shard, a config that lies)."""
    n = _int(ctx.cfg, "num_hidden_layers")
    if n is None:
        return
    top = max(s.layers)
    holes = [i for i in range(min(n, top + 1)) if i not in s.layers]
    beyond = max(0, n - top - 1)  # never listed one by one: a hostile config may declare 10**12
    if len(holes) + beyond > MAX_LAYER_FINDINGS:
        where = ", ".join(filter(None, [_ranges(holes), f"{top + 1}-{n - 1}" if beyond else ""]))
        out.missing.append((f"{s.name}.{holes[0] if holes else top + 1}",
                            f"{len(holes) + beyond} of the {n} layers config.json declares (num_hidden_layers) "
                            f"have no tensors: {where} (stored: {_ranges(sorted(s.layers))})"))
        return
    like = s.layers[top]
    for i in [*holes, *range(top + 1, n)]:
        for rest in sorted(r for r in like if _leaf(r) in WEIGHT_LEAVES and "#" not in r):
            out.missing.append((_name(s.name, i, rest), f"layer {i} has no tensors (num_hidden_layers is {n})"))


def _ranges(idx) -> str:
    idx = list(idx)
    if len(idx) > 1 and idx[-1] - idx[0] == len(idx) - 1:
        return f"{idx[0]}-{idx[-1]}"
    return ", ".join(map(str, idx[:8])) + (f" and {len(idx) - 8} more" if len(idx) > 8 else "")


def _has_weight(layer: dict, module: str) -> bool:
    return any(f"{module}.{w}" in layer for w in PACKED_WEIGHTS) if module else True


def _against_each_other(ctx: _Context, s: _Stack, out: LayerFindings, below: int | None) -> None:
    """No layout from config: a layer whose set of modules no other layer shares, set against the
    closest set that several layers share. Close (a few modules more or fewer): those are unexpected
    / missing. Far: another kind of layer (DeepSeek's dense-then-MoE, Llama 4's interleaved MoE,
    Jamba's mamba and attention layers). Layers from num_hidden_layers on (DeepSeek's MTP layer)
    are not compared."""
    sigs: dict[frozenset, list[int]] = {}
    for i, layer in sorted(s.layers.items()):
        if below is None or i < below:
            sigs.setdefault(frozenset(_module(r) for r in layer), []).append(i)
    refs = [sig for sig, where in sigs.items() if len(where) >= 2]
    for sig, where in sigs.items():
        if len(where) != 1 or not refs:
            continue
        i = where[0]
        ref = min(refs, key=lambda r: (len(r ^ sig), -len(sigs[r])))
        gone, extra = ref - sig, sig - ref
        if len(gone) + len(extra) > max(2, len(ref) // 4):
            continue
        like = sigs[ref]
        for m in sorted(extra):
            if ALLOWED_EXTRA.search(m):
                continue
            for rest in sorted(r for r in s.layers[i] if _module(r) == m):
                for t in ctx.concrete(s.name, i, rest):
                    out.unexpected.append((t, f"the {len(like)} layers whose modules are otherwise the same as "
                                           f"layer {i}'s have no {m}", "unsafe"))
        for m in sorted(gone):
            for rest in _weights_of(s, like[0], m) or [m]:
                out.missing.append((_name(s.name, i, rest), f"the {len(like)} layers whose modules are otherwise "
                                    f"the same as layer {i}'s store it"))
    for ref in refs:  # a module's weight gone, its scales left (a quantized module)
        for i in sigs[ref]:
            for m in ref:
                if not _has_weight(s.layers[i], m) and all(_has_weight(s.layers[j], m) for j in sigs[ref] if j != i):
                    out.missing.append((_name(s.name, i, f"{m}.weight"), f"every other layer like layer {i} "
                                        f"stores {m}.weight"))
    _experts(ctx, s, out)
    _shapes_agree(ctx, s, out)


def _weights_of(s: _Stack, i: int, module: str) -> list[str]:
    return sorted(r for r in s.layers[i] if _module(r) == module and _leaf(r) in WEIGHT_LEAVES)


def _experts(ctx: _Context, s: _Stack, out: LayerFindings) -> None:
    """Every expert of a layer stores the same tensors: count each expert template per layer."""
    declared = next((ctx.cfg[k] for k in EXPERT_KEYS if isinstance(ctx.cfg.get(k), int)), None)
    for i, layer in sorted(s.layers.items()):
        counts = {r: sum(c.values()) for r, c in layer.items() if ".#." in r or r.startswith("#.")}
        if not counts:
            continue
        want = declared if declared else max(counts.values())
        for rest, n in sorted(counts.items()):
            if n == want:
                continue
            stored = ctx.concrete(s.name, i, rest)
            pre, _, post = rest.partition("#")
            base = f"{s.name}.{i}.{pre}"
            have = {int(t[len(base):].split(".", 1)[0]) for t in stored if t[len(base):].split(".", 1)[0].isdigit()}
            for e in sorted(set(range(want)) - have):
                out.missing.append((f"{base}{e}{post}", f"{len(have)} of {want} experts store {pre}#{post}"))
            for t in stored:
                e = t[len(base):].split(".", 1)[0]
                if e.isdigit() and int(e) >= want:
                    out.unexpected.append((t, f"expert {e} beyond the {want} that config.json declares", "unsafe"))


def _shapes_agree(ctx: _Context, s: _Stack, out: LayerFindings) -> None:
    """A weight whose shape one layer alone has, where every other layer agrees (a layer's own sizes,
    as in some NAS-derived models, show as several shapes and are left alone)."""
    per: dict[str, dict[tuple, set]] = {}
    for i, layer in s.layers.items():
        for rest, c in layer.items():
            if _leaf(rest) in WEIGHT_LEAVES and not (ctx.packed and _leaf(rest) == "weight"):
                for shape in c:
                    per.setdefault(rest, {}).setdefault(shape, set()).add(i)
    for rest, by_shape in sorted(per.items()):
        if len(by_shape) != 2:
            continue
        (odd, odd_layers), (usual, usual_layers) = sorted(by_shape.items(), key=lambda kv: len(kv[1]))
        if len(odd_layers) != 1 or len(usual_layers) < 2:
            continue
        i = next(iter(odd_layers))
        for t in ctx.concrete(s.name, i, rest):
            if _shape_of(ctx, t) == odd:
                out.mismatched.append((t, odd, usual, f"the other {len(usual_layers)} layers store it as "
                                       f"{_fmt(usual)}"))


def _shape_of(ctx: _Context, tensor: str) -> tuple | None:
    hit = ctx.ckpt.tensor(tensor)
    return tuple(hit[1].shape) if hit else None


def _fmt(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _against_config(ctx: _Context, s: _Stack, family: dict, out: LayerFindings) -> None:
    """A family whose layer layout config.json fixes: every layer against it, by name and shape."""
    n = ctx.cfg["num_hidden_layers"]
    modules = {_module(r) for r in family}
    parents = {m.rsplit(".", 1)[0] for m in modules if "." in m}  # e.g. self_attn (k_scale, v_scale)
    model_type = ctx.cfg.get("model_type")
    for i, layer in sorted(s.layers.items()):
        if i >= n:
            for rest in sorted(layer):
                for t in ctx.concrete(s.name, i, rest):
                    out.unexpected.append((t, f"config.json declares {n} layers (num_hidden_layers)", "safe"))
            continue
        mods = {_module(r) for r in layer}
        for rest in sorted(layer):
            m, leaf = _module(rest), _leaf(rest)
            if m in modules or ALLOWED_EXTRA.search(rest):
                if rest in family and (leaf == "bias" or not ctx.packed):
                    for shape in layer[rest]:
                        if shape != family[rest]:
                            out.mismatched.append((_name(s.name, i, rest), shape, family[rest],
                                                   f"config.json's sizes give {_fmt(family[rest])}"))
                elif rest not in family and leaf in WEIGHT_LEAVES and not ctx.quantized:
                    out.unexpected.append((_name(s.name, i, rest), f"a {model_type} layer's {m} has no {leaf} "
                                           "with this config.json", "safe"))
                continue
            if ctx.quantized and (m in parents or not m or any(m.startswith(x + ".") for x in modules)):
                continue  # e.g. self_attn.k_scale of a quantized KV cache, bitsandbytes' weight.absmax
            for t in ctx.concrete(s.name, i, rest):
                out.unexpected.append((t, f"a {model_type} layer has no {m or rest} module", "safe"))
        for rest in sorted(family):
            m = _module(rest)
            if m not in mods:
                out.missing.append((_name(s.name, i, rest), f"every {model_type} layer has {m}"))
            elif _leaf(rest) == "weight" and not _has_weight(layer, m):
                out.missing.append((_name(s.name, i, rest), f"{m} stores no weight"))


def _int(cfg: dict, key: str, default=None):
    v = cfg.get(key, default)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def expected_layer(cfg: dict) -> dict[str, tuple] | None:
    """{template after 'model.layers.#.': shape} for the dense decoder families whose layer layout
    follows from config.json alone (transformers' Llama/Mistral/Qwen2/Qwen3 modeling code, and
    vLLM's llama.py/qwen2.py/qwen3.py load the same names); None for any other family."""
    mt = cfg.get("model_type")
    if mt not in ("llama", "mistral", "qwen2", "qwen3"):
        return None
    h, heads, inter, n = (_int(cfg, k) for k in ("hidden_size", "num_attention_heads", "intermediate_size",
                                                 "num_hidden_layers"))
    if None in (h, heads, inter, n):
        return None
    kv = _int(cfg, "num_key_value_heads", heads)
    # Qwen3Config's head_dim defaults to 128, the others' to hidden_size // num_attention_heads
    hd = _int(cfg, "head_dim") if cfg.get("head_dim") is not None or mt == "qwen3" else h // heads
    if kv is None or hd is None:
        return None
    q, k = heads * hd, kv * hd
    out = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (k, h),
           "self_attn.v_proj.weight": (k, h), "self_attn.o_proj.weight": (h, q),
           "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
           "mlp.down_proj.weight": (h, inter),
           "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    if mt == "qwen2" or cfg.get("attention_bias") is True and mt in ("llama", "qwen3"):
        out.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (k,), "self_attn.v_proj.bias": (k,)})
        if mt != "qwen2":
            out["self_attn.o_proj.bias"] = (h,)
    if mt == "llama" and cfg.get("mlp_bias") is True:
        out.update({"mlp.gate_proj.bias": (inter,), "mlp.up_proj.bias": (inter,), "mlp.down_proj.bias": (h,)})
    if mt == "qwen3":
        out.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    return out

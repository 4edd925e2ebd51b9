"""SRV: does the checkpoint meet the tensor contract of the serving loader (vLLM 0.33) for the
quantization it declares? Header-only: names, dtypes and shapes from the safetensors headers, the
configs from config.json / hf_quant_config.json. One analysis per checkpoint feeds all eight rules."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator

from ..checkpoint import Checkpoint
from ..checkpoint.safetensors import columns
from ..engine import Hit, check
from ..fix.edits import DropTensor
from ..serve import formats as F
from ..serve.config import Layout, Resolved, resolve
from ..serve.match import QKV, decider, fused_name, inferred

KV_SUFFIXES = ("k_scale", "v_scale", "kv_scale")
WANTED = frozenset(("weight", *F.QUANT_SUFFIXES, *KV_SUFFIXES, "g_idx"))
NO_PARAM = ("vLLM 0.33 has no parameter for it and raises ValueError: There is no module or parameter named "
            "'{t}' (KeyError: '{t}' in models with their own load_weights)")


def _rule(code: str) -> None:
    @check(code)
    def serve_rule(ckpt: Checkpoint) -> Iterator[Hit]:
        return iter(_analyse(ckpt).get(code, ()))


for _code in ("SRV001", "SRV002", "SRV003", "SRV004", "SRV005", "SRV006", "SRV007", "SRV008"):
    _rule(_code)


def _analyse(ckpt: Checkpoint) -> dict[str, list[Hit]]:
    done = ckpt.__dict__.get("_srv_findings")  # the eight rules share one pass over the headers
    if done is None:
        done = ckpt.__dict__["_srv_findings"] = _Analysis(ckpt).run()
    return done


class _Analysis:
    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.hits: dict[str, list[Hit]] = defaultdict(list)

    def add(self, code: str, message: str, file=None, tensor=None, fix=None) -> None:
        self.hits[code].append(Hit(message, file=file, tensor=tensor, fix=fix))

    def run(self) -> dict[str, list[Hit]]:
        r = resolve(self.ckpt)
        if r is None:
            return {}
        for p in r.problems:
            self.add("SRV001", p, file=r.source)
        if r.usable and (r.layout is not None or r.groups):
            self.modules = _modules(self.ckpt)
            self.linears(r)
            if r.kv:
                self.kv_scales(r)
        return dict(self.hits)

    def linears(self, r: Resolved) -> None:
        decide = decider(r)
        guess = inferred(r)
        fused: dict[str, list] = defaultdict(list)
        pending5: list[tuple] = []
        cache: dict = {}
        for mod, ts in self.modules.items():
            main = ts.get("weight_packed") or ts.get("qweight") or ts.get("weight")
            if main is None:
                continue
            stored_q = main[0] in F.QUANT_DTYPES or any(s in ts for s in F.EVIDENCE)
            if len(main[1]) != 2 and not stored_q:
                continue  # norms, biases, 3-D tensors of unquantized modules
            layout, why = decide(mod)
            if guess:  # GPTQ/AWQ without lists: vLLM infers the quantized set from these very dtypes
                layout, why = (r.layout, "") if stored_q else (None, "inferred unquantized from its dtypes")
            f = fused_name(mod)
            if f is not None:
                fused[f].append((mod, stored_q, layout is None))
            if layout is None:
                if stored_q:
                    pending5.append((mod, f, f"{r.source} says unquantized ({why}) but it is stored quantized: vLLM "
                                     f"0.33 builds it unquantized and raises ValueError: There is no module or "
                                     f"parameter named '{mod}.…' for its quantization tensors", ts))
                else:
                    for s in ts.keys() & F.QUANT_SUFFIXES:
                        t = f"{mod}.{s}"
                        self.add("SRV006", f"{r.family}: {t} on a module vLLM builds unquantized ({why}): "
                                 + NO_PARAM.format(t=t), file=ts[s][2], tensor=t, fix=DropTensor(ts[s][2], t))
                continue
            if not stored_q:
                pending5.append((mod, f, f"stored unquantized ({main[0]}) but {layout.label} is declared for it and "
                                 f"nothing excludes it: vLLM 0.33 builds the quantized parameters and "
                                 + _float_into_quantized(layout), ts))
                continue
            key = (layout, ".experts." in mod, tuple((s, v[0], v[1]) for s, v in ts.items()))
            found = cache.get(key)
            if found is None:
                found = cache[key] = list(_contract(layout, ts, ".experts." in mod))
            for code, s, text in found:
                t = f"{mod}.{s}"
                file = ts[s][2] if s in ts else ts[F.main_suffix(layout)][2] if F.main_suffix(layout) in ts else main[2]
                self.add(code, f"{layout.label}: {t} {text.replace('{t}', t)}", file=file, tensor=t,
                         fix=DropTensor(file, t) if code == "SRV006" else None)
        split = self.fused_groups(r, fused)
        for mod, f, text, ts in pending5:
            if f not in split:
                w = ts.get("weight_packed") or ts.get("qweight") or ts.get("weight")
                self.add("SRV005", f"{r.family}: {mod} {text}", file=w[2], tensor=mod)

    def fused_groups(self, r: Resolved, fused: dict[str, list]) -> set[str]:
        """SRV008: shards of one fused layer must all be quantized or all not, in the config and in
        the tensors (quant_utils.is_layer_skipped / compressed-tensors should_ignore_layer)."""
        split = set()
        for f, shards in fused.items():
            if len(shards) < 2:
                continue
            stored = {q for _, q, _ in shards}
            excluded = {x for _, _, x in shards}
            if len(stored) == 1 and len(excluded) == 1:
                continue
            split.add(f)
            where = ", ".join(f"{m.rpartition('.')[2]} {'quantized' if q else 'unquantized'}"
                              f"{' (excluded)' if x else ''}" for m, q, x in shards)
            if len(excluded) > 1:  # the config itself splits the layer: refused at start-up
                err = "raises " + (f"ValueError: Found different quantization schemes for the shards of {f}"
                                   if r.family == "compressed-tensors" else
                                   f"ValueError: Detected some but not all shards of {f} are quantized. All shards "
                                   "of fused layers to have the same precision.")
            else:  # the config is consistent, the tensors are not
                err = ("builds one fused layer " + ("unquantized and has no parameter for the quantized shards' "
                       "scales (ValueError: There is no module or parameter named ...)" if excluded == {True} else
                       "quantized and loads the float shard into it: " + _float_into_quantized(r.layout or
                                                                                            r.groups[0][1])))
            states = [(q, x) for _, q, x in shards]
            odd = min(shards, key=lambda s: states.count((s[1], s[2])))[0]  # the shard unlike the others
            w = self.modules[odd]
            main = w.get("weight_packed") or w.get("qweight") or w.get("weight")
            self.add("SRV008", f"{r.family}: shards of the fused layer {f} differ: {where}; vLLM 0.33 raises {err}",
                     file=main[2], tensor=odd)
        return split

    def kv_scales(self, r: Resolved) -> None:
        """SRV007: the KV-cache scales vLLM maps (base_config.get_cache_scale_mapper, §2.7)."""
        attn = sorted({m.rpartition(".")[0] for m in self.modules if m.rpartition(".")[2] in (*QKV, "qkv_proj")})
        heads_ok = isinstance(r.raw.get("kv_cache_scheme"), dict) and r.raw["kv_cache_scheme"].get("strategy") == "attn_head"
        for a in attn:
            for kind in ("k_scale", "v_scale"):
                names = (f"{a}.{kind[0]}_proj.{kind}", f"{a}.qkv_proj.{kind}", f"{a}.{kind}")
                hit = next(((n, self.modules.get(n.rpartition('.')[0], {}).get(kind)) for n in names
                            if kind in self.modules.get(n.rpartition(".")[0], {})), None)
                if hit is None:
                    old = self.modules.get(a, {}).get("kv_scale") or self.modules.get(f"{a}.k_proj", {}).get("kv_scale")
                    if old is not None:
                        if kind == "k_scale":
                            self.add("SRV007", f"{r.family}: {a} stores the deprecated kv_scale instead of k_scale/"
                                     "v_scale: vLLM 0.33 warns DEPRECATED. Found kv_scale in the checkpoint and uses "
                                     "it for both", file=old[2], tensor=f"{a}.kv_scale")
                        continue
                    self.add("SRV007", f"{r.family}: KV-cache quantization is declared but {a} has no {kind} (looked for "
                             f"{names[0]}, {names[1]}, {names[2]}): vLLM 0.33 falls back to 1.0 with the warning "
                             "'Using KV cache scaling factor 1.0 for fp8_e4m3'", tensor=a)
                    continue
                name, (dtype, shape, file) = hit
                numel = 1
                for d in shape:
                    numel *= d
                if numel != 1 and not (heads_ok and len(shape) == 3 and shape[1:] == (1, 1)):
                    self.add("SRV007", f"{r.family}: {name} has shape {list(shape)}, not a scalar: vLLM 0.33 raises "
                             f"ValueError: KV-cache scale expects a scalar weight, got shape {list(shape)}",
                             file=file, tensor=name)
                elif dtype not in F.FLOAT:
                    self.add("SRV007", f"{r.family}: {name} is {dtype}, not a float scale", file=file, tensor=name)


def _contract(layout: Layout, ts: dict, expert: bool) -> Iterator[tuple[str, str, str]]:
    """(code, suffix, text) for one stored-quantized module against its layout: pure, cached per
    (layout, names/dtypes/shapes) because a large MoE repeats one shape thousands of times."""
    ms = F.main_suffix(layout)
    main = ts.get(ms)
    want_dtype = F.MAIN_DTYPE[layout.kind]
    if main is None:
        yield "SRV002", ms, (f"is missing: {layout.label} stores the quantized weight as {ms} "
                             f"({want_dtype}); {F.missing_effect(layout, ms, expert)}")
        return
    if main[0] != want_dtype:
        yield "SRV003", ms, (f"is {main[0]} {list(main[1])}, expected {want_dtype}: vLLM 0.33 has no dtype check "
                             f"and {_float_into_quantized(layout)}")
        checked_shapes = False
    else:
        checked_shapes = True
    companions, shape_problem = F.wants(layout, main[1]) if checked_shapes else ([], None)
    if shape_problem:
        yield "SRV004", ms, f"{list(main[1])} {shape_problem}"
    expected = {ms}
    for w in companions:
        expected.add(w.suffix)
        got = ts.get(w.suffix)
        if got is None:
            if w.required:
                yield "SRV002", w.suffix, (f"is missing ({layout.label} needs {'/'.join(w.dtypes[:1])} "
                                           f"{_shape_text(w.shapes)}): {F.missing_effect(layout, w.suffix, expert)}")
            continue
        if got[0] not in w.dtypes:
            yield "SRV003", w.suffix, (f"is {got[0]}, expected {' or '.join(w.dtypes)}: vLLM 0.33 copies it without a "
                                       "dtype check (copy_ casts the values into the wrong format)")
        elif w.shapes is not None and tuple(got[1]) not in w.shapes:
            yield "SRV004", w.suffix, (f"has shape {list(got[1])}, expected {_shape_text(w.shapes)} for the weight "
                                       f"{list(main[1])}: vLLM 0.33 fails its shape assert (AssertionError) at load")
    if not checked_shapes or shape_problem:  # the format's dims are unknown: companions not judged
        expected |= F.QUANT_SUFFIXES
    for s in ts.keys() & F.QUANT_SUFFIXES - expected - set(F.TOLERATED.get(layout.kind, ())):
        why = " (dynamic activations)" if s in ("input_scale", "input_global_scale") else \
            " (symmetric scheme)" if s.endswith("zero_point") else ""
        yield "SRV006", s, f"is not part of {layout.label}{why}: " + NO_PARAM.format(t="{t}")
    if ms != "weight" and "weight" in ts:
        yield "SRV006", "weight", f"is stored next to {ms}: {NO_PARAM}"


def _float_into_quantized(layout: Layout) -> str:
    """What vLLM 0.33 does with a float weight loaded into this format's quantized weight parameter."""
    if F.main_suffix(layout) == "weight" and layout.kind not in ("nvfp4", "w4a16_nvfp4"):
        return ("copy_ casts the float values into the FP8/INT8 parameter of the same shape: loads silently with "
                "garbage (the scales are not the weight's)")
    return "the unpacked float shape fails the packed parameter's shape assert (AssertionError)"


def _shape_text(shapes) -> str:
    if shapes is None:
        return "(any shape)"
    if shapes == F.SCALAR:
        return "scalar [] or [1]"
    return " or ".join(str(list(s)) for s in sorted(shapes))


def _modules(ckpt: Checkpoint) -> dict[str, dict[str, tuple]]:
    """module prefix -> {suffix: (dtype, shape, file)} for the tensors the contracts name, straight
    from the header columns (no TensorEntry per tensor: a DeepSeek-R1 layout has 90k names)."""
    mods: dict[str, dict[str, tuple]] = {}
    for fname, h in ckpt.headers().items():
        cols = columns(h)
        if cols is None:
            rows = ((e.name, e.dtype, e.shape) for e in h.tensors.values())
        else:
            names, kinds, ids = cols[3], cols[4], cols[5]
            rows = ((n, *kinds[i][:2]) for n, i in zip(names, ids))
        for name, dtype, shape in rows:
            mod, _, suffix = name.rpartition(".")
            if suffix in WANTED:
                d = mods.get(mod)
                if d is None:
                    d = mods[mod] = {}
                d[suffix] = (dtype, tuple(shape), fname)
    return mods

"""SRV: does the checkpoint meet the tensor contract of the serving loader (vLLM 0.33) for the
quantization it declares? Header-only: names, dtypes and shapes from the safetensors headers, the
configs from config.json / hf_quant_config.json. One analysis per checkpoint feeds all eight rules.

The analysis works on groups of module names, never module by module: a DeepSeek-R1 layout has
90k tensors and 45k linears. The headers are read once into suffix -> kind -> [modules] (one
dict step per name); formats are then checked per (suffix, kind) group with set operations."""
from __future__ import annotations

from collections import defaultdict
from operator import itemgetter
from typing import Iterator

from ..checkpoint import Checkpoint
from ..checkpoint.columns import deal
from ..checkpoint.safetensors import columns
from ..engine import Context, Hit, check
from ..fixer.edits import DropTensor
from ..serve import formats as F
from ..serve.config import Layout, Resolved, resolve
from ..serve.match import FUSED_TAILS, QKV, classify, fused_name, inferred, modelopt_exact_splits, siblings

MAINS = ("weight_packed", "qweight", "weight")   # a packed main tensor wins over a stray `weight`
SUFFIXES = frozenset((*MAINS, *F.QUANT_SUFFIXES, "k_scale", "v_scale", "kv_scale"))
NO_PARAM = ("vLLM 0.33 has no parameter for it and raises ValueError: There is no module or parameter named "
            "'{t}' (KeyError: '{t}' in models with their own load_weights)")
CODES = ("SRV001", "SRV002", "SRV003", "SRV004", "SRV005", "SRV006", "SRV007", "SRV008")
Kind = tuple  # (dtype, shape, nbytes), as the header columns hold it


def _rule(code: str) -> None:
    @check(code)
    def serve_rule(ctx: Context) -> Iterator[Hit]:  # the eight rules share one pass over the headers
        return iter(ctx.once("srv", lambda: _Analysis(ctx.ckpt).run()).get(code, ()))


for _code in CODES:
    _rule(_code)


class _Analysis:
    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.hits: dict[str, list[Hit]] = defaultdict(list)
        self.T: dict[str, dict[Kind, list[str]]] = {}
        self._index: dict[str, tuple[dict[str, int], list[Kind]]] = {}

    # --- lookups, built on first use ---

    def index(self, suffix: str) -> tuple[dict[str, int], list[Kind]]:
        """{module: kind number} of the modules storing `<module>.<suffix>`, and the kinds. Built with
        dict.fromkeys per kind (C speed); kind numbers are ints, cheap to hash, unlike kind tuples."""
        got = self._index.get(suffix)
        if got is None:
            d: dict[str, int] = {}
            kinds = list(self.T[suffix])
            for i, k in enumerate(kinds):
                d.update(dict.fromkeys(self.T[suffix][k], i))
            got = self._index[suffix] = (d, kinds)
        return got

    def has(self, suffix: str):
        return self.index(suffix)[0].keys()

    def among(self, suffix: str, mods: set[str]) -> set[str]:
        """The modules of `mods` (usually few) storing `<module>.<suffix>`: the small set meets each
        list at C speed, with no lookup table built for a long list (a scale per weight)."""
        if suffix in self._index or not mods:
            return mods & self.has(suffix)
        return set().union(*(mods.intersection(ms) for ms in self.T[suffix].values()))

    def kind(self, suffix: str, m: str) -> Kind | None:
        d, kinds = self.index(suffix)
        return kinds[d[m]] if m in d else None

    def main_of(self, m: str) -> str:
        return next((s for s in MAINS if m in self.has(s)), "weight")

    def file_of(self, tensor: str) -> str | None:
        found = self.ckpt.tensor(tensor)
        return found[0] if found else None

    def add(self, code: str, message: str, tensor: str | None = None, file: str | None = None, drop: bool = False):
        file = file or (self.file_of(tensor) if tensor else None)
        self.hits[code].append(Hit(message, file=file, tensor=tensor,
                                   fix=DropTensor(file, tensor) if drop and file else None))

    # --- the rules ---

    def run(self) -> dict[str, list[Hit]]:
        r = resolve(self.ckpt)
        if r is None:
            return {}
        for p in r.problems:
            self.add("SRV001", p, file=r.source)
        if r.usable and (r.layout is not None or r.groups):
            self.T = _scan(self.ckpt)
            self.linears(r)
            if r.kv:
                self.kv_scales(r)
        return dict(self.hits)

    def stored(self) -> tuple[list[tuple], list[set[str]], set[str], list[str]]:
        """The linears by how they are stored: (groups of (main suffix, kind, modules), the module
        sets of the quantized groups, float modules carrying quantization tensors, 2-D float
        modules without any: few in a quantized checkpoint)."""
        T = self.T
        packed = self.has("weight_packed") | self.has("qweight")  # a set
        groups = [(s, k, ms) for s in MAINS for k, ms in T[s].items()]
        if packed:  # a packed main tensor wins over a stray `weight` (reported by the contract)
            groups = [(s, k, [m for m in ms if m not in packed] if s == "weight" else ms) for s, k, ms in groups]
        qsets: list[set[str]] = []
        plain: list[tuple[bool, list[str]]] = []  # float `weight` groups: (2-D, modules)
        for s, k, ms in groups:
            if k[0] in F.QUANT_DTYPES or s != "weight":
                qsets.append(set(ms))
            else:
                plain.append((len(k[1]) == 2, ms))
        # Float modules are few and the evidence lists long (a scale per quantized weight).
        candidates = {m for _, ms in plain for m in ms}
        float_q = set().union(*(self.among(e, candidates) for e in F.EVIDENCE))
        floats = [m for two_d, ms in plain if two_d for m in ms if m not in float_q]
        return groups, qsets, float_q, floats

    def linears(self, r: Resolved) -> None:
        T = self.T
        groups, qsets, float_q, floats = self.stored()
        stored_q = _Members([*qsets, float_q])
        single = r.layout if r.layout is not None else r.groups[0][1]  # the layout when there is one
        if inferred(r):  # GPTQ/AWQ without lists: vLLM infers the quantized set from these very dtypes
            unq, layout_of = dict.fromkeys(floats, "inferred unquantized from its dtypes"), None
        else:
            unq, layout_of = classify(r, stored_q, floats)
        forced = modelopt_exact_splits(r, [m for m in unq if m.endswith(FUSED_TAILS)]) if r.family == "modelopt" else set()
        split = self.fused_groups(r, single, stored_q, unq, floats, forced)
        # Built unquantized but stored quantized (SRV005); quantization tensors on a module built
        # and stored unquantized have no parameter (SRV006).
        for m in sorted(m for m in unq if m in stored_q):
            if fused_name(m) not in split:
                q = next((s for s in sorted(F.EVIDENCE) if m in self.has(s)), "weight_scale")
                self.add("SRV005", f"{r.family}: {m} is stored quantized but {r.source} leaves it unquantized "
                         f"({unq[m]}): vLLM 0.33 builds it unquantized and raises ValueError: There is no module or "
                         f"parameter named '{m}.{q}'", tensor=m, file=self.file_of(f"{m}.{self.main_of(m)}"))
        strays = {m for m in unq if m not in stored_q}
        for s in sorted(F.QUANT_SUFFIXES):
            for m in sorted(self.among(s, strays)) if T[s] else ():
                t = f"{m}.{s}"
                self.add("SRV006", f"{r.family}: {t} on a module vLLM builds unquantized ({unq[m]}): "
                         + NO_PARAM.format(t=t), tensor=t, drop=True)
        # Built quantized but stored as a float weight.
        for m in sorted(m for m in floats if m not in unq):
            if fused_name(m) in split:
                continue
            layout = layout_of(m) if layout_of else single
            self.add("SRV005", f"{r.family}: {m} is stored unquantized ({self.kind('weight', m)[0]}) but "
                     f"{layout.label} is declared for it and nothing excludes it: vLLM 0.33 builds the quantized "
                     "parameters and " + _float_into_quantized(layout), tensor=m, file=self.file_of(f"{m}.weight"))
        # Built and stored quantized: the contract, per (layout, main tensor kind).
        quantized = iter(qsets)
        for s, kind, ms in groups:
            q = next(quantized) if kind[0] in F.QUANT_DTYPES or s != "weight" else float_q.intersection(ms)
            if unq:
                q = q.difference(unq)
            if not q:
                continue
            if layout_of is None:
                self.contract(single, s, kind, q)
                continue
            per_layout: dict[Layout, set] = defaultdict(set)
            for m in q:
                per_layout[layout_of(m)].add(m)
            for layout, lq in per_layout.items():
                self.contract(layout, s, kind, lq)

    def contract(self, layout: Layout, s: str, kind: Kind, modset: set[str]) -> None:
        """One format's contract over the modules sharing one main tensor kind."""
        T = self.T
        ms = F.main_suffix(layout)
        label = layout.label
        if s != ms and ms != "weight":
            for m in sorted(modset):
                self.add("SRV002", f"{label}: {m}.{ms} is missing: {label} stores the quantized weight as {ms} "
                         f"({F.MAIN_DTYPE[layout.kind]}), found {m}.{s}; {F.missing_effect(layout, ms, '.experts.' in m)}",
                         tensor=f"{m}.{ms}", file=self.file_of(f"{m}.{s}"))
            return
        want_dtype = F.MAIN_DTYPE[layout.kind]
        wants: list[F.Want] = []
        if kind[0] != want_dtype:
            for m in sorted(modset):
                self.add("SRV003", f"{label}: {m}.{s} is {kind[0]} {list(kind[1])}, expected {want_dtype}: vLLM 0.33 "
                         f"has no dtype check and {_float_into_quantized(layout)}", tensor=f"{m}.{s}")
            expected = set(F.QUANT_SUFFIXES)  # the format's dims cannot be read back: companions not judged
        else:
            wants, problem = F.wants(layout, kind[1])
            expected = {w.suffix for w in wants}
            if problem:
                for m in sorted(modset):
                    self.add("SRV004", f"{label}: {m}.{s} {list(kind[1])} {problem}", tensor=f"{m}.{s}")
                expected = set(F.QUANT_SUFFIXES)
        for w in wants:
            # Fast path: a module has at most one `<module>.<suffix>`, so when the companions of
            # fitting kinds cover every module, none is missing and none has another kind.
            fitting = sum(sum(map(modset.__contains__, ms)) for k, ms in T[w.suffix].items() if _fits(w, k))
            if fitting == len(modset):
                continue
            d, kinds = self.index(w.suffix)
            found = set(map(d.get, modset))  # the kind numbers of this companion; None: missing somewhere
            if w.required and None in found:
                for m in sorted(modset.difference(d)):
                    self.add("SRV002", f"{label}: {m}.{w.suffix} is missing ({label} needs {w.dtypes[0]} "
                             f"{_shape_text(w.shapes)}): {F.missing_effect(layout, w.suffix, '.experts.' in m)}",
                             tensor=f"{m}.{w.suffix}", file=self.file_of(f"{m}.{s}"))
            bad = {i for i in found if i is not None and not _fits(w, kinds[i])}
            for m in sorted(m for m in modset if d.get(m) in bad) if bad else ():
                k, t = kinds[d[m]], f"{m}.{w.suffix}"
                if k[0] not in w.dtypes:
                    self.add("SRV003", f"{label}: {t} is {k[0]}, expected {' or '.join(w.dtypes)}: vLLM 0.33 "
                             "copies it without a dtype check (copy_ casts the values into another format)", tensor=t)
                else:
                    self.add("SRV004", f"{label}: {t} has shape {list(k[1])}, expected {_shape_text(w.shapes)} for "
                             f"the weight {list(kind[1])}: vLLM 0.33 fails its shape assert (AssertionError) at load",
                             tensor=t)
        extra = (F.QUANT_SUFFIXES | {"weight"}) - expected - {ms} - set(F.TOLERATED.get(layout.kind, ()))
        for x in sorted(extra):
            if not T[x]:
                continue
            for m in sorted(self.has(x) & modset):
                t = f"{m}.{x}"
                why = " (dynamic activations)" if x in ("input_scale", "input_global_scale") else \
                    " (symmetric scheme)" if x.endswith("zero_point") else f" (stored next to {ms})" if x in MAINS else ""
                self.add("SRV006", f"{label}: {t} is not part of {label}{why}: " + NO_PARAM.format(t=t),
                         tensor=t, drop=True)

    def fused_groups(self, r: Resolved, single: Layout, stored_q: _Members, unq: dict, floats: list,
                     forced: set[str]) -> set[str]:
        """SRV008: shards of one fused layer must all be quantized or all not, in the config and in
        the tensors (quant_utils.is_layer_skipped / compressed-tensors should_ignore_layer). Only a
        fused layer with an odd shard (unquantized or excluded) can differ: those are few. `forced`:
        fused layers the config splits by itself (ModelOpt's exact entries)."""
        float_set = set(floats)
        odd = [m for m in float_set.union(unq) if m.endswith(FUSED_TAILS)]
        split: set[str] = set()
        for m in sorted(odd):
            f = fused_name(m)
            if f is None or f in split:
                continue
            shards = [s for s in siblings(m) if s in stored_q or s in float_set]
            states = [(s in stored_q, s in unq) for s in shards]
            if f not in forced and (len(shards) < 2 or len(set(states)) == 1):
                continue
            split.add(f)
            where = ", ".join(f"{s.rpartition('.')[2]} {'quantized' if q else 'unquantized'}"
                              f"{' (excluded)' if x else ''}" for s, (q, x) in zip(shards, states))
            if f in forced or len({x for _, x in states}) > 1:  # the config splits the layer: refused at start-up
                err = "raises " + (f"ValueError: Found different quantization schemes for the shards of {f}. "
                                   "vLLM requires all to use the same scheme." if r.family == "compressed-tensors" else
                                   f"ValueError: Detected some but not all shards of {f} are quantized. All shards "
                                   "of fused layers to have the same precision.")
            elif states[0][1]:
                err = ("builds the fused layer unquantized and has no parameter for the quantized shards' tensors "
                       "(ValueError: There is no module or parameter named ...)")
            else:
                err = "builds the fused layer quantized and " + _float_into_quantized(single)
            if f in forced:  # the shard the list names exactly
                odd_one = next((x for x in siblings(m) if x in r.exclude and x in shards), m)
            else:  # the shard unlike the others
                odd_one = min(zip(shards, states), key=lambda p: states.count(p[1]))[0]
            self.add("SRV008", f"{r.family}: shards of the fused layer {f} differ: {where}; vLLM 0.33 {err}",
                     tensor=odd_one, file=self.file_of(f"{odd_one}.{self.main_of(odd_one)}"))
        return split

    def kv_scales(self, r: Resolved) -> None:
        """SRV007: the KV-cache scales vLLM maps (base_config.get_cache_scale_mapper, §2.7)."""
        tails = tuple(f".{t}" for t in (*QKV, "qkv_proj"))
        attn = sorted({m.rpartition(".")[0] for ms in self.T["weight"].values() for m in ms if m.endswith(tails)})
        kv = r.raw.get("kv_cache_scheme")
        heads_ok = isinstance(kv, dict) and kv.get("strategy") == "attn_head"
        for a in attn:
            for scale in ("k_scale", "v_scale"):
                names = (f"{a}.{scale[0]}_proj", f"{a}.qkv_proj", a)
                holder = next((n for n in names if n in self.has(scale)), None)
                if holder is None:
                    old = next((n for n in (a, f"{a}.k_proj") if n in self.has("kv_scale")), None)
                    if old is not None:
                        if scale == "k_scale":
                            self.add("SRV007", f"{r.family}: {old}.kv_scale is the deprecated single KV scale: vLLM "
                                     "0.33 warns 'DEPRECATED. Found kv_scale in the checkpoint' and uses it for both k "
                                     "and v", tensor=f"{old}.kv_scale")
                        continue
                    self.add("SRV007", f"{r.family}: KV-cache quantization is declared but {a} has no {scale} (looked "
                             f"for {names[0]}.{scale}, {names[1]}.{scale}, {a}.{scale}): vLLM 0.33 falls back to 1.0 "
                             "with the warning 'Using KV cache scaling factor 1.0 for fp8_e4m3'", tensor=a,
                             file=self.file_of(f"{names[0]}.weight"))
                    continue
                dtype, shape, _ = self.kind(scale, holder)
                t = f"{holder}.{scale}"
                numel = 1
                for d in shape:
                    numel *= d
                if numel != 1 and not (heads_ok and len(shape) == 3 and shape[1:] == (1, 1)):
                    self.add("SRV007", f"{r.family}: {t} has shape {list(shape)}, not a scalar: vLLM 0.33 raises "
                             f"ValueError: KV-cache scale expects a scalar weight, got shape {list(shape)}", tensor=t)
                elif dtype not in F.FLOAT:
                    self.add("SRV007", f"{r.family}: {t} is {dtype}, not a float scale", tensor=t)


class _Members:
    """A union of sets, for membership and iteration without building it (45k names on DeepSeek)."""

    def __init__(self, sets: list[set[str]]):
        self.sets = sets

    def __contains__(self, m: str) -> bool:
        return any(m in s for s in self.sets)

    def __iter__(self):
        for s in self.sets:
            yield from s


def _fits(w: F.Want, kind: Kind) -> bool:
    return kind[0] in w.dtypes and (w.shapes is None or kind[1] in w.shapes)


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


def _scan(ckpt: Checkpoint) -> dict[str, dict[Kind, list[str]]]:
    """suffix -> {kind: [modules]} for the tensor names the contracts use, from the header columns
    (no TensorEntry per tensor). Each shard's names are first dealt into buckets by their kind
    number at C speed; a bucket whose names all end in one suffix (the usual case: all F8 weights of
    one shape, all their scales) is cut to module names in one go, a mixed one (per-tensor scalars)
    name by name."""
    T: dict[str, dict[Kind, list[str]]] = {s: {} for s in SUFFIXES}   # every suffix present, maybe empty
    for h in ckpt.headers().values():
        cols = columns(h)
        if cols is None:
            names = list(h.tensors)
            kinds = [(e.dtype, tuple(e.shape), e.end - e.begin) for e in h.tensors.values()]
            ids = range(len(names))
        else:
            names, kinds, ids = cols[3], cols[4], cols[5]
        buckets: list[list[str]] = [[] for _ in kinds]
        deal(names, ids, buckets)
        for kind, b in zip(kinds, buckets):
            if not b:
                continue
            suffix = b[0].rpartition(".")[2]
            joined = "\n".join(b) + "\n"
            if joined.count("\n") == len(b) and joined.count(f".{suffix}\n") == len(b):  # one suffix
                if suffix in SUFFIXES:
                    T[suffix].setdefault(kind, []).extend(map(itemgetter(slice(0, -len(suffix) - 1)), b))
                continue
            for name in b:
                mod, _, suffix = name.rpartition(".")
                if suffix in SUFFIXES:
                    T[suffix].setdefault(kind, []).append(mod)
    return T

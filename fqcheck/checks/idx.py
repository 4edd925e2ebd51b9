"""IDX: model.safetensors.index.json against the shards it names and the files beside it.

What the loaders do with the index (read from their code):
- transformers (utils/hub.py get_checkpoint_shard_files) reads index["metadata"] and the *set* of
  weight_map values, opens each of those files and loads every tensor in them (a later file wins
  a duplicate name); accelerate-style disk offload looks tensors up through weight_map.
- vLLM (weight_utils.filter_duplicate_safetensors_files) loads only the *.safetensors files that
  weight_map names when the index exists, and every *.safetensors in the folder when it does not.
So the index decides which files are read at all; the per-tensor mapping matters to the tools that
use it for lookups. Nothing here opens a path that escapes the checkpoint directory (IDX009).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from typing import Iterator

from ..catalog import schema_path
from ..checkpoint import INDEX_NAME, Checkpoint, SafetensorsHeader
from ..checkpoint import safetensors as st
from ..checkpoint.columns import deal
from ..engine import Context, Hit, check
from ..fixer.index import total_size
from ..names import is_quantizer_state
from ..fixer.edits import DropTensor, RebuildIndex, RetireFile

SCHEMA = "index.schema.json"
CHUNK = 8 << 20  # bytes compared at a time when two copies of a tensor are checked for equality
_MAX_SCHEMA_ERRORS = 5


@dataclass
class IndexView:
    """The index as the loaders would use it, and which shard files can be trusted and read."""
    present: bool = False                 # an index file exists
    problems: list[str] = field(default_factory=list)  # IDX002
    entries: dict[str, str] = field(default_factory=dict)  # tensor -> normalized path, string values
    weight_map: dict[str, str] | None = None  # the same when the index is valid, else None
    total_size: int | None = None         # metadata.total_size, when it is a valid integer
    members: list[str] = field(default_factory=list)  # shards loaders read (normalized, sorted)
    escapes: dict[str, str] = field(default_factory=dict)  # path -> why it escapes (IDX009)
    missing: dict[str, str] = field(default_factory=dict)  # member path -> why it cannot be read
    shards: dict[str, SafetensorsHeader] = field(default_factory=dict)  # member -> header (safe, exists)
    referenced: set[str] = field(default_factory=set)  # the distinct (normalized) entries values

    @property
    def usable(self) -> bool:
        return self.weight_map is not None

    # Computed once for the checks that share them: ~90k names on a large checkpoint.
    @cached_property
    def readable(self) -> dict[str, SafetensorsHeader]:
        return {f: h for f, h in self.shards.items() if h.readable}

    @cached_property
    def held(self) -> set[str]:
        """Every tensor name the readable shards hold."""
        return set().union(*(h.names for h in self.readable.values()))

    @cached_property
    def repeats(self) -> bool:
        """Some tensor name is held by more than one readable shard."""
        if self.usable and self.exact:
            return False  # each name maps to the one shard that holds it
        return len(self.held) != sum(len(h.names) for h in self.readable.values())

    @cached_property
    def exact(self) -> bool:
        """The usual, clean case, when IDX004 and IDX005 have nothing: the index maps each tensor
        of each readable shard to that shard, and has no other entry. The index's names are dealt
        out to the shards they are mapped to, and each shard's are compared with its header's: as
        they come (an index and headers both sorted by name agree at once), else both sorted. Cheaper
        than a lookup per name in a 90k-entry map, whose entries lie all over memory."""
        wm = self.weight_map
        if len(wm) != sum(len(h.names) for h in self.readable.values()):
            return False
        dealt: dict[str, list[str]] = {f: [] for f in self.readable}
        try:
            deal(wm, wm.values(), dealt)
        except KeyError:  # an entry names a shard that is missing or unreadable
            return False
        return all(dealt[f] == h.names or sorted(dealt[f]) == sorted(h.names)
                   for f, h in self.readable.items())


def index_view(ckpt: Checkpoint) -> IndexView:
    """Computed once per Checkpoint and shared by the IDX checks."""
    return ckpt.once("idx.view", lambda: _build(ckpt))


def _build(ckpt: Checkpoint) -> IndexView:
    v = IndexView()
    idx = ckpt.index
    raw_paths: list[str] = []
    norm: dict[str, str] = {}
    if idx is not None:
        v.present = True
        if idx.error:
            v.problems.append(idx.error)
        else:
            data = idx.data
            wm = data.get("weight_map") if isinstance(data, dict) else None
            good, all_good = _paths(wm) if isinstance(wm, dict) else (set(), False)
            v.problems = _schema_problems(data, all_good)
            if isinstance(wm, dict):
                raw_paths = sorted(good)
                for raw in raw_paths:  # even in a broken index, an escaping path is reported (IDX009)
                    why = ckpt.escape(raw)
                    if why:
                        v.escapes[raw] = why  # kept as written: normalizing would hide the '..'
                # a few hundred distinct files for 100k entries: normalize each once
                norm = {s: s if s in v.escapes else _norm(s) for s in good}
                v.referenced = set(norm.values())
                if all_good and all(norm[s] == s for s in good):
                    v.entries = wm  # the usual index: every value already a plain file name
                elif all_good:
                    v.entries = {t: norm[s] for t, s in wm.items()}
                else:
                    v.entries = {t: norm[s] for t, s in wm.items() if _path_string(s)}
                if not v.problems:  # a broken index is rebuilt whole: no per-entry findings
                    v.weight_map = v.entries
            meta = data.get("metadata") if isinstance(data, dict) else None
            if isinstance(meta, dict) and _size_value(meta.get("total_size")) is not None:
                v.total_size = _size_value(meta["total_size"])
    if v.usable:
        v.members = sorted({norm[s] for s in raw_paths if s not in v.escapes})
    else:
        v.members = list(ckpt.safetensors_names)  # no usable index: loaders glob *.safetensors
    # A top-level link that leads outside is never read either (the read side leaves it out of
    # ckpt.names), index or not; reported here.
    for name, real in ckpt.outside.items():
        v.escapes.setdefault(name, f"is a link that resolves to {real}, outside the checkpoint directory")
    v.members = sorted(m for m in v.members if m not in v.escapes)
    for name in v.members:
        why = None if name in ckpt.listed else _unreadable_path(os.path.join(ckpt.root, name))
        if why is None and not name.endswith(".safetensors"):
            why = NOT_SAFETENSORS  # e.g. config.json or pytorch_model.bin: never parsed as a shard
        if why:
            v.missing[name] = why
        else:
            v.shards[name] = ckpt.header(name)
    return v


# ---- paths ------------------------------------------------------------------------------------

_NOT_A_NAME = re.compile("[\x00\ud800-\udfff]")  # NUL or a lone surrogate (JSON allows "\\ud800")


def _path_string(s) -> bool:
    """An index value a loader could join with the directory (same test as the schema's)."""
    return isinstance(s, str) and s != "" and not _NOT_A_NAME.search(s)


def _clean(s: str | None) -> str | None:
    """Text safe to print: hostile names may hold lone surrogates, which UTF-8 output refuses."""
    if s is None:
        return None
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _hit(message: str, file: str | None = None, tensor: str | None = None, **kw) -> Hit:
    return Hit(_clean(message), file=_clean(file), tensor=_clean(tensor), **kw)


def _paths(wm: dict) -> tuple[set[str], bool]:
    """The distinct weight_map values that are usable file names, and whether all values are."""
    try:
        vals = set(wm.values())  # a few hundred distinct files for 100k entries
    except TypeError:  # a list or object among the values
        return {s for s in wm.values() if _path_string(s)}, False
    good = {s for s in vals if _path_string(s)}
    return good, len(good) == len(vals)


def _norm(s: str) -> str:
    return os.path.normpath(s)


NOT_SAFETENSORS = "is not a safetensors file"


def _unreadable_path(p: str) -> str | None:
    try:
        if os.path.isfile(p):
            return None
        if os.path.islink(p):
            return "is a dangling link" if not os.path.exists(p) else "is not a regular file"
        return "is not a regular file" if os.path.lexists(p) else "does not exist"
    except (OSError, ValueError):
        return "cannot be accessed"


# ---- schema -----------------------------------------------------------------------------------

def _size_value(x) -> int | None:
    """metadata.total_size as JSON Schema's non-negative "integer" accepts it (1.0 is an integer)."""
    if type(x) is int and x >= 0:
        return x
    if type(x) is float and x >= 0 and x.is_integer():
        return int(x)
    return None


def _schema_problems(data, all_good: bool) -> list[str]:
    """Schema violations, bounded: jsonschema (imported only when something is wrong) sees the
    index with weight_map cut down to its first bad entries, so a hostile 5M-entry map stays cheap.
    all_good: every weight_map value is a usable file name (see _paths)."""
    probe, nbad = data, 0
    if isinstance(data, dict) and isinstance(data.get("weight_map"), dict):
        wm = data["weight_map"]
        if all_good:
            bad = []  # every distinct value is a file name: no need to look at 100k entries
        else:
            bad = [(k, val) for k, val in wm.items() if not _path_string(val)]
        nbad = len(bad)
        meta = data.get("metadata")
        meta_ok = isinstance(meta, dict) and ("total_size" not in meta or _size_value(meta["total_size"]) is not None)
        if not bad and meta_ok:
            return []  # the fast path: exactly what the schema accepts
        probe = {k: val for k, val in data.items() if k in ("metadata", "weight_map")}
        probe["weight_map"] = dict(islice(bad, _MAX_SCHEMA_ERRORS))
    from .declarative import schema_errors
    try:
        errors = schema_errors(probe, schema_path(SCHEMA), limit=_MAX_SCHEMA_ERRORS)
    except RecursionError:
        errors = ["(root): nested too deeply to validate"]
    if not errors:  # cannot happen while _path_string/_size_value match the schema
        errors = ["(root): does not match the index schema"]
    if nbad > _MAX_SCHEMA_ERRORS:
        errors.append(f"... {nbad} weight_map entries in all are not shard file names")
    return [_shorten(_BAD_NAME_MSG.sub("is not a usable file name (NUL or invalid Unicode)", e)) for e in errors]


_BAD_NAME_MSG = re.compile(r"does not match '\^\[\^.*\]\*\$'$")


def _shorten(s: str, n: int = 160) -> str:
    """Keep both ends: the path in front and jsonschema's verdict ("is not of type ...") at the back."""
    return s if len(s) <= n else s[: n // 2] + " ... " + s[-(n // 2):]


# ---- the expected total_size ----------------------------------------------------------------------

def expected_total_size(ckpt: Checkpoint, files: list[str] | None = None) -> int | None:
    """metadata.total_size as transformers/huggingface_hub would write it for these shards.

    split_state_dict_into_shards_factory sums get_torch_storage_size (untyped_storage().nbytes())
    once per storage; save_pretrained has already dropped tied duplicates, and safetensors stores
    each remaining tensor contiguously, so the value is the sum of the stored tensors' byte sizes,
    each tensor name counted once. `files` defaults to the shards loaders read. None when one of
    them is missing or unreadable (the figure cannot be known)."""
    v = index_view(ckpt)
    if files is None and len(v.readable) == len(v.members) and not v.repeats:
        return sum(h.tensor_bytes for h in v.readable.values())  # the usual case, from shared sets
    files = v.members if files is None else files
    unique: dict = {}
    for f in files:
        h = v.shards.get(f)
        if h is None and f in ckpt.safetensors_names and f not in v.escapes:
            h = ckpt.header(f)  # e.g. a top-level shard the rebuilt index will name
        if h is None or not h.readable:
            return None
        for n, e in h.tensors.items():
            unique.setdefault(n, e)
    return total_size(unique.values())  # the one definition, shared with the index rebuild


# ---- helpers for the checks -----------------------------------------------------------------------

def _names_in(h: SafetensorsHeader):
    """Tensor names a header declares, including entries too broken to parse (SFT002)."""
    broken = {p.tensor for p in h.problems if p.tensor}
    return set(h.tensors) | broken if broken else h.tensors


def _unnamed_holder(ckpt: Checkpoint, v: IndexView, t: str) -> str | None:
    """A top-level file the index does not name that stores tensor t (read only if inside)."""
    for f in ckpt.safetensors_names:
        if f not in v.shards and f not in v.escapes and t in ckpt.header(f).tensors:
            return f
    return None


def _duplicates(shards: dict[str, SafetensorsHeader]) -> dict[str, list[str]]:
    """Tensor name -> the shards (sorted) that hold it, for names held by more than one."""
    where: dict[str, list[str]] = {}
    for f in sorted(shards):
        for t in shards[f].names:
            where.setdefault(t, []).append(f)
    return {t: fs for t, fs in where.items() if len(fs) > 1}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---- the checks -----------------------------------------------------------------------------------

@check("IDX001")
def missing_index(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    v = index_view(ckpt)
    if v.present or len(ckpt.safetensors_names) < 2:
        return
    files = ckpt.safetensors_names
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    yield _hit(f"{len(files)} safetensors files ({shown}) and no {INDEX_NAME}: transformers looks for "
                "model.safetensors alone (OSError when it is absent, the other files silently ignored when "
                "present) and vLLM loads every *.safetensors file, stale ones included; rebuild the index "
                "from the shard headers", file=INDEX_NAME, fix=RebuildIndex())


@check("IDX002")
def bad_index(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    v = index_view(ckpt)
    if not v.problems:
        return
    what = "; ".join(v.problems)
    yield _hit(f"{INDEX_NAME} is unusable: {what}. transformers fails reading it (JSONDecodeError, "
                "KeyError: 'metadata'/'weight_map' or TypeError) and so does vLLM; rebuild it from the "
                "shard headers", file=INDEX_NAME, fix=RebuildIndex())


@check("IDX003")
def missing_shard(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    v = index_view(ckpt)
    if not v.usable or not v.missing:
        return
    counts: dict[str, int] = {}
    for f in v.weight_map.values():
        if f in v.missing:
            counts[f] = counts.get(f, 0) + 1
    for f, n in sorted(counts.items()):
        if v.missing[f] == NOT_SAFETENSORS:  # loaders torch.load it, or skip it (`fqcheck explain IDX003`)
            yield _hit(f"the index maps {_plural(n, 'tensor')} to {f}, which {NOT_SAFETENSORS}; point the "
                        "entries at the safetensors shards that hold the tensors", file=f)
            continue
        yield _hit(f"the index maps {_plural(n, 'tensor')} to {f}, which {v.missing[f]}: transformers 5 "
                    "and vLLM 0.32 raise FileNotFoundError; restore the file (re-download or re-export)", file=f)


@check("IDX004")
def entry_not_in_shard(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    v = index_view(ckpt)
    if not v.usable or v.exact:
        return
    shards = v.readable
    names = {f: _names_in(h) for f, h in shards.items()}
    holders: dict[str, list[str]] | None = None
    for t, f in v.weight_map.items():
        if f not in shards or t in names[f]:
            continue
        if holders is None:
            holders = {}
            for g, ns in names.items():
                for n in ns:
                    holders.setdefault(n, []).append(g)
        where = holders.get(t)
        stray = None if where else _unnamed_holder(ckpt, v, t)
        if where:
            msg = (f"the index maps {t} to {f}, but it is stored in {where[0]}: lookups through the "
                   "index (transformers' disk offload, accelerate) fail with 'File does not contain "
                   "tensor'; rebuild the index")
        elif stray:
            msg = (f"the index maps {t} to {f}, but it is stored only in {stray}, which the index does "
                   "not name, so loaders never read it: transformers reports it MISSING and initializes "
                   "it randomly, vLLM raises 'Following weights were not initialized from checkpoint'; "
                   "rebuild the index")
        else:
            msg = (f"the index maps {t} to {f}, but no shard the index names holds it: transformers "
                   "reports it MISSING and initializes it randomly, vLLM raises 'Following weights were "
                   "not initialized from checkpoint'; rebuild the index (and re-export if the weight is needed)")
        yield _hit(msg, file=f, tensor=t, fix=RebuildIndex())


@check("IDX005")
def tensor_not_in_index(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    v = index_view(ckpt)
    if not v.usable or v.exact:
        return
    listed = v.weight_map.keys()
    for f, h in v.readable.items():
        if all(map(listed.__contains__, h.names)):  # at C speed
            continue
        for t in [t for t in h.names if t not in listed]:
            yield _hit(f"{t} is stored in {f} but the index does not list it: transformers and vLLM "
                        "still load it with the file, but anything that reads tensor names from the "
                        "index (disk offload, conversion scripts, layer filters) misses it; rebuild the index",
                        file=f, tensor=t, fix=RebuildIndex())


@check("IDX006")
def duplicate_tensor(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    v = index_view(ckpt)
    if not v.repeats:
        return
    shards = v.readable
    dups = _duplicates(shards)
    opened: dict[str, object] = {}
    try:
        for t in sorted(dups):
            files = dups[t]
            named = (v.weight_map or {}).get(t)
            keep = named if named in files else files[0]
            for other in files:
                if other == keep:
                    continue
                same, why = _same_bytes(shards[keep], shards[other], t, opened)
                if same:
                    yield _hit(f"{t} is stored in both {keep} and {other} with identical bytes: the copy "
                                f"in {other} is dead weight that loaders read twice; drop it from {other}",
                                file=other, tensor=t, fix=DropTensor(other, t))
                else:
                    yield _hit(f"{t} is stored in both {keep} and {other} and the copies differ ({why}): "
                                "whichever file a loader reads last silently wins (transformers: the later "
                                "shard by name; vLLM: load order), so the model depends on file order; "
                                "decide which copy is right and re-export",
                                file=other, tensor=t, fixable="no")
    finally:
        for sd in opened.values():
            sd.close()


def _same_bytes(ha: SafetensorsHeader, hb: SafetensorsHeader, t: str, opened: dict) -> tuple[bool, str]:
    a, b = ha.tensors[t], hb.tensors[t]
    if a.dtype != b.dtype or a.shape != b.shape:
        return False, f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if a.nbytes != b.nbytes:
        return False, "different byte sizes"
    for h in (ha, hb):
        if h.problems_of(st.BUFFER) or h.problems_of(st.UNREADABLE):
            return False, f"{h.path.name} is damaged (SFT004), its bytes cannot be compared"
    from ..checkpoint.data import ShardData
    try:
        sa = opened.get(ha.path) or opened.setdefault(ha.path, ShardData(ha))
        sb = opened.get(hb.path) or opened.setdefault(hb.path, ShardData(hb))
        va, vb = sa.view(a), sb.view(b)
        try:
            for off in range(0, a.nbytes, CHUNK):
                if bytes(va[off:off + CHUNK]) != bytes(vb[off:off + CHUNK]):
                    return False, f"bytes differ from offset {off} on"
        finally:
            va.release()
            vb.release()
    except (OSError, ValueError) as e:
        return False, f"cannot read the data: {e}"
    return True, ""


@check("IDX007")
def wrong_total_size(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    v = index_view(ckpt)
    if not v.usable or v.total_size is None or v.missing:
        return
    if any(f in v.escapes for f in set(v.weight_map.values())):
        return  # a shard we will not open: its size is unknown
    expected = expected_total_size(ckpt)
    if expected is None or expected == v.total_size:
        return
    yield _hit(f"metadata.total_size is {v.total_size} but the shards the index names hold {expected} "
                "bytes of tensor data: loaders do not check it, but tools that size downloads or memory "
                "from it are misled, and it usually means the index was written for other shards; "
                "rebuild the index", file=INDEX_NAME, fix=RebuildIndex())


@check("IDX008")
def stale_shard(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    v = index_view(ckpt)
    if not v.usable:
        return
    for f in ckpt.safetensors_names:
        if f in v.referenced or f in v.escapes:
            continue
        h = ckpt.header(f)
        if not h.readable:
            yield _hit(f"{f} is not named by the index and its header is unreadable: loaders that follow "
                        "the index skip it; check what it is before removing it", file=f, fixable="no")
            continue
        # Stale only if every tensor it holds is also held by a shard the index names: otherwise
        # retiring it would lose the only copy (e.g. an index entry pointed at the wrong file).
        only_here = [t for t in h.names if t not in v.held]
        if only_here and all(map(is_quantizer_state, only_here)):
            # all it alone holds is leaked quantizer state, which QNT001's fix drops anyway
            yield _hit(f"{f} is not named by the index (stale, from an earlier export); what only it holds "
                       f"is leaked quantizer state ({_plural(len(only_here), 'tensor')}, e.g. {only_here[0]}), "
                       "which the QNT001 fix drops anyway: retire the file", file=f, fix=RetireFile(f))
        elif only_here:
            yield _hit(f"{f} is not named by the index but holds {_plural(len(only_here), 'tensor')} that "
                        f"no named shard holds (e.g. {only_here[0]}): transformers and vLLM ignore the file "
                        "while the index exists, so those weights are not loaded; either the file or the "
                        "index is stale: check which is current (rebuilding the index would include it)",
                        file=f, fixable="no")
        else:
            # why it matters (uploaded with the model, globbed when the index is missing): IDX008's page
            yield _hit(f"{f} is not named by the index (stale, from an earlier export); every tensor it "
                        "holds is in a named shard: retire the file", file=f, fix=RetireFile(f))


@check("IDX009")
def escaping_path(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    v = index_view(ckpt)
    if not v.escapes:
        return
    counts: dict[str, int] = {}
    for f in v.entries.values():
        if f in v.escapes:
            counts[f] = counts.get(f, 0) + 1
    for f, why in sorted(v.escapes.items()):
        n = counts.get(f)
        named = f"the index maps {_plural(n, 'tensor')} to {f}, which" if n else f"{f}"
        yield _hit(f"{named} {why}: loaders join it with the model folder and read whatever it reaches, "
                    "so the checkpoint is not self-contained (copies and uploads lose the file) and a "
                    "crafted index can make them read any file on the host; fqcheck does not open it (no "
                    f"other rule sees its content). Move the {'shard' if n or f.endswith('.safetensors') else 'file'} "
                    "into the checkpoint folder and name it by a plain relative path", file=f)

"""Strict, pure-Python safetensors header reader.

Validates what the reference Rust reader validates (safetensors/src/tensor.rs: header length vs
file size and the 100 MB cap, UTF-8 JSON object, dtype, shape, offsets contiguous from 0, byte size
= numel x itemsize, buffer ends at end of file) but, instead of stopping at the first error, records
every problem with its kind so each maps to one rule. It never reads or allocates more than the
real header bytes, whatever the header claims.
"""
from __future__ import annotations

import json
import os
import struct
from collections import Counter
from collections.abc import Iterable
from functools import cached_property
from itertools import accumulate, chain, compress, repeat
from math import prod
from operator import attrgetter, itemgetter, sub
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

MAX_HEADER_SIZE = 100_000_000  # the reference reader's cap
_U64_LIMIT = 1 << 64

# Bits per element, as the reference reader knows them (sub-byte types pack).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})

# Problem kinds; each is reported by one SFT rule.
UNREADABLE = "unreadable"  # SFT001
BAD_ENTRY = "entry"        # SFT002
OVERLAP = "overlap"        # SFT003
BUFFER = "buffer"          # SFT004
DUPLICATE = "duplicate"    # SFT005
METADATA = "metadata"      # SFT006


class TensorEntry(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data buffer
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return prod(self.shape)


class Problem(NamedTuple):
    kind: str
    message: str
    tensor: str | None = None


class SafetensorsHeader:
    """One file's header: what it declares and what is wrong with it.

    A header read by the fast path keeps its entries as columns: the names, and per name an index
    into the few distinct (dtype, shape) kinds. `tensors` builds the TensorEntry objects on first
    use: a header-only lint of a large checkpoint reads ~90k entries and needs few of them."""

    def __init__(self, path: Path, file_size: int, data_start: int = 0, metadata: dict | None = None):
        self.path = path
        self.file_size = file_size
        self.data_start = data_start  # absolute offset of the data buffer (8 + header length)
        self.metadata = metadata
        self.problems: list[Problem] = []
        # True when no name can hold a newline: the header's JSON holds no escape at all (a raw
        # control character is invalid JSON, which both parsers refuse). False: not known.
        self.newline_free = False
        # Set by the fast path: (kinds, ids, offsets). kinds: [(dtype, shape, nbytes)]; ids: each
        # name's kind number (bytes, or a list past 255 kinds); offsets: None when the entries lie
        # contiguous from 0 in name order (the sizes then give them), else (begins, ends).
        self._columns: tuple | None = None

    @cached_property
    def names(self) -> list[str]:
        """The tensor names, in header order (each entry whose offsets could be read)."""
        return list(self.tensors)

    @cached_property
    def joined(self) -> str:
        """The names, each followed by a newline: one text for the rules that scan ~90k names with
        str.count / `in` at C speed instead of name by name."""
        return "\n".join(self.names) + "\n" if self.names else ""

    @cached_property
    def tensors(self) -> dict[str, TensorEntry]:
        return _entries(self.names, *self._columns) if self._columns else {}

    def shapes(self) -> list[tuple[int, ...]]:
        """Each name's shape, in `names` order, from the columns without building the entries."""
        if self._columns is None:
            return [e.shape for e in self.tensors.values()]
        kinds, ids, _ = self._columns
        return list(map([k[1] for k in kinds].__getitem__, ids))

    def dtype_bytes(self, dtypes: Iterable[str] | None = None, skip_suffixes: tuple[str, ...] = ()) -> dict[str, int]:
        """Bytes of data per dtype (each dtype with an entry counted; only `dtypes` when given), from
        the entries' byte ranges, leaving out the names that end in one of `skip_suffixes`. At C
        speed on the columns (the count of each kind times its size), without building the entries;
        only the names of counted kinds are tested against the suffixes."""
        out: dict[str, int] = {}
        if self._columns is None:
            for e in self.tensors.values():
                if (dtypes is None or e.dtype in dtypes) and not e.name.endswith(skip_suffixes):
                    out[e.dtype] = out.get(e.dtype, 0) + e.end - e.begin
            return out
        kinds, ids, _ = self._columns
        wanted = [dtypes is None or k[0] in dtypes for k in kinds]
        if type(ids) is not list:  # bytes: few kinds, each counted by one bytes.count
            ids = bytes(ids)
            counts = {i: ids.count(i) for i, w in enumerate(wanted) if w}
        else:
            counts = {i: n for i, n in Counter(ids).items() if wanted[i]}
        skipped: dict[int, int] = {}
        if skip_suffixes and counts:
            names, kind_ids = self.names, ids
            if type(ids) is bytes:
                if len(counts) < len(kinds):  # the names of counted kinds only: mask and ids by bytes.translate
                    names = compress(names, ids.translate(bytes(wanted).ljust(256, b"\0")))
                    kind_ids = ids.translate(None, bytes(i for i, w in enumerate(wanted) if not w))
                # the kind numbers of the names that end in a suffix, as bytes: one bytes.count per kind
                hits = bytes(compress(kind_ids, map(str.endswith, names, repeat(skip_suffixes))))
                skipped = {i: hits.count(i) for i in counts}
            else:
                if len(counts) < len(kinds):  # the names of counted kinds only
                    mask = list(map(wanted.__getitem__, ids))
                    names, kind_ids = compress(names, mask), compress(ids, mask)
                skipped = Counter(compress(kind_ids, map(str.endswith, names, repeat(skip_suffixes))))
        for i, n in counts.items():
            n -= skipped.get(i, 0)
            if n:
                dtype, _, size = kinds[i]
                out[dtype] = out.get(dtype, 0) + n * size
        return out

    @property
    def readable(self) -> bool:
        return not any(p.kind == UNREADABLE for p in self.problems)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data the entries declare, each entry once. A header without problems
        covers its data buffer exactly (contiguous, no gap, no trailing byte): that size is the sum."""
        if not self.problems:
            return self.file_size - self.data_start
        return sum(e.end - e.begin for e in self.tensors.values())

    def problems_of(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def __eq__(self, other) -> bool:
        if not isinstance(other, SafetensorsHeader):
            return NotImplemented
        return ((self.path, self.file_size, self.data_start, self.metadata, self.problems, self.names, self.tensors)
                == (other.path, other.file_size, other.data_start, other.metadata, other.problems, other.names,
                    other.tensors))

    __hash__ = None  # mutable, compared by content

    def __repr__(self) -> str:
        return f"SafetensorsHeader({str(self.path)!r}, {len(self.names)} tensors, {len(self.problems)} problems)"


def _entries(names: list[str], kinds: list[tuple], ids, offsets) -> dict[str, TensorEntry]:
    """The TensorEntry of each name, from the columns (offsets None: contiguous from 0 in order)."""
    dtypes, shapes, sizes = (list(c) for c in zip(*kinds)) if kinds else ([], [], [])
    if offsets is None:
        ends = list(accumulate(map(sizes.__getitem__, ids)))
        begins = [0, *ends[:-1]] if ends else []
    else:
        begins, ends = offsets
    rows = zip(names, map(dtypes.__getitem__, ids), map(shapes.__getitem__, ids), begins, ends)
    return dict(zip(names, map(_new_entry, repeat(TensorEntry), rows)))


def columns(h: SafetensorsHeader) -> tuple | None:
    """A fast-path header as plain data (lists, tuples, bytes: what marshal carries), or None."""
    if h._columns is None:
        return None
    return (h.file_size, h.data_start, h.metadata, h.names, *h._columns, [tuple(p) for p in h.problems],
            h.newline_free)


def from_columns(path: Path, cols: tuple) -> SafetensorsHeader:
    size, data_start, metadata, names, kinds, ids, offsets, problems, newline_free = cols
    h = SafetensorsHeader(path, size, data_start, metadata)
    h.newline_free = newline_free
    h.names = names
    h._columns = (kinds, ids, offsets)
    h.problems = [Problem(*p) for p in problems]
    return h


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate one safetensors file's header. Never raises on bad content."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            hdr = SafetensorsHeader(path, size)
            if size < 8:
                return _unreadable(hdr, f"file is {size} bytes, shorter than the 8-byte length prefix")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_SIZE:
                return _unreadable(hdr, f"header length {n} exceeds the 100 MB cap")
            if 8 + n > size:
                return _unreadable(hdr, f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        hdr = SafetensorsHeader(path, 0)
        return _unreadable(hdr, f"cannot read file: {e.strerror or e}")
    hdr.data_start = 8 + n
    _parse(hdr, raw)
    return hdr


def _unreadable(hdr: SafetensorsHeader, message: str) -> SafetensorsHeader:
    hdr.problems.append(Problem(UNREADABLE, message))
    return hdr


def _pairs_keep_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dups = [k for k, _ in pairs if k in seen or seen.add(k)]
        d[_DUPS] = dups
    return d


_MISSING = object()
# Key under which the hook stores an object's repeated keys: not a str, so no JSON key can be it.
_DUPS = type("_Duplicates", (), {"__repr__": lambda self: "<duplicates>"})()


def _parse(hdr: SafetensorsHeader, raw: bytes) -> None:
    # A backslash first: one memchr finds most headers have no escape at all (~10x faster).
    hdr.newline_free = b"\\" not in raw
    if not hdr.newline_free and (b"\\ud" in raw or b"\\uD" in raw):  # maybe an escaped lone surrogate
        text = _text(hdr, raw)
        if text is None:
            return
        if _lone_surrogate(text):
            _unreadable(hdr, "header JSON has a lone UTF-16 surrogate escape (not valid Unicode); the reference reader rejects it")
            return
    # Fast path: msgspec checks UTF-8 and the types as it decodes each entry straight into a small
    # record (no dict per entry, about twice json.loads' speed), and an inlined check accepts only
    # fully valid, duplicate-free headers. Anything else (msgspec is stricter than json: NaN, huge
    # floats, bad UTF-8) is re-read by the exact slow path, so the problems reported are the same.
    obj = _decode_fast(raw)
    if obj is not None and _parse_fast(hdr, obj, raw):
        return
    obj = None  # free the first parse before the second
    text = _text(hdr, raw)
    if text is not None:
        _parse_slow(hdr, text)


def _text(hdr: SafetensorsHeader, raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _unreadable(hdr, f"header is not valid UTF-8 (byte {e.start})")
        return None


class _Entry(msgspec.Struct, gc=False):
    """One header entry as the fast path reads it, typed so that msgspec refuses (and the slow path
    then reports) a bool, float or non-pair where an int pair belongs. A missing key gets a default
    the fast path's own checks refuse (unknown dtype, a 0 dim, an end before its begin); keys it does
    not know are counted by _parse_fast's colon check."""
    dtype: str = ""
    shape: tuple[int, ...] = (0,)
    data_offsets: tuple[int, int] = (0, -1)


_ENTRIES = msgspec.json.Decoder(dict[str, _Entry])
_METADATA = msgspec.json.Decoder(dict[str, Any])
_META_KEY = b'{"__metadata__":'


def _decode_fast(raw: bytes) -> dict | None:
    """name -> _Entry, and "__metadata__" -> its value; None when msgspec refuses the header."""
    try:
        obj = _ENTRIES.decode(raw)
        if "__metadata__" in obj:  # it decoded as an _Entry of defaults: read its real value
            obj["__metadata__"] = _metadata(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    return obj


def _metadata(raw: bytes):
    """The __metadata__ object. Writers put it first, and its values are strings, so the object
    ends at the first '}' unless a string holds one; then the slice does not parse (an unclosed
    string) and the whole header is decoded for it instead."""
    if raw.startswith(_META_KEY):
        end = raw.find(b"}", len(_META_KEY))
        try:
            return _METADATA.decode(raw[len(_META_KEY):end + 1])
        except msgspec.DecodeError:
            pass
    return msgspec.json.decode(raw, type=_Whole).value


class _Whole(msgspec.Struct):
    value: Any = msgspec.field(name="__metadata__", default=None)


_new_entry = tuple.__new__
_get_dtype, _get_shape, _get_offsets = attrgetter("dtype"), attrgetter("shape"), attrgetter("data_offsets")


def _kind_bytes(kinds) -> list[int] | None:
    """The byte size of each distinct (dtype, shape) kind, in order, or None when one is not plainly
    valid (unknown dtype, a dim < 1, more than 8 dims, 2^64 elements or more, a fraction of a byte):
    the slow path then reports it exactly. A checkpoint has few kinds."""
    out = []
    for dtype, shape in kinds:
        bits = DTYPE_BITS.get(dtype)
        if bits is None or len(shape) > 8:
            return None
        numel = 1
        for d in shape:  # ints: msgspec typed them
            if d < 1:
                return None
            numel *= d
        if numel >= _U64_LIMIT or numel * bits % 8:
            return None
        out.append(numel * bits // 8)
    return out


class _Kinds(dict):
    """(dtype, shape) -> kind number, numbered in order of first appearance."""

    def __missing__(self, kind):
        n = self[kind] = len(self)
        return n


_by_range = itemgetter(3, 4)
_begin, _end = itemgetter(3), itemgetter(4)


def _parse_fast(hdr: SafetensorsHeader, obj: dict, raw: bytes) -> bool:
    """Fill `hdr` and return True when every entry is valid and no object in the JSON has a
    duplicate key; return False (leaving `hdr` untouched) when the slow path must decide.

    Duplicate keys, exactly, without an object_pairs_hook: outside strings a ':' only ever
    separates a key from its value, so the ':' in the text minus those inside strings count the
    keys written, at least one per distinct key json.loads kept. Inside strings a ':' is literal
    (counted from the decoded names and metadata; dtypes have none) or the escape \\u003a, which
    sends us to the slow path. Equality with the keys we know of (3 per entry) proves that no
    object repeats a key and no entry has extra keys. The count runs on the UTF-8 bytes: no
    multi-byte sequence holds the byte of ':'."""
    meta = obj.pop("__metadata__", _MISSING)  # obj is ours: the slow path parses afresh
    keys = len(obj)
    colons = 0
    if meta is not _MISSING:
        if type(meta) is not dict:
            return False
        for k, v in meta.items():
            if type(v) is not str:
                return False
            colons += k.count(":") + v.count(":")
        keys += 1 + len(meta)
    names = list(obj)
    first, sizes, ids, offsets = {}, [], b"", None
    # Every check runs over whole columns at C speed (map/list equality), not per entry in Python,
    # and per distinct (dtype, shape): this is ~90k entries on a DeepSeek-R1-sized checkpoint,
    # with a few dozen kinds. msgspec has already typed every dim and offset as an int.
    if names:
        infos = list(obj.values())
        pairs = list(map(_get_offsets, infos))
        # Each entry's kind number, in order of first appearance: one hash per entry, a C-level
        # lookup but for the few new kinds (_Kinds.__missing__ numbers them).
        first = _Kinds()
        try:
            ids = bytes(map(first.__getitem__, zip(map(_get_dtype, infos), map(_get_shape, infos))))
        except ValueError:  # a 256th kind
            first = _Kinds()
            ids = list(map(first.__getitem__, zip(map(_get_dtype, infos), map(_get_shape, infos))))
        sizes = _kind_bytes(first)
        if sizes is None:
            return False  # a kind _kind_bytes cannot vouch for: the slow path names the problem
        ends = list(accumulate(map(sizes.__getitem__, ids)))
        # The usual layout, contiguous from 0 in name order with each entry its kind's size, is one
        # comparison with the pairs it implies; any other layout is checked column by column.
        if pairs == list(zip(chain((0,), ends), ends)):
            if ends[-1] >= _U64_LIMIT:
                return False
            offsets = None  # the sizes say it all
        else:
            flat = list(chain.from_iterable(pairs))
            begins = flat[0::2]
            ends = flat[1::2]
            if list(map(sizes.__getitem__, ids)) != list(map(sub, ends, begins)):
                return False  # equal, they also prove begin < end
            contiguous = begins[0] == 0 and begins[1:] == ends[:-1]  # then begins rise from 0
            if not (ends[-1] < _U64_LIMIT if contiguous else min(begins) >= 0 and max(ends) < _U64_LIMIT):
                return False
            offsets = None if contiguous else (begins, ends)  # contiguous: the sizes say it all
    extra = raw.count(b":") - keys - 3 * len(names)
    if extra:  # colons inside strings, or duplicate keys: count the former exactly
        colons += sum(map(str.count, names, repeat(":")))
        if extra != colons or b"\\u003" in raw:
            return False  # maybe a duplicate key somewhere: the slow path names it
    _check_metadata(hdr, meta)
    hdr.names = names
    hdr._columns = ([(*kind, size) for kind, size in zip(first, sizes)], ids, offsets)
    data_size = hdr.file_size - hdr.data_start
    # Files written by safetensors list tensors in offset order: then contiguity needs no sort.
    if not (names and offsets is None and ends[-1] == data_size):
        _check_layout(hdr, list(hdr.tensors.values()), data_size)
    return True


def _parse_slow(hdr: SafetensorsHeader, text: str) -> None:
    try:
        obj = json.loads(text, object_pairs_hook=_pairs_keep_duplicates)
    except (ValueError, RecursionError) as e:
        _unreadable(hdr, f"header is not valid JSON: {str(e).splitlines()[0][:200]}")
        return
    if not isinstance(obj, dict):
        _unreadable(hdr, "header JSON is not an object")
        return

    for name in obj.pop(_DUPS, ()):
        hdr.problems.append(Problem(DUPLICATE, f"tensor name {name!r} appears more than once in the header", name))

    _check_metadata(hdr, obj.pop("__metadata__", _MISSING))
    data_size = hdr.file_size - hdr.data_start
    ranges: list[TensorEntry] = []
    tensors = hdr.tensors
    bad = hdr.problems.append
    for name, info in obj.items():
        entry = _entry(name, info, bad)
        if entry is not None:
            tensors[name] = entry
            ranges.append(entry)
    _check_layout(hdr, ranges, data_size)


def _check_metadata(hdr: SafetensorsHeader, meta) -> None:
    if meta is _MISSING or meta is None:  # the reference reader takes null as absent
        what = "missing" if meta is _MISSING else "null"
        hdr.problems.append(Problem(METADATA, f"__metadata__ is {what}; transformers expects {{\"format\": \"pt\"}}"))
        return
    if isinstance(meta, dict):
        meta.pop(_DUPS, None)  # a repeated metadata key: the reference reader keeps the last, so do we
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        hdr.problems.append(Problem(METADATA, "__metadata__ must map strings to strings; the reference reader rejects this header"))
        return
    meta.pop(_DUPS, None)
    hdr.metadata = meta
    if meta.get("format") != "pt":
        hdr.problems.append(Problem(METADATA, f"__metadata__ format is {meta.get('format')!r}, not 'pt'; transformers refuses to load it"))


def _is_uint(v) -> bool:
    return type(v) is int and 0 <= v < _U64_LIMIT


def _entry(name: str, info, bad) -> TensorEntry | None:
    """Validate one tensor entry; report problems through `bad`; return the entry if its offsets
    are usable for the layout checks (even when dtype/shape are wrong)."""
    if not isinstance(info, dict):
        bad(Problem(BAD_ENTRY, f"entry is a {type(info).__name__}, not an object", name))
        return None
    dups = info.pop(_DUPS, None)
    if dups:  # serde refuses a struct with a repeated field
        bad(Problem(BAD_ENTRY, f"entry repeats the key(s) {', '.join(map(repr, sorted(set(dups))))}", name))
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and _is_uint(offsets[0]) and _is_uint(offsets[1])):
        bad(Problem(BAD_ENTRY, f"data_offsets {_short(offsets)} is not a pair of unsigned 64-bit integers", name))
        return None
    begin, end = offsets
    if end < begin:
        bad(Problem(BAD_ENTRY, f"data_offsets [{begin}, {end}] end before they begin", name))
        return None
    if not (isinstance(shape, list) and all(_is_uint(d) for d in shape)):
        bad(Problem(BAD_ENTRY, f"shape {_short(shape)} is not a list of unsigned integers", name))
        return TensorEntry(name, str(dtype), (), begin, end)
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        bad(Problem(BAD_ENTRY, f"unknown dtype {_short(dtype)}", name))
        return TensorEntry(name, str(dtype), tuple(shape), begin, end)
    numel = 1
    for d in shape:  # stop early: a hostile shape must not build a huge integer
        numel *= d
        if numel >= _U64_LIMIT:
            bad(Problem(BAD_ENTRY, f"shape {_short(shape)} overflows 64-bit element count", name))
            return TensorEntry(name, dtype, tuple(shape), begin, end)
    nbits = numel * bits
    if nbits % 8:
        bad(Problem(BAD_ENTRY, f"{numel} elements of {dtype} is not a whole number of bytes", name))
    elif nbits // 8 != end - begin:
        bad(Problem(BAD_ENTRY, f"byte size {end - begin} != {numel} elements x {dtype} ({nbits // 8} bytes)", name))
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _check_layout(hdr: SafetensorsHeader, ranges: list[TensorEntry], data_size: int) -> None:
    ranges.sort(key=_by_range)
    if ranges:  # the usual case, at C speed: each range starts where the previous one ended
        begins = list(map(_begin, ranges))
        ends = list(map(_end, ranges))
        if begins[0] == 0 and ends[-1] == data_size and begins[1:] == ends[:-1]:
            return
    pos = 0
    last = None
    for e in ranges:
        if e.begin < pos:
            hdr.problems.append(Problem(OVERLAP, f"data [{e.begin}, {e.end}) overlaps {last.name!r} [{last.begin}, {last.end})", e.name))
        elif e.begin > pos:
            hdr.problems.append(Problem(BUFFER, f"{e.begin - pos} unused bytes before this tensor's data (gap at {pos})", e.name))
        if e.end > pos:
            pos, last = e.end, e
    if pos > data_size:
        who = last.name if last else None
        hdr.problems.append(Problem(BUFFER, f"file is truncated: data ends at byte {data_size} of the buffer but tensors need {pos}", who))
    elif pos < data_size:
        hdr.problems.append(Problem(BUFFER, f"{data_size - pos} trailing bytes after the last tensor's data"))


def _lone_surrogate(text: str) -> bool:
    """True when the JSON decodes to a string holding an unpaired surrogate (serde rejects it)."""
    try:
        json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        pass  # invalid JSON: reported as such by the parse
    return False


def _short(v) -> str:
    try:
        s = json.dumps(v, skipkeys=True) if not isinstance(v, str) else repr(v)
    except (ValueError, TypeError, RecursionError):
        s = f"<{type(v).__name__}>"
    return s if len(s) <= 60 else s[:57] + "..."

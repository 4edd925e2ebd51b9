"""Property tests for the strict safetensors header reader: whatever the bytes, read_header returns
problems (never raises, never hangs, never allocates what the header claims), and it agrees with the
real safetensors library on which files load (safe_open) and which do not."""
import json
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from builders import fresh
from fqcheck.checkpoint import safetensors as sft
from fqcheck.checkpoint.safetensors import SafetensorsHeader, read_header

FUZZ = settings(max_examples=150, deadline=1000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LOAD_BLOCKERS = {sft.UNREADABLE, sft.BAD_ENTRY, sft.OVERLAP, sft.BUFFER, sft.DUPLICATE}
_DIR = Path(tempfile.mkdtemp(prefix="fqcheck-fuzz-"))


def _write(data: bytes) -> Path:
    p = fresh(_DIR / "f.safetensors")  # not rewritten in place: see fresh
    p.write_bytes(data)
    return p


def _file(header, data_len: int, *, length: int | None = None, pad: int = 0) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    hb += b" " * pad
    return struct.pack("<Q", len(hb) if length is None else length) + hb + b"\0" * data_len


def _read(data: bytes) -> SafetensorsHeader:
    h = read_header(_write(data))
    assert isinstance(h, SafetensorsHeader)
    for p in h.problems:
        assert isinstance(p, sft.Problem) and p.kind in {*LOAD_BLOCKERS, sft.METADATA} and p.message
    if h.newline_free:  # the reader's promise the header rules count lines on
        assert not any("\n" in n for n in h.names)
    if h.readable:  # read_header's column-wise fast path must say exactly what the exact slow path says
        slow = SafetensorsHeader(h.path, h.file_size, h.data_start)
        sft._parse_slow(slow, data[8:h.data_start].decode("utf-8"))
        assert slow == h
        # the columns' counts, as the entries say: every dtype or some, every name or not those
        # ending in a suffix
        for dtypes in (None, {"F32", "BF16", "U8"}):
            for skip in ((), ("a", "_scale")):
                assert h.dtype_bytes(dtypes, skip) == slow.dtype_bytes(dtypes, skip) == _dtype_bytes(h, dtypes, skip)
    return h


def _dtype_bytes(h: SafetensorsHeader, dtypes, skip) -> dict:
    out: dict = {}
    for e in h.tensors.values():
        if (dtypes is None or e.dtype in dtypes) and not (skip and e.name.endswith(skip)):
            out[e.dtype] = out.get(e.dtype, 0) + e.nbytes
    return out


def _rust_loads(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
        return True
    except Exception:  # noqa: BLE001 - any refusal of the reference reader counts
        return False


def _blocked(h: SafetensorsHeader) -> bool:
    """Would the reference reader refuse this file, by our reader's account? SFT006 only when the
    metadata is not str->str (a missing metadata or a non-pt format loads fine in safetensors)."""
    return any(p.kind in LOAD_BLOCKERS or (p.kind == sft.METADATA and "strings to strings" in p.message)
               for p in h.problems)


def _agrees(data: bytes) -> None:
    h = _read(data)
    rust = _rust_loads(_DIR / "f.safetensors")
    if rust and {p.kind for p in h.problems if p.kind in LOAD_BLOCKERS} == {sft.DUPLICATE}:
        return  # known, deliberate: an identical repeated entry loads (last wins) but is SFT005 here
    assert rust == (not _blocked(h)), (rust, h.problems, data[:300])


# --- generated valid files ---------------------------------------------------------------------

BYTE_DTYPES = sorted(k for k, bits in sft.DTYPE_BITS.items() if bits % 8 == 0)
names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: s != "__metadata__")


@st.composite
def valid_files(draw):
    tensors = draw(st.dictionaries(names, st.tuples(st.sampled_from(BYTE_DTYPES),
                                                    st.lists(st.integers(0, 4), max_size=3)), max_size=6))
    order = draw(st.permutations(sorted(tensors)))
    header, off = {}, 0
    for n in order:
        dtype, shape = tensors[n]
        nbytes = sft.DTYPE_BITS[dtype] // 8
        for d in shape:
            nbytes *= d
        header[n] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + nbytes]}
        off += nbytes
    if draw(st.booleans()):
        meta = draw(st.dictionaries(names, st.text(max_size=8), max_size=3))
        header = {"__metadata__": {"format": "pt", **meta}, **header}
    return header, off


@FUZZ
@given(valid_files(), st.integers(0, 16))
def test_valid_files_read_clean_and_load(spec, pad):
    header, size = spec
    data = _file(header, size, pad=pad)
    h = _read(data)
    assert not _blocked(h), h.problems
    assert set(h.tensors) == set(header) - {"__metadata__"}
    assert _rust_loads(_DIR / "f.safetensors")


# --- random bytes and mutations ------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xff" * 8)
@example(struct.pack("<Q", 2 ** 62) + b"{}")
def test_random_bytes_never_raise(data):
    h = _read(data)
    if len(data) < 8 or struct.unpack("<Q", data[:8])[0] > len(data) - 8:
        assert not h.readable and not h.tensors  # no header to read: SFT001, nothing allocated


@FUZZ
@given(st.binary(max_size=200))
def test_random_header_bytes_after_a_plausible_length(body):
    _agrees(struct.pack("<Q", len(body)) + body)


HOSTILE = [-1, 0.5, 2 ** 62, 2 ** 64, 2 ** 64 - 1, 10 ** 12, True, None, "8", [], {}, [0, 1], {"a": 1}]


@st.composite
def mutated(draw):
    header, size = draw(valid_files())
    data = _file(header, size)
    kind = draw(st.sampled_from(["flip", "length", "truncate", "append", "field", "entry", "dup",
                                 "nest", "dims", "meta"]))
    tensors = [n for n in header if n != "__metadata__"]
    if kind == "flip" and len(data) > 8:
        i = draw(st.integers(8, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    elif kind == "length":
        n = draw(st.sampled_from([0, 1, 2 ** 62, 2 ** 64 - 1, 100_000_001]) | st.integers(0, len(data) + 8))
        data = struct.pack("<Q", n) + data[8:]
    elif kind == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=9))
    elif kind == "field" and tensors:
        n = draw(st.sampled_from(tensors))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[n][field] = draw(st.sampled_from(HOSTILE + [[10 ** 12, 10 ** 12], [-4], [1.0], "F8_E4M3", "X"]))
        data = _file(header, size)
    elif kind == "entry" and tensors:
        header[draw(st.sampled_from(tensors))] = draw(st.sampled_from(HOSTILE))
        data = _file(header, size)
    elif kind == "dup" and tensors:  # repeat an entry, or one of its fields, with other values
        n = draw(st.sampled_from(tensors))
        text = json.dumps(header)
        if draw(st.booleans()):
            extra = json.dumps({n: {"dtype": "U8", "shape": [1], "data_offsets": [size, size + 1]}})[1:-1]
            data = _file((text[:-1] + ", " + extra + "}").encode(), size + 1)
        else:
            entry = json.dumps(header[n])
            text = text.replace(entry, entry[:-1] + ', "dtype": "U8"}', 1)
            data = _file(text.encode(), size)
    elif kind == "nest":
        depth = draw(st.sampled_from([10, 900, 5000, 100_000]))
        data = _file(b'{"a": ' + b"[" * depth + b"]" * depth + b"}", 0)
    elif kind == "dims":
        shape = draw(st.sampled_from([[1] * 10_000, [2 ** 63] * 10_000, [10 ** 12] * 3, [0] + [2 ** 64 - 1] * 50]))
        data = _file({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}, 4)
    elif kind == "meta":
        header["__metadata__"] = draw(st.sampled_from([{"format": 1}, [], "pt", {"format": {"a": "b"}},
                                                       {"fo\u00efrmat": "pt"}, None]))
        data = _file(header, size)
    return data


@FUZZ
@given(mutated())
@example(struct.pack("<Q", 22) + b'{"__metadata__": null}')  # null loads in safetensors: SFT006, not a blocker
def test_mutated_headers_agree_with_safetensors(data):
    _agrees(data)


@pytest.mark.parametrize("header", [
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"dtype":"F32"}}',   # repeated field
    b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',            # lone surrogate
    b' \n{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',               # leading whitespace
    b'{"__metadata__":{"a":"x","a":"y"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}',
    b'{"a":{"dtype":"F32","shape":[18446744073709551615,0],"data_offsets":[0,0]}}',
    b'{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}',
    b'{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1.0],"data_offsets":[4,8]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[true],"data_offsets":[4,8]}}',
    b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,true]}}',
    b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[false,1]}}',
    b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1.0]}}',
    b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":NaN}',
    b'{"true":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"false":{"dtype":"U8","shape":[3],"data_offsets":[1,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}\x00',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":{"y":1}}}',       # extra key: allowed
    b'{"\\u0000duplicates":["a"]}',
    # __metadata__ is cut from the front of the header when it comes first: a '}' inside a value,
    # a nested object, metadata last, a space before the value, keys named like entry fields
    b'{"__metadata__":{"format":"pt","note":"a}b"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"__metadata__":{"format":"pt","x":{"y":"}"}},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"format":"pt"}}',
    b'{"__metadata__": {"format":"pt"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"__metadata__":{"format":"pt","shape":"[1]","dtype":"x"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"__metadata__":{"format":"pt"}}',
    b'{"a\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',                    # not UTF-8
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32\xc3","shape":[1],"data_offsets":[4,8]}}',
], ids=lambda h: h[:40].decode("latin-1"))
def test_specific_mutations_agree_with_safetensors(header):
    _agrees(struct.pack("<Q", len(header)) + header + b"\0" * 4)


@pytest.mark.parametrize("kinds", [3, 300])  # more kinds than fit a byte: the kind numbers in a list
def test_entries_out_of_offset_order(kinds):
    """Valid, but listed in reverse data order: the fast path keeps the offsets, and the entries it
    builds on demand are the ones written."""
    sizes = [1 + i % kinds for i in range(600)]
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    header = {f"t{i}": {"dtype": "U8", "shape": [sizes[i]], "data_offsets": [ends[i] - sizes[i], ends[i]]}
              for i in reversed(range(len(sizes)))}
    h = _read(_file({"__metadata__": {"format": "pt"}, **header}, ends[-1]))
    assert not h.problems and h.names == list(header)
    assert {n: (e.dtype, e.shape, e.begin, e.end) for n, e in h.tensors.items()} == {
        n: ("U8", tuple(v["shape"]), *v["data_offsets"]) for n, v in header.items()}
    assert h.dtype_bytes() == {"U8": ends[-1]}


# --- never allocate what the header claims -----------------------------------------------------

@pytest.mark.parametrize("data", [
    struct.pack("<Q", 2 ** 62) + b"{}",
    _file({"t": {"dtype": "F32", "shape": [10 ** 12, 10 ** 12], "data_offsets": [0, 4 * 10 ** 12]}}, 8),
    _file({"t": {"dtype": "F32", "shape": [10 ** 12], "data_offsets": [0, 2 ** 62]}}, 8),
    _file({"t": {"dtype": "F32", "shape": [2 ** 63] * 10_000, "data_offsets": [0, 4]}}, 4),
], ids=["length-2^62", "shape-10^24", "shape-10^12-offsets-2^62", "10k-dims-of-2^63"])
def test_hostile_claims_allocate_nothing(data):
    path = _write(data)
    tracemalloc.start()
    try:
        h = read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert h.problems and not h.tensors.get("t", sft.TensorEntry("t", "", (), 0, 0)).nbytes > 2 ** 63
    assert peak < 16 * len(data) + (1 << 20), peak  # a small multiple of the real bytes, not the claims

"""The header path's column helpers (fqcheck.checkpoint.columns) and what the rules build on them
agree with the plain per-entry definitions they stand in for."""
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fqcheck.checkpoint.columns import deal
from fqcheck.checkpoint.safetensors import SafetensorsHeader, UNREADABLE, Problem
from fqcheck.checks.idx import IndexView


def test_deal_into_a_list_and_a_dict():
    buckets = [[], [], []]
    deal("abcde", [2, 0, 2, 1, 0], buckets)
    assert buckets == [["b", "e"], ["d"], ["a", "c"]]
    named = {"x": [], "y": []}
    deal(["a", "b", "c"], ["y", "x", "y"], named)
    assert named == {"x": ["b"], "y": ["a", "c"]}


def _header(names, readable=True):
    h = SafetensorsHeader(Path("s.safetensors"), 0)
    h.names = list(names)
    if not readable:
        h.problems.append(Problem(UNREADABLE, "x"))
    return h


def _exact_per_entry(wm, readable) -> bool:
    """IndexView.exact as first written: one lookup per stored name."""
    if len(wm) != sum(len(h.names) for h in readable.values()):
        return False
    return all(list(map(wm.get, h.names)) == [f] * len(h.names) for f, h in readable.items())


_shards = st.lists(st.lists(st.sampled_from([f"t{i}" for i in range(12)]), unique=True, max_size=6),
                   min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(shards=_shards, data=st.data())
def test_exact_agrees_with_the_per_entry_definition(shards, data):
    files = [f"m-{i}.safetensors" for i in range(len(shards))]
    readable = [data.draw(st.booleans()) or i == 0 for i in range(len(files))]
    v = IndexView(present=True)
    v.shards = {f: _header(ns, ok) for f, ns, ok in zip(files, shards, readable)}
    # an index that matches, then perturbed: entries moved, dropped, added, pointed at other files
    pairs = [(t, f) for f, ns in zip(files, shards) for t in ns]
    pairs = data.draw(st.permutations(pairs))
    ops = data.draw(st.lists(st.tuples(st.sampled_from("move drop add elsewhere".split()),
                                       st.integers(0, 20), st.sampled_from(files + ["gone.safetensors"])),
                             max_size=2))
    wm = dict(pairs)
    for op, i, f in ops:
        keys = list(wm)
        if op == "add":
            wm.setdefault(f"new{i}", f)
        elif keys and op == "drop":
            del wm[keys[i % len(keys)]]
        elif keys:
            wm[keys[i % len(keys)]] = f
    v.weight_map = v.entries = wm
    assert v.exact == _exact_per_entry(wm, v.readable)


def _dtype_bytes_per_entry(names, kinds, ids, dtypes, skip) -> dict:
    out: dict = {}
    for name, i in zip(names, ids):
        dtype, _, size = kinds[i]
        if (dtypes is None or dtype in dtypes) and not name.endswith(skip):
            out[dtype] = out.get(dtype, 0) + size
    return out


@settings(max_examples=300, deadline=None)
@given(data=st.data(), many=st.booleans())
def test_dtype_bytes_agrees_with_the_per_entry_definition(data, many):
    """CFG003's count: the kinds counted by bytes.count and the suffixed names by one pass over the
    counted kinds' names, whether the kind numbers are bytes or (past 255 kinds) a list."""
    n_kinds = data.draw(st.integers(256, 300) if many else st.integers(1, 6))
    kinds = [(data.draw(st.sampled_from(["BF16", "F32", "F8_E4M3", "I32"])), (k + 1,), k + 1) for k in range(n_kinds)]
    names = data.draw(st.lists(st.text("ab_.2\n", max_size=6).map(lambda t: "x" + t), unique=True, max_size=40))
    ids = [data.draw(st.integers(0, n_kinds - 1)) for _ in names]
    h = SafetensorsHeader(Path("s.safetensors"), 0)
    h.names = names
    h._columns = (kinds, ids if many else bytes(ids), None)
    for dtypes in (None, {"F32", "BF16"}, set()):
        for skip in ((), ("_scale", "a"), ("b", "ab", "_.2"), ("",)):
            assert h.dtype_bytes(dtypes, skip) == _dtype_bytes_per_entry(names, kinds, ids, dtypes, skip)


def test_newline_free_is_read_from_the_header_and_carried(tmp_path):
    """newline_free: True only where the header's JSON holds no escape (so no name a newline), and it
    crosses the fork's pipe (columns / from_columns) with the header."""
    import json
    import struct

    from fqcheck.checkpoint.safetensors import columns, from_columns, read_header
    for name, free in (("a.weight", True), ("a\nb", False), ("a\\b", False), ("\u00e9", True)):
        hb = json.dumps({"__metadata__": {"format": "pt"}, name: {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
                        ensure_ascii=False).encode()
        p = tmp_path / "x.safetensors"
        p.write_bytes(struct.pack("<Q", len(hb)) + hb + b"\0")
        h = read_header(p)
        assert h.names == [name] and h.newline_free is free
        assert from_columns(p, columns(h)).newline_free is free


def _mismatch_by_definition(headers, declared):
    """CFG003 as first written: every header's exact counts, scales left out, then the largest."""
    from fqcheck.checks.cfg import CONFIG_DTYPES, SCALE_SUFFIXES, WEIGHT_DTYPES
    want = CONFIG_DTYPES[declared]
    counts = dict.fromkeys(WEIGHT_DTYPES, 0)
    for h in headers.values():
        for dtype, nbytes in h.dtype_bytes(WEIGHT_DTYPES, SCALE_SUFFIXES).items():
            counts[dtype] += nbytes // WEIGHT_DTYPES[dtype]
    total = sum(counts.values())
    have = max(counts, key=counts.get)
    return [] if not total or have == want else [(have, counts[have], total)]


@settings(max_examples=400, deadline=None)
@given(data=st.data(), declared=st.sampled_from(["bfloat16", "float16", "float32"]))
def test_cfg003_decides_as_the_exact_count(data, declared):
    """CFG003 first shows the declared dtype wins from its own exact count against the others' counts
    with their scales in; whenever it reports, or cannot show it, the exact count decides: the same
    finding, the same message, in every case (ties included: max keeps BF16, F16, F32 in that order)."""
    from types import SimpleNamespace

    from fqcheck.checks.cfg import dtype_mismatch
    headers = {}
    for j in range(data.draw(st.integers(1, 3))):
        kinds = [(data.draw(st.sampled_from(["BF16", "F16", "F32", "F8_E4M3"])), (n,), 0)
                 for n in data.draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=4))]
        kinds = [(d, s, s[0] * {"F32": 4, "F8_E4M3": 1}.get(d, 2)) for d, s, _ in kinds]
        names = data.draw(st.lists(st.sampled_from(["w", "w.weight", "w_scale", "w.weight_scale_inv", "w_amax",
                                                    "w.scales", "b"]).flatmap(
            lambda x: st.integers(0, 99).map(lambda i: f"m{i}.{x}")), unique=True, max_size=12))
        h = SafetensorsHeader(Path(f"s{j}.safetensors"), 0)
        h.names = names
        h._columns = (kinds, bytes(data.draw(st.integers(0, len(kinds) - 1)) for _ in names), None)
        headers[h.path.name] = h
    ckpt = SimpleNamespace(config=SimpleNamespace(data={"torch_dtype": declared}), headers=lambda: headers)
    want = _mismatch_by_definition(headers, declared)
    got = list(dtype_mismatch(SimpleNamespace(ckpt=ckpt)))
    assert len(got) == len(want)
    if want:
        have, n, total = want[0]
        assert f"mostly {have} ({n} of {total} floating elements)" in got[0].message

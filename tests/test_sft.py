"""SFT rules: the strict header reader against real and byte-built safetensors files."""

import torch
from safetensors import safe_open

from builders import load_shard, raw_safetensors, save_shard, save_tiny_model
from fqcheck.api import lint
from fqcheck.checkpoint import _SCANNED_LOOKUPS, Checkpoint


def codes(report, code=None):
    return [(f.code, f.file, f.tensor) for f in report.findings if code is None or f.code == code]


def test_clean_transformers_checkpoint_has_no_findings(tiny_llama):
    report = lint(tiny_llama)
    assert report.findings == []
    assert "SFT001" in report.rules_run


def test_sft001_length_beyond_file(tmp_path):
    raw_safetensors(tmp_path / "model.safetensors", {"__metadata__": {"format": "pt"}}, length=1 << 62)
    r = lint(tmp_path, select=["SFT"])
    [f] = r.findings
    assert (f.code, f.file) == ("SFT001", "model.safetensors")
    assert "100 MB cap" in f.message


def test_sft001_not_json(tmp_path):
    raw_safetensors(tmp_path / "model.safetensors", b"{not json!")
    assert codes(lint(tmp_path, select=["SFT"])) == [("SFT001", "model.safetensors", None)]


def test_sft002_byte_size_mismatch(tmp_path):
    hdr = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
    raw_safetensors(tmp_path / "model.safetensors", hdr, b"\0" * 12)
    r = lint(tmp_path, select=["SFT"])
    assert codes(r) == [("SFT002", "model.safetensors", "w")]
    assert "12 != 4 elements" in r.findings[0].message


def test_sft003_overlap_and_sft006_missing_metadata(tmp_path):
    hdr = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw_safetensors(tmp_path / "model.safetensors", hdr, b"\0" * 8)
    r = lint(tmp_path, select=["SFT"])
    assert sorted(c for c, _, _ in codes(r)) == ["SFT003", "SFT006"]


def test_sft004_truncated_real_file(tiny_llama):
    p = tiny_llama / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    r = lint(tiny_llama, select=["SFT"])
    assert [f.code for f in r.findings] == ["SFT004"]
    assert "truncated" in r.findings[0].message


def test_sft005_duplicate_name(tmp_path):
    entry = '{"dtype":"U8","shape":[1],"data_offsets":[0,1]}'
    hdr = ('{"__metadata__":{"format":"pt"},"x":%s,"x":%s}' % (entry, entry)).encode()
    raw_safetensors(tmp_path / "model.safetensors", hdr, b"\0")
    assert ("SFT005", "model.safetensors", "x") in codes(lint(tmp_path, select=["SFT"]))


def test_sft006_format_not_pt(tmp_path):
    save_shard(tmp_path / "model.safetensors", {"w": torch.zeros(2)}, metadata={"format": "np"})
    r = lint(tmp_path, select=["SFT"])
    assert codes(r) == [("SFT006", "model.safetensors", None)]
    assert r.findings[0].fixable == "safe"


def test_sft006_null_metadata_is_fixed_to_pt(tmp_path):
    """safetensors loads `"__metadata__": null` (as absent); transformers then lacks format=pt."""
    from safetensors import safe_open

    import fqcheck

    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    raw_safetensors(tmp_path / "model.safetensors",
                    {"__metadata__": None, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, data)
    r = lint(tmp_path, select=["SFT"])
    assert codes(r) == [("SFT006", "model.safetensors", None)]
    assert r.findings[0].message.startswith("__metadata__ is null;")
    res = fqcheck.fix(tmp_path, select=["SFT"], backup=False)
    assert res.ok and not res.remaining.findings
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("w").numpy().tobytes() == data


def test_tensor_lookup_finds_the_first_holder(tmp_path):
    """Checkpoint.tensor answers as safe_open reads the shards (the first file in name order that
    holds a name), both while it scans shard names and once it has built its map of every name."""
    d = save_tiny_model(tmp_path / "m", shards=4)
    shards = sorted(d.glob("*.safetensors"))
    first, last = load_shard(shards[0]), load_shard(shards[-1])
    dup = next(iter(first))
    save_shard(shards[-1], {**last, dup: first[dup].clone()})  # a stale copy in a later shard
    expected = {}
    for p in shards:
        with safe_open(str(p), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                sl = f.get_slice(name)
                expected.setdefault(name, (p.name, sl.get_dtype(), tuple(sl.get_shape())))
    names = sorted(expected) + ["no.such.tensor"]
    assert len(names) > 2 * _SCANNED_LOOKUPS  # both ways of answering are used
    ckpt = Checkpoint.open(d)
    got = {}
    for n in names:
        loc = ckpt.tensor(n)
        got[n] = None if loc is None else (loc[0], loc[1].dtype, loc[1].shape)
    assert got == {**expected, "no.such.tensor": None}
    assert got[dup][0] == ckpt.tensor(dup)[0] == shards[0].name  # scanned, then from the map

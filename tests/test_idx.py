"""IDX rules: a real sharded save_pretrained checkpoint, damaged the ways exports get damaged."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from builders import load_shard, read_index, save_shard, save_tiny_model, write_index
from fqcheck import engine
from fqcheck.api import lint
from fqcheck.catalog import load_catalog, schema_path
from fqcheck.checkpoint import INDEX_NAME, Checkpoint
from fqcheck.checks import idx as idx_checks
from fqcheck.fixer.edits import DropTensor, RebuildIndex, RetireFile

Q0 = "model.layers.0.self_attn.q_proj.weight"   # shares its shard with other tensors
NORM = "model.norm.weight"


def codes(report, prefix="IDX"):
    return [(f.code, f.file, f.tensor) for f in report.findings if f.code.startswith(prefix)]


def idx_lint(d):
    return lint(d, select=["IDX"])


def shard_of(d, tensor):
    return read_index(d)["weight_map"][tensor]


def other_shard(d, tensor):
    """A shard that does not hold `tensor` and holds several tensors."""
    wm = read_index(d)["weight_map"]
    counts = {}
    for f in wm.values():
        counts[f] = counts.get(f, 0) + 1
    return next(f for f in sorted(counts) if f != wm[tensor] and counts[f] > 1)


def add_tensor(path: Path, name: str, value: torch.Tensor):
    tensors = load_shard(path)
    tensors[name] = value
    save_shard(path, tensors)


# ---- clean baselines ------------------------------------------------------------------------------

def test_clean_sharded_save_pretrained_has_no_findings(sharded_llama):
    report = lint(sharded_llama)
    assert report.findings == []
    assert {f"IDX00{i}" for i in range(1, 10)} <= set(report.rules_run)


def test_clean_single_file_without_index(tiny_llama):
    assert codes(idx_lint(tiny_llama)) == []


def test_expected_total_size_matches_save_pretrained(sharded_llama):
    ckpt = Checkpoint.open(sharded_llama)
    assert idx_checks.expected_total_size(ckpt) == read_index(sharded_llama)["metadata"]["total_size"]


def test_moe_sharded_save_pretrained_is_clean(tmp_path):
    # transformers 5 fuses experts on load and splits them back into views on save: the views of
    # one storage are counted once by huggingface_hub, which must still equal the stored bytes.
    d = save_tiny_model(tmp_path / "moe", model_type="mixtral", shards=3, num_local_experts=4,
                        num_experts_per_tok=2)
    assert lint(d, select=["IDX"]).findings == []
    assert idx_checks.expected_total_size(Checkpoint.open(d)) == read_index(d)["metadata"]["total_size"]


def test_tied_embeddings_sharded_is_clean(tmp_path):
    # save_pretrained drops the tied lm_head before huggingface_hub sums storage sizes.
    d = save_tiny_model(tmp_path / "tied", shards=3, tie=True)
    assert "lm_head.weight" not in read_index(d)["weight_map"]
    assert codes(idx_lint(d)) == []


# ---- IDX001 ---------------------------------------------------------------------------------------

def test_idx001_shards_without_index(sharded_llama):
    (sharded_llama / INDEX_NAME).unlink()
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX001", INDEX_NAME, None)]
    f = r.findings[0]
    assert f.fixable == "safe" and f.fix == RebuildIndex()
    assert "4 safetensors files" in f.message and "vLLM loads every" in f.message and "OSError" in f.message


# ---- IDX002 ---------------------------------------------------------------------------------------

def test_idx002_truncated_json(sharded_llama):
    p = sharded_llama / INDEX_NAME
    p.write_bytes(p.read_bytes()[:-40])
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX002", INDEX_NAME, None)]
    assert "invalid JSON" in r.findings[0].message and r.findings[0].fix == RebuildIndex()


def test_idx002_missing_metadata_breaks_transformers(sharded_llama):
    idx = read_index(sharded_llama)
    del idx["metadata"]
    write_index(sharded_llama, idx)
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX002", INDEX_NAME, None)]
    assert "'metadata' is a required property" in r.findings[0].message


def test_idx002_lenient_with_extra_keys(sharded_llama):
    idx = read_index(sharded_llama)
    idx["metadata"]["total_parameters"] = 123
    idx["metadata"]["format"] = "pt"
    idx["something_new"] = {"nested": [1, 2]}
    idx["metadata"]["total_size"] = float(idx["metadata"]["total_size"])  # 53568.0 is a JSON integer
    write_index(sharded_llama, idx)
    assert codes(idx_lint(sharded_llama)) == []


def _deep(n):
    return "[" * n + "]" * n


HOSTILE = {
    "numbers": lambda i: {**i, "weight_map": {k: 7 for k in i["weight_map"]}},
    "nested-objects": lambda i: {**i, "weight_map": {k: {"file": v} for k, v in i["weight_map"].items()}},
    "one-bad-value": lambda i: {**i, "weight_map": {**i["weight_map"], NORM: None}},
    "empty-and-nul": lambda i: {**i, "weight_map": {**i["weight_map"], NORM: "", Q0: "a\u0000b"}},
    "map-is-list": lambda i: {**i, "weight_map": list(i["weight_map"])},
    "map-is-string": lambda i: {**i, "weight_map": "model.safetensors"},
    "no-weight-map": lambda i: {"metadata": i["metadata"]},
    "top-level-list": lambda i: [i],
    "top-level-number": lambda i: 3,
    "metadata-list": lambda i: {**i, "metadata": [1]},
    "total-size-negative": lambda i: {**i, "metadata": {"total_size": -1}},
    "total-size-string": lambda i: {**i, "metadata": {"total_size": "53568"}},
    "total-size-bool": lambda i: {**i, "metadata": {"total_size": True}},
    "total-size-fraction": lambda i: {**i, "metadata": {"total_size": 1.5}},
    "surrogate-value": lambda i: {**i, "weight_map": {**i["weight_map"], NORM: "\ud800.safetensors"}},
    "many-bad-values": lambda i: {**i, "weight_map": {f"t{n}": n for n in range(20000)}},
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_idx002_hostile_index_is_one_finding_never_a_traceback(sharded_llama, case):
    idx = HOSTILE[case](read_index(sharded_llama))
    (sharded_llama / INDEX_NAME).write_text(json.dumps(idx))
    r = lint(sharded_llama)  # every rule: none may crash on this index
    assert codes(r) == [("IDX002", INDEX_NAME, None)], case
    assert len(r.findings[0].message) < 1200


@pytest.mark.parametrize("raw, words", [
    (_deep(10000).encode(), "invalid JSON"),  # json refuses it (RecursionError)
    (b'{"metadata": {}, "weight_map": {"a": %s}}' % _deep(900).encode(), "is not of type 'string'"),
    (b'{"metadata": %s, "weight_map": {}}' % _deep(900).encode(), "is not of type 'object'"),
    ("\ufeff{}".encode(), "invalid JSON"), (b"", "invalid JSON"), (b"\xff\xfe garbage", "not UTF-8"),
])
def test_idx002_deep_or_garbage_json(sharded_llama, raw, words):
    (sharded_llama / INDEX_NAME).write_bytes(raw)
    r = lint(sharded_llama)
    assert codes(r) == [("IDX002", INDEX_NAME, None)]
    assert words in r.findings[0].message


def test_fast_path_agrees_with_the_schema(sharded_llama):
    # _schema_problems skips jsonschema for valid indexes: it must accept exactly what the schema does.
    import jsonschema
    schema = json.loads(schema_path("index.schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    base = read_index(sharded_llama)
    docs = [base, {"metadata": {}, "weight_map": {}}, {"metadata": {"total_size": 0}, "weight_map": {"a": "b"}},
            {"metadata": {"total_size": 2.0}, "weight_map": {}}, {"metadata": {"total_size": 10**30}, "weight_map": {}}]
    docs += [HOSTILE[k](base) for k in sorted(HOSTILE) if k != "many-bad-values"]
    for doc in docs:
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        all_good = isinstance(wm, dict) and idx_checks._paths(wm)[1]
        assert (idx_checks._schema_problems(doc, all_good) == []) == validator.is_valid(doc), doc


# ---- IDX003 ---------------------------------------------------------------------------------------

def test_idx003_deleted_shard(sharded_llama):
    shard = shard_of(sharded_llama, Q0)
    n = sum(f == shard for f in read_index(sharded_llama)["weight_map"].values())
    (sharded_llama / shard).unlink()
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX003", shard, None)]
    assert f"maps {n} tensors to {shard}, which does not exist" in r.findings[0].message
    assert r.findings[0].fixable == "no"


def test_idx003_dangling_link(sharded_llama):
    shard = shard_of(sharded_llama, Q0)
    (sharded_llama / shard).unlink()
    os.symlink("gone.bin", sharded_llama / shard)
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX003", shard, None)]
    assert "dangling link" in r.findings[0].message


# ---- IDX004 ---------------------------------------------------------------------------------------

def test_idx004_entry_moved_to_another_shard(sharded_llama):
    real, wrong = shard_of(sharded_llama, Q0), other_shard(sharded_llama, Q0)
    idx = read_index(sharded_llama)
    idx["weight_map"][Q0] = wrong
    write_index(sharded_llama, idx)
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX004", wrong, Q0)]
    assert f"stored in {real}" in r.findings[0].message
    assert r.findings[0].fix == RebuildIndex()


def test_idx004_entry_for_a_tensor_no_shard_holds(sharded_llama):
    idx = read_index(sharded_llama)
    shard = idx["weight_map"][Q0]
    idx["weight_map"]["model.ghost.weight"] = shard
    write_index(sharded_llama, idx)
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX004", shard, "model.ghost.weight")]
    assert "no shard the index names holds it" in r.findings[0].message


# ---- IDX005 ---------------------------------------------------------------------------------------

def test_idx005_tensor_missing_from_index(sharded_llama):
    idx = read_index(sharded_llama)
    shard = idx["weight_map"].pop(NORM)
    write_index(sharded_llama, idx)
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX005", shard, NORM)]
    assert r.findings[0].fix == RebuildIndex()


# ---- IDX006 ---------------------------------------------------------------------------------------

def _duplicate(d, different: bool):
    home, other = shard_of(d, Q0), other_shard(d, Q0)
    value = load_shard(d / home)[Q0]
    add_tensor(d / other, Q0, value + 1 if different else value)
    return home, other


def test_idx006_identical_copies_drop_the_unindexed_one(sharded_llama):
    home, other = _duplicate(sharded_llama, different=False)
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX006", other, Q0)]
    f = r.findings[0]
    assert f.fixable == "safe" and f.fix == DropTensor(other, Q0)
    assert "identical bytes" in f.message and home in f.message


def test_idx006_different_copies_not_fixable(sharded_llama):
    home, other = _duplicate(sharded_llama, different=True)
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX006", other, Q0)]
    f = r.findings[0]
    assert f.fixable == "no" and f.fix is None
    assert "copies differ" in f.message


def test_idx006_chunked_compare_sees_a_difference_in_the_last_chunk(sharded_llama, monkeypatch):
    monkeypatch.setattr(idx_checks, "CHUNK", 64)
    home, other = shard_of(sharded_llama, Q0), other_shard(sharded_llama, Q0)
    value = load_shard(sharded_llama / home)[Q0].clone()
    value.view(-1)[-1] += 1  # 2048 bytes: 32 chunks, only the last differs
    add_tensor(sharded_llama / other, Q0, value)
    [f] = idx_lint(sharded_llama).findings
    assert f.fixable == "no" and "from offset 1984" in f.message


def test_idx006_without_index_keeps_the_first_file(sharded_llama):
    home, other = _duplicate(sharded_llama, different=False)
    (sharded_llama / INDEX_NAME).unlink()
    later = max(home, other)
    r = idx_lint(sharded_llama)
    assert sorted(codes(r)) == [("IDX001", INDEX_NAME, None), ("IDX006", later, Q0)]
    [dup] = [f for f in r.findings if f.code == "IDX006"]
    assert dup.fix == DropTensor(later, Q0)


# ---- IDX007 ---------------------------------------------------------------------------------------

def test_idx007_wrong_total_size(sharded_llama):
    idx = read_index(sharded_llama)
    right = idx["metadata"]["total_size"]
    idx["metadata"]["total_size"] = right + 4096
    write_index(sharded_llama, idx)
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX007", INDEX_NAME, None)]
    f = r.findings[0]
    assert f.severity == "warning" and f.fix == RebuildIndex()
    assert f"is {right + 4096} but" in f.message and f"hold {right} bytes" in f.message


def test_idx007_not_reported_when_a_shard_is_missing(sharded_llama):
    (sharded_llama / shard_of(sharded_llama, Q0)).unlink()
    assert [c for c, _, _ in codes(idx_lint(sharded_llama))] == ["IDX003"]


# ---- IDX008 ---------------------------------------------------------------------------------------

def test_idx008_stale_shard_from_an_earlier_export(sharded_llama):
    stale = "model-00001-of-00002.safetensors"
    shutil.copy(sharded_llama / shard_of(sharded_llama, Q0), sharded_llama / stale)
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX008", stale, None)]
    f = r.findings[0]
    assert f.fixable == "safe" and f.fix == RetireFile(stale)


def test_idx008_unreferenced_file_with_the_only_copy_is_not_retired(sharded_llama):
    extra = "extra.safetensors"
    save_shard(sharded_llama / extra, {"model.extra.weight": torch.zeros(4)})
    r = idx_lint(sharded_llama)
    assert codes(r) == [("IDX008", extra, None)]
    assert r.findings[0].fixable == "no" and r.findings[0].fix is None
    assert "model.extra.weight" in r.findings[0].message


def test_idx008_needs_an_index(sharded_llama):
    (sharded_llama / INDEX_NAME).unlink()
    assert [c for c, _, _ in codes(idx_lint(sharded_llama))] == ["IDX001"]


# ---- IDX009 ---------------------------------------------------------------------------------------

def _run_idx(d):
    """Run the IDX checks on our own Checkpoint, to see which files were opened."""
    ckpt = Checkpoint.open(d)
    rules = [r for c, r in sorted(load_catalog().items()) if c.startswith("IDX")]
    return ckpt, engine.run(ckpt, rules)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_idx009_escaping_index_entry_is_never_opened(sharded_llama, kind):
    outside = sharded_llama.parent / "x.safetensors"
    shutil.copy(sharded_llama / shard_of(sharded_llama, Q0), outside)
    path = "../x.safetensors" if kind == "dotdot" else str(outside)
    idx = read_index(sharded_llama)
    idx["weight_map"][Q0] = path
    write_index(sharded_llama, idx)
    ckpt, findings = _run_idx(sharded_llama)
    assert [(f.code, f.file, f.tensor) for f in findings] == [("IDX009", path, None)]
    assert ("'..' component" if kind == "dotdot" else "absolute path") in findings[0].message
    assert findings[0].fixable == "no"
    assert path not in ckpt._header_cache and os.path.normpath(path) not in ckpt._header_cache


def test_idx009_symlink_outside(sharded_llama):
    shard = shard_of(sharded_llama, Q0)
    elsewhere = sharded_llama.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.move(sharded_llama / shard, elsewhere / shard)
    os.symlink(elsewhere / shard, sharded_llama / shard)
    ckpt, findings = _run_idx(sharded_llama)
    assert [(f.code, f.file, f.tensor) for f in findings] == [("IDX009", shard, None)]
    assert "link that resolves to" in findings[0].message
    assert shard not in ckpt._header_cache
    assert codes(idx_lint(sharded_llama / shard)) == []  # linting that one file is what was asked


def test_idx009_escape_reported_even_in_a_broken_index(sharded_llama):
    idx = read_index(sharded_llama)
    idx["weight_map"][Q0] = "/etc/passwd"
    del idx["metadata"]
    write_index(sharded_llama, idx)
    assert sorted(codes(idx_lint(sharded_llama))) == [("IDX002", INDEX_NAME, None), ("IDX009", "/etc/passwd", None)]


def _hf_cache(tmp_path, src: Path) -> Path:
    """models--org--name/{blobs,snapshots/rev1,snapshots/rev2} with relative links, as hf_hub builds it."""
    repo = tmp_path / "hub" / "models--org--name"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    for rev, bump in (("rev1", False), ("rev2", True)):
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        for f in sorted(src.iterdir()):
            blob = blobs / f"{rev if (bump and f.name == 'config.json') else 'x'}-{f.name}"
            if not blob.exists():
                shutil.copy(f, blob)
            os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / f.name)
    return repo


def test_hf_cache_snapshots_are_clean(sharded_llama, tmp_path):
    repo = _hf_cache(tmp_path, sharded_llama)
    for rev in ("rev1", "rev2"):
        snap = repo / "snapshots" / rev
        assert os.path.islink(snap / INDEX_NAME)
        assert lint(snap).findings == [], rev


def test_hf_cache_link_into_another_repo_escapes(sharded_llama, tmp_path):
    repo = _hf_cache(tmp_path, sharded_llama)
    other = tmp_path / "hub" / "models--evil--repo" / "blobs"
    other.mkdir(parents=True)
    snap = repo / "snapshots" / "rev1"
    shard = shard_of(sharded_llama, Q0)
    shutil.copy(sharded_llama / shard, other / "sha")
    (snap / shard).unlink()
    os.symlink("../../../models--evil--repo/blobs/sha", snap / shard)
    assert codes(idx_lint(snap)) == [("IDX009", shard, None)]


def test_idx008_file_orphaned_by_a_wrong_entry_is_not_retired(sharded_llama):
    # lm_head.weight is alone in its shard: pointing its entry elsewhere orphans the only copy.
    idx = read_index(sharded_llama)
    home = idx["weight_map"]["lm_head.weight"]
    assert list(idx["weight_map"].values()).count(home) == 1
    wrong = other_shard(sharded_llama, "lm_head.weight")
    idx["weight_map"]["lm_head.weight"] = wrong
    write_index(sharded_llama, idx)
    r = idx_lint(sharded_llama)
    assert sorted(codes(r)) == [("IDX004", wrong, "lm_head.weight"), ("IDX007", INDEX_NAME, None),
                                ("IDX008", home, None)]
    stale = next(f for f in r.findings if f.code == "IDX008")
    assert stale.fixable == "no" and stale.fix is None
    assert f"stored only in {home}" in next(f for f in r.findings if f.code == "IDX004").message


@pytest.mark.parametrize("layout", ["dot-slash", "subfolder"])
def test_index_paths_that_stay_inside_are_clean(sharded_llama, layout):
    idx = read_index(sharded_llama)
    shard = idx["weight_map"][Q0]
    if layout == "dot-slash":
        new = "./" + shard
    else:
        (sharded_llama / "weights").mkdir()
        shutil.move(sharded_llama / shard, sharded_llama / "weights" / shard)
        new = "weights/" + shard
    idx["weight_map"] = {t: (new if f == shard else f) for t, f in idx["weight_map"].items()}
    write_index(sharded_llama, idx)
    assert codes(idx_lint(sharded_llama)) == []
    if layout == "subfolder":  # and the shard in the subfolder is really read
        save_shard(sharded_llama / "weights" / shard, {"x": torch.zeros(2)})
        found = codes(idx_lint(sharded_llama))
        assert ("IDX004", new, Q0) in found and ("IDX005", new, "x") in found


def test_hostile_names_print_without_a_traceback(sharded_llama):
    # JSON may carry lone surrogates ("\\udc00"); a finding naming them must still print.
    import subprocess
    import sys
    idx = read_index(sharded_llama)
    idx["weight_map"]["ghost\udc00"] = idx["weight_map"][Q0]
    write_index(sharded_llama, idx)
    [f] = idx_lint(sharded_llama).findings
    assert (f.code, f.tensor) == ("IDX004", "ghost\\udc00")
    for fmt in ("text", "json"):
        out = subprocess.run([sys.executable, "-m", "fqcheck", "lint", str(sharded_llama), "-f", fmt],
                             capture_output=True, text=True)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "IDX004" in out.stdout

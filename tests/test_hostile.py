"""A checkpoint is untrusted input, fqcheck's own state files included: planted journals, locks,
manifests and links never make fqcheck write (or read) outside the folder. Every hostile file is
built here; the files outside are hashed before and after."""
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

import fqcheck
from builders import write_index
from fixhelp import run_cli, strip_metadata


def tree(d: Path) -> dict:
    """Every path under d with a hash of its bytes (links as their target): what must not change."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            out[str(p)] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[str(p)] = "dir"
    return out


@pytest.fixture
def outside(tmp_path) -> Path:
    o = tmp_path / "outside"
    (o / "data").mkdir(parents=True)
    (o / "data" / "thesis.txt").write_text("years of work")
    (o / "bashrc").write_text("export PATH=/usr/bin\n")
    (o / "id_rsa").write_text("-----BEGIN PRIVATE KEY-----\n")
    (o / "secret.txt").write_text("TOPSECRET api_token=hunter2\n")
    return o


def plant(d: Path, journal) -> None:
    (d / ".fqcheck").mkdir(exist_ok=True)
    (d / ".fqcheck" / "journal.json").write_text(json.dumps(journal) if not isinstance(journal, str) else journal)


def journal(**kw) -> dict:
    return {"version": 1, "label": "fix", "state": "done", "stash": ".fqcheck/tx/T", "keep": False,
            "created": "x", "ops": [], "cleanup": [], **kw}


def hostile_journals(d: Path, o: Path) -> dict:
    (d / "payload.txt").write_text("attacker's bytes")
    return {
        "cleanup-outside": journal(cleanup=["../outside/data"]),
        "cleanup-absolute": journal(cleanup=[str(o / "data")]),
        "stash-absolute": journal(stash=str(o)),
        "stash-dotdot": journal(stash=".fqcheck/tx/../../../outside"),
        "op-outside": journal(state="prepared", ops=[{"name": "../outside/bashrc", "incoming": "payload.txt",
                                                      "existed": True}]),
        "incoming-absolute": journal(state="prepared", ops=[{"name": "stolen_key", "existed": False,
                                                             "incoming": str(o / "id_rsa")}]),
        "incoming-not-temp": journal(state="prepared", ops=[{"name": "config.json", "existed": True,
                                                             "incoming": "payload.txt"}]),
        "name-int": journal(state="prepared", ops=[{"name": 5, "incoming": None, "existed": True}]),
        "list": [1, 2],
        "not-json": "{nope",
    }


@pytest.mark.parametrize("case", ["cleanup-outside", "cleanup-absolute", "stash-absolute", "stash-dotdot",
                                  "op-outside", "incoming-absolute", "incoming-not-temp", "name-int",
                                  "list", "not-json"])
def test_planted_journal_lint_writes_nothing_fix_refuses(tiny_llama, outside, case):
    d = tiny_llama
    plant(d, hostile_journals(d, outside)[case])
    before_out, before_in = tree(outside), tree(d)
    rep = fqcheck.lint(d)  # lint reports the interrupted fix and writes nothing
    assert any("interrupted fix" in n and "fqcheck restore" in n for n in rep.notes)
    assert tree(d) == before_in and tree(outside) == before_out
    for cmd in ("fix", "restore"):
        out = run_cli(cmd, d)
        assert out.returncode == 2, (cmd, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "journal" in lines[0] and "nothing was touched" in lines[0], out.stderr
        assert tree(d) == before_in and tree(outside) == before_out


def test_lint_cli_reports_an_interrupted_fix_and_changes_nothing(tiny_llama, outside):
    d = tiny_llama
    plant(d, journal(cleanup=["../outside/data"]))
    before = tree(d), tree(outside)
    out = run_cli("lint", d)
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr
    assert "fqcheck fix" in out.stderr and "fqcheck restore" in out.stderr
    assert (tree(d), tree(outside)) == before


def plant_backup(d: Path, manifest) -> Path:
    b = d / ".fqcheck" / "backup" / "20260101T000000Z"
    b.mkdir(parents=True)
    (b / "manifest.json").write_text(json.dumps(manifest))
    return b


@pytest.mark.parametrize("manifest", [
    lambda o: {"originals": [], "created_files": [str(o / "bashrc")]},
    lambda o: {"originals": ["../outside/bashrc"], "created_files": []},
    lambda o: {"originals": [], "created_files": ["../outside/data"]},
    lambda o: [1, 2],
    lambda o: {"originals": [5], "created_files": []},
], ids=["absolute", "dotdot-original", "dotdot-created", "list", "int"])
def test_planted_manifest_restore_refuses(tiny_llama, outside, manifest):
    d = tiny_llama
    plant_backup(d, manifest(outside))
    before = tree(d), tree(outside)
    out = run_cli("restore", d)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "manifest" in out.stderr and "Traceback" not in out.stderr
    assert (tree(d), tree(outside)) == before


def test_backup_folder_that_is_a_link_is_not_restored(tiny_llama, outside):
    d = tiny_llama
    (outside / "fake").mkdir()
    (outside / "fake" / "manifest.json").write_text(json.dumps({"originals": ["config.json"], "created_files": []}))
    (outside / "fake" / "config.json").write_text("{}")
    (d / ".fqcheck" / "backup").mkdir(parents=True)
    os.symlink(outside / "fake", d / ".fqcheck" / "backup" / "20260101T000000Z")
    before = tree(d), tree(outside)
    out = run_cli("restore", d)
    assert out.returncode == 2 and "no backup" in out.stderr, out.stderr
    assert (tree(d), tree(outside)) == before


def test_state_dir_that_is_a_link_is_refused(tiny_llama, outside):
    d = tiny_llama
    strip_metadata(d / "model.safetensors")
    (outside / "state").mkdir()
    os.symlink(outside / "state", d / ".fqcheck")
    before = tree(d), tree(outside)
    for cmd in ("fix", "restore"):
        out = run_cli(cmd, d)
        assert out.returncode == 2 and "not a directory of the checkpoint" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    assert fqcheck.fix(d, output=d.parent / "copy").ok  # a copy writes nothing in the folder
    assert (tree(d), tree(outside)) == before
    assert not (d.parent / "copy" / ".fqcheck").exists()


def test_journal_temp_links_are_not_written_through(tiny_llama, outside):
    d = tiny_llama
    strip_metadata(d / "model.safetensors")
    (d / ".fqcheck").mkdir()
    for pid in {os.getpid(), os.getpid() + 1}:  # the old pid-named temp file, planted as a link
        os.symlink(outside / "bashrc", d / ".fqcheck" / f"journal.json.tmp{pid}")
    before = tree(outside)
    res = fqcheck.fix(d)
    assert res.written == ["model.safetensors"] and res.ok
    assert tree(outside) == before


def test_sweep_leaves_a_users_file_alone(tiny_llama):
    d = tiny_llama
    strip_metadata(d / "model.safetensors")
    mine = d / ".fqcheck-tmp.notes.txt"
    mine.write_text("my notes")
    fqcheck.fix(d)
    fqcheck.lint(d)
    plant(d, journal(state="writing"))  # an interrupted fix that created nothing
    fqcheck.fix(d)
    assert mine.read_text() == "my notes"


def test_full_disk_at_the_final_journal_write(tiny_llama):
    d = tiny_llama
    strip_metadata(d / "model.safetensors")
    out = run_cli("fix", d, env={"FQCHECK_FAULT": "before-journal-commit:1:enospc"})
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert not (d / ".fqcheck" / "journal.json").exists() and not (d / ".fqcheck" / "lock").exists()
    assert fqcheck.lint(d).findings == []
    assert (d / ".fqcheck" / "backup").is_dir()  # the originals were kept; restore works
    assert run_cli("restore", d).returncode == 0


def test_lock_write_failing_leaves_no_empty_lock(tiny_llama):
    import resource
    import signal
    import subprocess
    import sys
    import time

    d = tiny_llama
    strip_metadata(d / "model.safetensors")

    def tiny_files():  # every write fails (EFBIG), as at 0 free bytes (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    out = subprocess.run([sys.executable, "-m", "fqcheck", "fix", str(d)], capture_output=True, text=True,
                         preexec_fn=tiny_files)
    assert out.returncode == 2 and "lock" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (d / ".fqcheck").exists()  # no empty lock left behind
    t = time.monotonic()
    assert fqcheck.fix(d).ok
    assert time.monotonic() - t < 4  # not blocked by a lock "being written"


def test_journal_temp_debris_is_cleaned(tiny_llama):
    d = tiny_llama
    strip_metadata(d / "model.safetensors")
    (d / ".fqcheck").mkdir()
    (d / ".fqcheck" / "journal.json.tmp.0123456789abcdef").write_text('{"half": ')
    fqcheck.fix(d)
    assert not (d / ".fqcheck").exists() or not list((d / ".fqcheck").glob("journal.json.tmp*"))


# ---- links that point outside -------------------------------------------------------------

def test_outside_shard_link_is_not_read(tiny_llama, outside):
    d = tiny_llama
    os.symlink(outside / "secret.txt", d / "extra.safetensors")
    before = tree(outside)
    rep = fqcheck.lint(d)
    leak = str(struct.unpack("<Q", b"TOPSECRE")[0])
    assert [(f.code, f.file) for f in rep.findings] == [("IDX009", "extra.safetensors")]
    assert not any(leak in f.message or "TOPSECRE" in f.message for f in rep.findings)
    assert tree(outside) == before


def test_outside_config_link_is_not_read_nor_copied_in(tiny_llama, outside):
    d = tiny_llama
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_x.XModel"}  # CFG002, fixable: would rewrite config.json
    cfg["api_token"] = "hunter2"
    (outside / "config.json").write_text(json.dumps(cfg))
    (d / "config.json").unlink()
    os.symlink(outside / "config.json", d / "config.json")
    before = tree(outside)
    rep = fqcheck.lint(d)
    assert "CFG002" not in {f.code for f in rep.findings}
    assert ("IDX009", "config.json") in {(f.code, f.file) for f in rep.findings}
    try:
        fqcheck.fix(d, unsafe_fixes=True)
    except Exception:  # noqa: BLE001 - refusing is fine; copying the secret in is not
        pass
    for p in d.rglob("*"):
        assert p.is_symlink() or not p.is_file() or b"hunter2" not in p.read_bytes(), p
    assert tree(outside) == before


def test_output_copy_keeps_an_outside_link_as_a_link(tiny_llama, outside, tmp_path):
    d = tiny_llama
    strip_metadata(d / "model.safetensors")
    os.symlink(outside / "secret.txt", d / "tokenizer.json")
    with pytest.raises(fqcheck.FixRefused, match="IDX009 tokenizer.json"):
        fqcheck.fix(d, output=tmp_path / "copy")  # the link is an error: refused, nothing written
    assert not (tmp_path / "copy").exists()
    res = fqcheck.fix(d, output=tmp_path / "copy", ignore=["IDX009"])  # told to go on: the link is kept
    out = tmp_path / "copy"
    assert res.written == ["model.safetensors"]
    assert (out / "tokenizer.json").is_symlink()  # the secret is not read into the copy
    for p in out.rglob("*"):
        assert p.is_symlink() or b"TOPSECRET" not in p.read_bytes()


def test_cache_lookalike_with_blobs_linked_to_root(tiny_llama, outside, tmp_path):
    snap = tmp_path / "x--y" / "snapshots" / "r"
    snap.parent.mkdir(parents=True)
    shutil.copytree(tiny_llama, snap)
    os.symlink("/", tmp_path / "x--y" / "blobs")
    os.symlink(outside / "secret.txt", snap / "extra.safetensors")
    rep = fqcheck.lint(snap)
    assert ("IDX009", "extra.safetensors") in {(f.code, f.file) for f in rep.findings}
    # a genuine cache repo: blobs/ a real directory
    repo = tmp_path / "models--o--n"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    shutil.copytree(tiny_llama, repo / "snapshots" / "r")
    real = repo / "snapshots" / "r" / "model.safetensors"
    os.rename(real, repo / "blobs" / "abc123")
    os.symlink("../../blobs/abc123", real)
    assert fqcheck.lint(repo / "snapshots" / "r").findings == []
    os.unlink(repo / "blobs" / "abc123")  # the same with blobs/ a link: refused
    (repo / "blobs").rmdir()
    shutil.move(str(tiny_llama / "model.safetensors"), str(outside / "abc123"))
    os.symlink(outside, repo / "blobs")
    assert ("IDX009", "model.safetensors") in {(f.code, f.file) for f in fqcheck.lint(repo / "snapshots" / "r").findings}


@pytest.mark.parametrize("target", ["config.json", "pytorch_model.bin"])
def test_index_mapping_to_a_non_safetensors_file(sharded_llama, target):
    d = sharded_llama
    if target == "pytorch_model.bin":
        import torch
        torch.save({"x": torch.zeros(2)}, d / target)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    moved = sorted(idx["weight_map"])[:2]
    for t in moved:
        idx["weight_map"][t] = target
    write_index(d, idx)
    hits = [f for f in fqcheck.lint(d).findings if f.code == "IDX003"]
    assert [(f.file, "not a safetensors file" in f.message) for f in hits] == [(target, True)]


# ---- lone surrogates (valid JSON escapes / pickle strings, not UTF-8 text) --------------------

def test_lone_surrogates_in_config_and_pickle(tmp_path):
    import torch
    from builders import save_shard
    d = tmp_path / "ckpt"
    d.mkdir()
    save_shard(d / "model.safetensors", {"w": torch.zeros(2)})
    (d / "config.json").write_text('{"model_type": "llama", "auto_map": {"AutoModel": "mod\\ud800x.X"}, '
                                   '"k\\udc00": "\\udfff"}')
    mod = "os\ud800".encode("utf-8", "surrogatepass")  # pickle's BINUNICODE decodes with surrogatepass
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x8c" + bytes([len(mod)]) + mod + b"\x8c\x06system\x93.")
    for fmt in ("text", "github", "junit", "sarif"):
        out = run_cli("lint", d, "-f", fmt, "-o", tmp_path / f"out.{fmt}")
        assert out.returncode == 1 and out.stderr == "", out.stderr
        text = (tmp_path / f"out.{fmt}").read_text(encoding="utf-8")
        assert "PKL001" in text and "CFG002" in text
        if fmt == "sarif":
            text = " ".join(r["message"]["text"] for r in json.loads(text)["runs"][0]["results"])
        assert "os\\ud800.system" in text and "mod\\ud800x.py" in text
    out = run_cli("lint", d, "-f", "github")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    before = tree(d)
    out = run_cli("fix", d, "--ignore", "PKL001")
    assert out.returncode == 2 and "lone surrogate" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert tree(d) == before


@pytest.mark.parametrize("where", ["under-a-file", "proc", "inside", "same"])
def test_output_onto_a_bad_path_is_a_one_line_error(tiny_llama, tmp_path, where):
    d = tiny_llama
    strip_metadata(d / "model.safetensors")
    (tmp_path / "plain").write_text("x")
    out = {"under-a-file": tmp_path / "plain" / "copy", "proc": Path("/proc/self/fqcheck-copy"),
           "inside": d / "copy", "same": d}[where]
    before = tree(d)
    r = run_cli("fix", d, "--output", out)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and str(out) in r.stderr
    if where in ("inside", "same"):
        assert "outside the checkpoint" in r.stderr
    assert tree(d) == before and (tmp_path / "plain").read_text() == "x"


def test_dry_run_and_output_refuse_a_pending_fix_and_write_nothing(tiny_llama, tmp_path):
    d = tiny_llama
    strip_metadata(d / "model.safetensors")
    plant(d, journal(state="writing"))
    before = tree(d)
    for args in (["--dry-run"], ["--output", tmp_path / "copy"]):
        r = run_cli("fix", d, *args)
        assert r.returncode == 2 and "interrupted fix is pending" in r.stderr, r.stderr
        assert tree(d) == before and not (tmp_path / "copy").exists()


def test_planted_files_in_the_backup_folder(tiny_llama):
    d = tiny_llama
    (d / ".fqcheck" / "backup").mkdir(parents=True)
    (d / ".fqcheck" / "backup" / "20260101T000000Z").write_text("a file, not a backup folder")
    strip_metadata(d / "model.safetensors")
    assert fqcheck.fix(d).ok  # its recovery step skips what is not a real folder
    out = run_cli("restore", d)
    assert out.returncode == 0 and "model.safetensors" in out.stdout, out.stderr
    assert (d / ".fqcheck" / "backup" / "20260101T000000Z").read_text() == "a file, not a backup folder"


def test_backup_parent_that_is_a_link_is_refused(tiny_llama, outside):
    d = tiny_llama
    strip_metadata(d / "model.safetensors")
    (outside / "bk").mkdir()
    (d / ".fqcheck").mkdir()
    os.symlink(outside / "bk", d / ".fqcheck" / "backup")
    before = tree(d), tree(outside)
    out = run_cli("fix", d)
    assert out.returncode == 2 and "not a directory" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert (tree(d), tree(outside)) == before  # no temp file, no journal left behind

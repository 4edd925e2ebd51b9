"""`python -m fqcheck.demo DIR` writes the README's first example: a small broken export."""
import json
import os
import subprocess
import sys

from safetensors import safe_open

from fqcheck.api import lint

ENV = dict(os.environ, PYTHONPATH=os.getcwd())


def test_demo_writes_a_broken_export_that_lint_flags(tmp_path):
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-c", "import sys, fqcheck.demo as d; rc = d.main([sys.argv[1]]); "
                        "print('torch' in sys.modules, 'transformers' in sys.modules); sys.exit(rc)", str(out)],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert f"fqcheck lint {out}" in r.stdout and r.stdout.strip().endswith("False False")  # no torch needed

    # Real safetensors files: the reference reader opens every shard; one lacks __metadata__.
    metas = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as g:
            metas[f.name] = (g.metadata(), list(g.keys()))
    assert metas["model-00002-of-00002.safetensors"][0] is None
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    leaked = [t for t in index["weight_map"] if t.endswith("_quantizer._amax")]
    assert "model.layers.0.self_attn.q_proj.input_quantizer._amax" in leaked and len(leaked) == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] and not (out / "modeling_llama_fq.py").exists()

    report = lint(out)
    sft006 = [(f.file, f.tensor) for f in report.findings if f.code == "SFT006"]
    assert sft006 == [("model-00002-of-00002.safetensors", None)]
    cli = subprocess.run([sys.executable, "-m", "fqcheck", "lint", str(out)], capture_output=True, text=True, env=ENV)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "SFT006" in cli.stdout


def test_demo_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "fqcheck.demo", str(tmp_path)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert (tmp_path / "x").read_text() == "keep me"

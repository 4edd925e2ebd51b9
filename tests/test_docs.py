"""README's claims that code can check: the custom-rule example works as written, the fix section
names every fixable rule, and TEN002's fix does what it says."""
import re
from pathlib import Path

import torch
from typer.testing import CliRunner

from builders import load_shard, save_shard, save_tiny_model
from fixhelp import tensor_bytes
from fqcheck.api import lint
from fqcheck.catalog import load_catalog
from fqcheck.cli import app

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    return README[start:README.find("\n#", start + 1)]


def _custom_rule_example():
    part = _section("**Your own rules**")
    [path] = re.findall(r"`([\w/-]+/(\w+)\.toml)`", part)
    return path, re.search(r"```toml\n(.*?)```", part, re.S).group(1)


def test_readme_custom_rule_runs_under_the_name_it_is_given(tmp_path):
    (path, code), text = _custom_rule_example()
    rule = tmp_path / path
    rule.parent.mkdir(parents=True)
    rule.write_text(text)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_shard(ckpt / "model.safetensors", {"x.lora_A.weight": torch.zeros(2, 2), "x.weight": torch.zeros(2, 2)})
    [f] = lint(ckpt, select=[code], rules_dirs=[rule.parent]).findings
    assert (f.code, f.tensor, f.severity, f.fixable) == (code, "x.lora_A.weight", "error", "safe")


def test_rule_file_named_otherwise_is_a_usage_error_naming_the_right_name(tmp_path):
    (_, code), text = _custom_rule_example()
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "no-lora.toml").write_text(text)
    r = CliRunner().invoke(app, ["lint", str(tmp_path), "--rules", str(rules)])
    assert r.exit_code == 2
    [line] = r.stderr.strip().splitlines()
    assert "no-lora.toml" in line and f"name the file {code}.toml" in line


def test_readme_fix_section_names_every_fixable_rule():
    fix_section = _section("## fqcheck fix")
    fixable = sorted(c for c, r in load_catalog().items() if r.fixable)
    # codes appear alone or in a run such as "IDX001/002/004"
    named = set(re.findall(r"\b[A-Z]{3}\d{3}\b", fix_section))
    for family, numbers in re.findall(r"\b([A-Z]{3})(\d{3}(?:/\s*\d{3})+)", fix_section):
        named |= {family + n.strip() for n in numbers.split("/")}
    assert [c for c in fixable if c not in named] == []


def test_readme_ten002_fix_drops_the_tied_copy_of_the_embedding(tmp_path):
    # "a stored lm_head.weight byte-identical to the input embedding is dropped when
    # tie_word_embeddings is true"
    d = save_tiny_model(tmp_path / "m", tie=True)
    shard = d / "model.safetensors"
    tensors = load_shard(shard)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_shard(shard, tensors)
    r = CliRunner().invoke(app, ["fix", str(d), "--deep", "--select", "TEN002"])
    assert r.exit_code == 0, r.output
    after = load_shard(shard)
    assert sorted(after) == sorted(set(tensors) - {"lm_head.weight"})
    assert all(tensor_bytes(after[k]) == tensor_bytes(tensors[k]) for k in after)
    assert lint(d, deep=True, select=["TEN002"]).findings == []

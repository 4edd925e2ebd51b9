"""ARC header half: the default lint (no --arch, no torch import) finds the defects vLLM crashes on
or silently loads wrong: a layer's weight missing, a weight mis-shaped, a tensor the architecture lacks."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from builders import edit_shard, load_shard, read_config, read_index, save_tiny_model, write_config
from fqcheck.api import lint
from fqcheck.fixer.edits import DropTensor

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, num_hidden_layers=4, mlp_only_layers=[0])


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("arc-header")
    return {"llama": save_tiny_model(root / "llama", "llama"),
            "qwen2": save_tiny_model(root / "qwen2", "qwen2", shards=2),
            "moe": save_tiny_model(root / "moe", "qwen3_moe", **MOE)}


def copy(bases, tmp_path, which) -> Path:
    return Path(shutil.copytree(bases[which], tmp_path / which))


def arc(d):
    r = lint(d)  # the default lint: no flags
    assert {"ARC001", "ARC002", "ARC003"} <= set(r.rules_run)
    return [(f.code, f.file, f.tensor) for f in r.findings if f.code.startswith("ARC")], r


@pytest.mark.parametrize("which", ["llama", "qwen2", "moe"])
def test_clean_checkpoints_have_no_findings_by_default(bases, which):
    assert lint(bases[which]).findings == []


def test_missing_weight_found_by_default(bases, tmp_path):
    d = copy(bases, tmp_path, "llama")
    edit_shard(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    found, r = arc(d)
    assert found == [("ARC002", "config.json", "model.layers.1.mlp.down_proj.weight")]
    assert "vLLM 0.32 loads without it" in r.findings[0].message


def test_wrong_shape_found_by_default(bases, tmp_path):
    d = copy(bases, tmp_path, "llama")
    name = "model.layers.0.mlp.down_proj.weight"
    fname = edit_shard(d, lambda t: t.__setitem__(name, t[name][:, :48].clone()))
    found, r = arc(d)
    assert found == [("ARC003", fname, name)]
    assert "has shape [32, 48], expected [32, 64]" in r.findings[0].message


def test_unknown_tensor_found_by_default_and_fixed(bases, tmp_path):
    import fqcheck
    d = copy(bases, tmp_path, "qwen2")
    fname = read_index(d)["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    before = {f: (d / f).read_bytes() for f in read_index(d)["weight_map"].values()}
    name = "model.layers.0.mlp.extra_gate.weight"
    edit_shard(d, lambda t: t.__setitem__(name, torch.ones(4, 32, dtype=torch.bfloat16)), fname)
    found, r = arc(d)
    assert found == [("ARC001", fname, name)]
    f = r.findings[0]
    assert (f.fixable, f.fix) == ("safe", DropTensor(fname, name))
    res = fqcheck.fix(d, backup=False)  # the default fix, as the default lint found it
    assert [(a.code, a.tensor) for a in res.applied if a.code == "ARC001"] == [("ARC001", name)] and res.ok
    after = load_shard(d / fname)
    assert name not in after and name not in read_index(d)["weight_map"]
    assert all((d / f).read_bytes() == b for f, b in before.items() if f != fname)  # other shards untouched


def test_moe_missing_expert_and_extra_module(bases, tmp_path):
    d = copy(bases, tmp_path, "moe")
    gone = "model.layers.2.mlp.experts.3.down_proj.weight"
    extra = "model.layers.3.mlp.router_bias.weight"

    def damage(t):
        t.pop(gone, None)
        t[extra] = torch.zeros(4, dtype=torch.bfloat16)
    edit_shard(d, damage)
    found, r = arc(d)
    assert found == [("ARC002", "config.json", gone), ("ARC001", "model.safetensors", extra)]
    # a generic (not config-derived) guess: dropping needs --unsafe-fixes
    assert [f.fixable for f in r.findings if f.code == "ARC001"] == ["unsafe"]


def test_dense_then_moe_layers_are_two_kinds(bases):
    # layer 0 is dense (mlp_only_layers), layers 1-3 MoE: no finding for either pattern
    names = load_shard(next(bases["moe"].glob("*.safetensors")))
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate.weight" not in names
    assert lint(bases["moe"], select=["ARC"]).findings == []


def test_absurd_layer_count_is_one_finding_and_cheap(bases, tmp_path):
    d = copy(bases, tmp_path, "llama")
    cfg = read_config(d)
    cfg["num_hidden_layers"] = 250000
    write_config(d, cfg)
    found, r = arc(d)
    assert found == [("ARC002", "config.json", "model.layers.2")]
    assert "249998 of the 250000 layers config.json declares" in r.findings[0].message


def test_real_quantized_fp8_layout_is_not_flagged(bases, tmp_path):
    # an FP8 export: float8 weights of the float shape plus per-tensor weight_scale / input_scale
    d = copy(bases, tmp_path, "llama")

    def to_fp8(t):
        for n in [n for n in t if n.endswith("_proj.weight")]:
            t[n] = t[n].to(torch.float8_e4m3fn)
            t[n.replace(".weight", ".weight_scale")] = torch.tensor(1.0)
            t[n.replace(".weight", ".input_scale")] = torch.tensor(1.0)
        t["model.layers.0.self_attn.k_scale"] = torch.tensor(1.0)
    edit_shard(d, to_fp8)
    cfg = read_config(d)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    write_config(d, cfg)
    assert [f for f in lint(d, select=["ARC"]).findings] == []


def test_header_half_imports_neither_torch_nor_transformers(bases, tmp_path):
    d = copy(bases, tmp_path, "llama")
    edit_shard(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    code = ("import sys, fqcheck; r = fqcheck.lint(sys.argv[1]); "
            "assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules); "
            "print(sorted(f.code for f in r.findings))")
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['ARC002']"


def test_tensors_of_a_missing_shard_are_idx003s_not_arc002s(bases, tmp_path):
    d = copy(bases, tmp_path, "qwen2")
    gone = sorted(set(read_index(d)["weight_map"].values()))[0]
    (d / gone).unlink()
    r = lint(d)
    assert {f.code for f in r.findings if f.severity == "error"} == {"IDX003"}


@pytest.mark.parametrize("method", ["modelopt-nvfp4", "compressed-tensors-packed", "gptq"])
def test_packed_real_quantized_layouts_are_not_flagged(bases, tmp_path, method):
    # packed weights of another shape (or another name) plus their scales, as the method declares
    d = copy(bases, tmp_path, "llama")

    def pack(t):
        for n in [n for n in t if n.endswith("_proj.weight")]:
            out, inp = t[n].shape
            base = n[: -len(".weight")]
            if method == "modelopt-nvfp4":
                t[n] = torch.zeros(out, inp // 2, dtype=torch.uint8)
                t[f"{base}.weight_scale"] = torch.ones(out, inp // 16).to(torch.float8_e4m3fn)
                t[f"{base}.weight_scale_2"] = torch.tensor(1.0)
                t[f"{base}.input_scale"] = torch.tensor(1.0)
            elif method == "compressed-tensors-packed":
                del t[n]
                t[f"{base}.weight_packed"] = torch.zeros(out, inp // 8, dtype=torch.int32)
                t[f"{base}.weight_scale"] = torch.ones(out, inp // 32, dtype=torch.bfloat16)
                t[f"{base}.weight_shape"] = torch.tensor([out, inp])
            else:
                del t[n]
                t[f"{base}.qweight"] = torch.zeros(inp // 8, out, dtype=torch.int32)
                t[f"{base}.qzeros"] = torch.zeros(1, out // 8, dtype=torch.int32)
                t[f"{base}.scales"] = torch.ones(1, out, dtype=torch.float16)
                t[f"{base}.g_idx"] = torch.zeros(inp, dtype=torch.int32)
    edit_shard(d, pack)
    cfg = read_config(d)
    if method == "modelopt-nvfp4":
        (d / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "NVFP4"}}')
    else:
        cfg["quantization_config"] = {"quant_method": method.split("-packed")[0]}
    write_config(d, cfg)
    assert lint(d, select=["ARC"]).findings == []


def test_layers_past_num_hidden_layers_are_not_compared(bases, tmp_path):
    # DeepSeek-V3/R1 ship a multi-token-prediction layer (index num_hidden_layers) with modules of its
    # own; loaders skip it, and so does the comparison of the layers
    d = copy(bases, tmp_path, "moe")

    def add_mtp(t):
        for n in [n for n in t if n.startswith("model.layers.3.")]:
            t[n.replace("layers.3.", "layers.4.")] = t[n].clone()
        for m in ("enorm", "hnorm"):
            t[f"model.layers.4.{m}.weight"] = torch.ones(32, dtype=torch.bfloat16)
        t["model.layers.4.eh_proj.weight"] = torch.ones(32, 64, dtype=torch.bfloat16)
    edit_shard(d, add_mtp)
    assert lint(d, select=["ARC"]).findings == []


def test_experts_agree_reads_the_shard_texts_as_if_joined():
    """_experts_agree counts over each shard's text as it would over their concatenation, wherever the
    shards cut the experts (a cut can fall right before a line that starts with the first expert's prefix)."""
    import random

    from fqcheck.checks.arc_layers import _experts_agree

    def joined_agree(text: str, cfg: dict) -> bool:  # the definition, over one text
        import re
        m = re.match(r"(.*\.experts\.\d+\.)(\S+)$", text[:text.index("\n")])
        own = text.count("\n" + m.group(1)) + 1
        layers = text.count(f".experts.0.{m.group(2)}\n")
        return text.count("\n") == cfg["n_routed_experts"] * layers * own

    rng = random.Random(0)
    for _ in range(200):
        experts, layers = rng.randint(1, 4), rng.randint(1, 3)
        lines = [f"model.layers.{i}.mlp.experts.{e}.{p}.weight\n" for i in range(layers) for e in range(experts)
                 for p in ("down_proj", "gate_proj")]
        if rng.random() < 0.5:  # a tensor lost or one too many
            lines.pop(rng.randrange(len(lines))) if rng.random() < 0.5 else lines.append(lines[0])
        cuts = sorted(rng.sample(range(1, len(lines)), min(len(lines) - 1, rng.randint(0, 4))))
        texts = ["".join(lines[a:b]) for a, b in zip([0, *cuts], [*cuts, len(lines)])]
        cfg = {"n_routed_experts": experts}
        assert _experts_agree(texts, cfg) == joined_agree("".join(texts), cfg)

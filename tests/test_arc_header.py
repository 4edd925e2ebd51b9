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


# --- the fast split of the expert tensors against the name-by-name definition it stands in for ---

def _split_by_name(ckpt):
    """_split_experts and _experts_agree's inputs as first written: a shard all experts by its count
    (n == len(names) and the first name an expert's), else every name tested; a mixed shard's experts
    copied into their own text."""
    from itertools import compress
    names, shapes, texts = [], [], []
    for h in ckpt.headers().values():
        n = h.joined.count(".experts.")
        if n == 0:
            names += h.names
            shapes += h.shapes()
        elif n == len(h.names) and ".experts." in h.names[0]:
            texts.append(h.joined)
        else:
            mask = [".experts." in x for x in h.names]
            texts.append("\n".join(compress(h.names, mask)) + "\n")
            names += compress(h.names, [not m for m in mask])
            shapes += compress(h.shapes(), [not m for m in mask])
    return names, shapes, texts


def _agree_by_definition(texts, cfg) -> bool:
    import re
    from fqcheck.checks.arc_layers import EXPERT_KEYS, _int
    declared = next((cfg[k] for k in EXPERT_KEYS if _int(cfg, k)), None)
    m = re.match(r"(.*\.experts\.\d+\.)(\S+)$", texts[0][:texts[0].index("\n")])
    if declared is None or m is None:
        return False
    first, line = m.group(1), f".experts.0.{m.group(2)}\n"
    own = sum(t.count("\n" + first) + t.startswith(first) for t in texts)
    layers = sum(t.count(line) for t in texts)
    return sum(t.count("\n") for t in texts) == declared * layers * own


class _Shards:
    def __init__(self, headers):
        self._h = headers

    def headers(self):
        return self._h


def _columns_header(names, kinds_of, newline_free):
    """A header as the fast path leaves it: names and, per name, a kind number into (dtype, shape)."""
    from fqcheck.checkpoint.safetensors import SafetensorsHeader
    h = SafetensorsHeader(Path("m.safetensors"), 0)
    h.names = list(names)
    kinds = sorted(set(kinds_of))
    h._columns = ([("BF16", (k + 1,), 2 * (k + 1)) for k in kinds], bytes(map(kinds.index, kinds_of)), None)
    h.newline_free = newline_free
    return h


_ODD = ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.shared_experts.up_proj.weight", "lm_head.weight",
        "a.experts.b.experts.c", "x.experts.0.experts.1.w", "p\nmodel.layers.1.mlp.experts.0.down_proj.weight",
        "model.layers.1.mlp.experts.0.down_proj.weight\nq", "r\ns", "model.layers.1.mlp.experts.0.",
        "model.layers.2.mlp.experts.0.down_proj.weight", "model.layers.1.mlp.experts.0.gate_proj.weight"]


def _layout(data):
    from hypothesis import strategies as st
    experts, layers = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    leaves = data.draw(st.lists(st.sampled_from(["down_proj.weight", "gate_proj.weight", "up_proj.bias"]),
                                min_size=1, max_size=3, unique=True))
    names = [f"model.layers.{i}.mlp.experts.{e}.{leaf}" for i in range(1, layers + 1) for e in range(experts)
             for leaf in leaves]
    names += [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(layers + 1)]
    for op in data.draw(st.lists(st.tuples(st.sampled_from(["add", "drop", "dup"]), st.integers(0, 99)), max_size=3)):
        if op[0] == "add":
            names.append(_ODD[op[1] % len(_ODD)])
        elif op[0] == "drop" and names:
            names.pop(op[1] % len(names))
        elif names:
            names.append(names[op[1] % len(names)] + ".x")
    names = list(dict.fromkeys(data.draw(st.permutations(names))))  # in any header order, each once
    cuts = sorted(data.draw(st.lists(st.integers(0, len(names)), max_size=4)))
    shards = [names[a:b] for a, b in zip([0, *cuts], [*cuts, len(names)])]
    headers = {}
    for j, ns in enumerate(shards):
        kinds_of = [data.draw(st.integers(0, 3)) for _ in ns]
        free = not any("\n" in x for x in ns) and data.draw(st.booleans())  # the reader's promise, or unknown
        headers[f"m-{j}.safetensors"] = _columns_header(ns, kinds_of, free)
    return _Shards(headers), {"num_experts": experts}


def test_split_experts_agrees_with_the_name_by_name_definition():
    """Whatever the shards mix and in whatever order, with names that hold '.experts.' twice or a
    newline: the same other names and shapes, and the same verdict on the experts."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from fqcheck.checks.arc_layers import _experts_agree, _split_experts

    @settings(max_examples=600, deadline=None)
    @given(data=st.data())
    def check(data):
        ckpt, cfg = _layout(data)
        names, shapes, texts = _split_by_name(ckpt)
        got_names, got_shapes, experts = _split_experts(ckpt)
        assert (got_names, got_shapes) == (names, shapes)
        assert (experts is None) == (not texts)
        if texts:
            assert experts.lines == sum(t.count("\n") for t in texts)
            assert _experts_agree(experts.texts, cfg, experts.lines, experts.first) == _agree_by_definition(texts, cfg)
    check()


def test_split_experts_agreeing_layouts_are_found():
    """The property test above is no vacuous pass: regular layouts, cut anywhere, some mixed with other
    names, agree both ways."""
    from fqcheck.checks.arc_layers import _experts_agree, _split_experts
    names = [f"model.layers.{i}.mlp.experts.{e}.{p}.weight" for i in (1, 2) for e in range(3) for p in ("up", "down")]
    names[5:5] = ["model.layers.1.mlp.gate.weight", "model.layers.1.input_layernorm.weight"]
    for cuts in ([], [3], [5, 7], [1, 6, 9]):
        parts = [names[a:b] for a, b in zip([0, *cuts], [*cuts, len(names)])]
        ckpt = _Shards({f"m-{j}": _columns_header(p, [0] * len(p), j % 2 == 0) for j, p in enumerate(parts)})
        _, _, texts = _split_by_name(ckpt)
        got = _split_experts(ckpt)
        assert _agree_by_definition(texts, {"num_experts": 3})
        assert _experts_agree(got[2].texts, {"num_experts": 3}, got[2].lines, got[2].first)
        assert got[:2] == (["model.layers.1.mlp.gate.weight", "model.layers.1.input_layernorm.weight"], [(1,), (1,)])

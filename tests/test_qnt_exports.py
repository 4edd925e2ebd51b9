"""Issue 13 on exports made by nvidia-modelopt 0.47 itself (tests/mobuild.py), on the CPU: clean
FakeQuant exports are clean; the offloaded (pre-PR-1194) export is found exactly; plain `fix` never
leaves raw weights behind without a finding; the re-fold equals Model Optimizer's own output."""
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (the [test] extra) builds these exports")
pytest.importorskip("accelerate", reason="accelerate offloads the layer the pre-PR-1194 export left raw")

import mobuild as mb  # noqa: E402
from builders import load_shard, save_shard  # noqa: E402
from fqcheck.api import lint  # noqa: E402
from fqcheck.fixer.errors import FixRefused  # noqa: E402
import fqcheck  # noqa: E402
from fqcheck.quant.formats import QuantSpec, fold  # noqa: E402

CLEAN = ["FP8_DEFAULT_CFG", "FP8_PER_CHANNEL", "INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG", "INT4_AWQ_CFG",
         "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"]  # W4A8_AWQ_BETA_CFG: its own test below
OFFLOADED = ["FP8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG"]
SHARD = "model.safetensors"
_BUILT: dict = {}


def built(factory, key, make):
    """Each export is made once per session; tests get their own copy."""
    if key not in _BUILT:
        _BUILT[key] = make(factory.mktemp(key.replace("/", "-")))
    return _BUILT[key]


@pytest.fixture(scope="session")
def clean(tmp_path_factory):
    return lambda name, tie=False: built(tmp_path_factory, f"clean-{name}-{tie}",
                                         lambda d: mb.export(d / "export", name, tie)[0])


@pytest.fixture(scope="session")
def offloaded(tmp_path_factory):
    """name -> (export dir, the quantized model it came from)."""
    def make(name):
        def go(d):
            base = built(tmp_path_factory, "base", lambda b: mb.save_base(b / "base"))
            m = mb.offloaded_model(base, d, name)
            return mb.prefix_export(d / "export", m), m
        return built(tmp_path_factory, f"offloaded-{name}", go)
    return make


def copy(src, tmp_path, name="x"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def linears(layer=None):
    layers = range(2) if layer is None else [layer]
    return sorted(f"model.layers.{i}.{m}.weight" for i in layers for m in mb.LINEAR_NAMES)


def found(report, code=None):
    return sorted((f.code, f.tensor) for f in report.findings if code is None or f.code == code)


# ---- clean exports: nothing to say, header-only and deep -----------------------------------------
@pytest.mark.parametrize("name,tie", [(n, False) for n in CLEAN] + [("FP8_DEFAULT_CFG", True)])
def test_clean_modelopt_export_has_no_findings(clean, name, tie):
    """Part 2 included: a tied-embedding export lists disabled lm_head quantizers with empty buffers
    in its state and stores no lm_head.weight; neither is a QNT003."""
    d = clean(name, tie)
    assert found(lint(d)) == []
    assert found(lint(d, deep=True, device="cpu")) == []


def test_modelopt_w4a8_export_leaves_its_weights_unfolded_and_deep_lint_says_so(clean):
    """Model Optimizer 0.47's FakeQuant export folds TensorQuantizer weights only: a
    SequentialQuantizer's (W4A8_AWQ: INT4 blocks then FP8) stay raw, and the state it writes strips
    their amax. A folded INT4 block holds at most 16 distinct values; these hold ~128."""
    d = clean("W4A8_AWQ_BETA_CFG")
    assert found(lint(d)) == []  # nothing a header shows
    deep = lint(d, deep=True, device="cpu")
    assert found(deep) == [("QNT002", w) for w in linears()]
    for f in deep.findings:
        assert f.message.startswith(f"{f.tensor}: a block of 128 holds ") and f.fix is None
        assert "more than the 16 an INT4 fold leaves" in f.message and "no amax is stored" in f.message


# ---- the offloaded export ------------------------------------------------------------------------
def raw_weights(name):
    """Weights the pre-PR-1194 export left raw: the offloaded layer, and for W4A8 every layer
    (Model Optimizer 0.47's _fakequant_module_weights folds TensorQuantizers only, so it skips a
    SequentialQuantizer wherever the layer sits)."""
    return linears() if name == "W4A8_AWQ_BETA_CFG" else linears(1)


@pytest.mark.parametrize("name", OFFLOADED)
def test_offloaded_export_gives_exactly_its_findings(offloaded, name):
    d, _ = offloaded(name)
    leaked = sorted(t for t in load_shard(d / SHARD) if "_quantizer." in t)
    header = lint(d)
    assert found(header) == [("QNT001", t) for t in leaked]
    for f in header.findings:  # a weight amax says its weight may be raw, and how to check
        assert f.message.startswith(f"quantizer state {f.tensor} leaked into the weights")
        assert ("may be left unquantized (check with --deep)" in f.message) == (".weight_quantizer" in f.tensor)
    deep = lint(d, deep=True, device="cpu")
    assert found(deep, "QNT002") == [("QNT002", w) for w in raw_weights(name)]
    assert {f.code for f in deep.findings} == {"QNT001", "QNT002"}
    assert all("format from vllm_fq_modelopt_state.pth" in f.message for f in deep.findings if f.code == "QNT002")


def check_refold(out, src, m, name):
    """The re-folded weights against Model Optimizer's own fold of the raw ones, byte for byte.
    FP8 on this CPU: modelopt runs its eager form, fqcheck re-folds in its CUDA form (the folded
    weights cannot tell which device made them), so exactly the elements where the two forms differ
    may differ, and there fqcheck holds the CUDA form's bytes."""
    raw, after = load_shard(src / SHARD), load_shard(out / SHARD)
    names = raw_weights(name)
    want = mb.modelopt_fold(m, {k: raw[k] for k in names})
    for k in names:
        a, b = after[k].view(torch.int16), want[k].view(torch.int16)
        if name.startswith("FP8"):
            amax = raw[k.replace(".weight", ".weight_quantizer._amax")].float()
            cuda, eager = (fold(raw[k], QuantSpec("fp8", amax), "cpu", v).view(torch.int16) for v in (0, 1))
            assert torch.equal(eager, b), k  # fqcheck's eager form is modelopt's CPU output
            assert torch.equal(a, cuda), k
            assert torch.equal(a != b, cuda != eager), k
        else:
            assert torch.equal(a, b), k
    for k in raw:  # everything else: untouched bytes, and the leaks gone
        if k not in names and "_quantizer." not in k:
            assert torch.equal(after[k].view(torch.uint8), raw[k].view(torch.uint8)), k
    assert not [k for k in after if "_quantizer." in k]


@pytest.mark.parametrize("name", OFFLOADED)
def test_plain_fix_refolds_raw_weights_as_modelopt_does(offloaded, name, tmp_path):
    src, m = offloaded(name)
    res = fqcheck.fix(src, output=tmp_path / "out", device="cpu")
    assert sorted(f.tensor for f in res.applied if f.code == "QNT002") == raw_weights(name)
    assert res.ok and found(res.remaining) == []
    assert found(lint(tmp_path / "out", deep=True, device="cpu")) == []  # nothing raw is left unsaid
    check_refold(tmp_path / "out", src, m, name)


@pytest.mark.parametrize("name", ["FP8_DEFAULT_CFG", "INT4_AWQ_CFG"])
def test_fix_deep_output_loads_in_transformers_without_unexpected_keys(offloaded, name, tmp_path):
    from transformers import AutoModelForCausalLM
    src, m = offloaded(name)
    res = fqcheck.fix(src, output=tmp_path / "out", deep=True, device="cpu")
    assert res.ok and sorted(f.tensor for f in res.applied if f.code == "QNT002") == raw_weights(name)
    _, info = AutoModelForCausalLM.from_pretrained(src, output_loading_info=True)
    assert set(info["unexpected_keys"]) == {t for t in load_shard(src / SHARD) if "_quantizer." in t}
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert (set(info["unexpected_keys"]), set(info["missing_keys"])) == (set(), set())
    check_refold(tmp_path / "out", src, m, name)


# ---- where the format comes from when the state file is gone ------------------------------------
@pytest.mark.parametrize("name,fmt", [("FP8_DEFAULT_CFG", "FP8 E4M3 per-tensor"),
                                      ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT4 block")])
def test_without_state_file_the_folded_siblings_decide(offloaded, name, fmt, tmp_path):
    """Layer 0 was folded: its weights sit exactly on one format's grid with their own leaked amax
    (INT4 values are FP8 values too: the coarsest grid every sibling is on wins)."""
    src, m = offloaded(name)
    d = copy(src, tmp_path)
    (d / "vllm_fq_modelopt_state.pth").unlink()
    deep = lint(d, deep=True, device="cpu", select=["QNT002"])
    assert found(deep) == [("QNT002", w) for w in linears(1)]
    assert all(fmt in f.message and "format inferred from 7 folded weight(s)" in f.message for f in deep.findings)
    res = fqcheck.fix(d, output=tmp_path / "out", device="cpu")
    assert res.ok and sorted(f.tensor for f in res.applied if f.code == "QNT002") == linears(1)
    check_refold(tmp_path / "out", src, m, name)


def only_raw_layer_left(src, tmp_path):
    """No state file and no folded sibling with a leaked amax: nothing can decide the format."""
    d = copy(src, tmp_path)
    (d / "vllm_fq_modelopt_state.pth").unlink()
    t = load_shard(d / SHARD)
    save_shard(d / SHARD, {k: v for k, v in t.items() if not (k.startswith("model.layers.0.") and "weight_quantizer" in k)})
    return d


def test_undecidable_weight_is_reported_and_fix_refuses_changing_nothing(offloaded, tmp_path):
    d = only_raw_layer_left(offloaded("FP8_DEFAULT_CFG")[0], tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    deep = lint(d, deep=True, device="cpu", select=["QNT002"])
    assert found(deep) == [("QNT002", w) for w in linears(1)]
    assert all(f.message.startswith(f"{f.tensor}: cannot verify that it is quantized: format unknown")
               and f.fix is None for f in deep.findings)
    with pytest.raises(FixRefused) as e:
        fqcheck.fix(d, device="cpu")
    assert "7 weight(s) have a leaked weight-quantizer amax" in str(e.value) and "--quant-format" in str(e.value)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing changed, no backup folder
    cli = subprocess.run([sys.executable, "-m", "fqcheck", "fix", str(d)], capture_output=True, text=True)
    assert cli.returncode == 2 and "refusing to fix" in cli.stderr and "Traceback" not in cli.stderr


def test_quant_format_option_decides_and_unsafe_fixes_drops_saying_so(offloaded, tmp_path):
    src, m = offloaded("FP8_DEFAULT_CFG")
    d = only_raw_layer_left(src, tmp_path)
    cli = subprocess.run([sys.executable, "-m", "fqcheck", "fix", str(d), "--quant-format", "fp8",
                          "--output", str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "QNT002 7×" in cli.stdout and "no findings remain" in cli.stdout
    check_refold(tmp_path / "out", src, m, "FP8_DEFAULT_CFG")
    res = fqcheck.fix(d, unsafe_fixes=True, output=tmp_path / "dropped", device="cpu")
    assert [n.split(" without")[0] for n in res.plan.notes] == [f"dropped the leaked amax of {w}" for w in linears(1)]
    assert not [f for f in res.applied if f.code == "QNT002"]
    assert sum(line.startswith("note: dropped the leaked amax") for line in res.plan.describe()) == 7
    bad = subprocess.run([sys.executable, "-m", "fqcheck", "lint", str(d), "--quant-format", "fp4"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown --quant-format 'fp4'" in bad.stderr


def test_what_modelopts_own_exporter_leaves_when_it_raises_on_meta_tensors(offloaded, tmp_path):
    """modelopt 0.47's export_hf_vllm_fq_checkpoint on the offloaded model raises NotImplementedError
    ("Cannot copy out of meta tensor") after creating the folder: it is left empty, and fqcheck says
    there are no weights (exit 2), not a traceback and never a green gate."""
    from modelopt.torch.export.plugins.vllm_fakequant_hf import export_hf_vllm_fq_checkpoint
    base = mb.save_base(tmp_path / "base")
    m = mb.offloaded_model(base, tmp_path, "FP8_DEFAULT_CFG")
    with pytest.raises(NotImplementedError, match="meta tensor"):
        export_hf_vllm_fq_checkpoint(m, tmp_path / "half")
    assert list((tmp_path / "half").iterdir()) == []
    cli = subprocess.run([sys.executable, "-m", "fqcheck", "lint", str(tmp_path / "half")], capture_output=True, text=True)
    assert cli.returncode == 2 and "no weights here" in cli.stderr and "Traceback" not in cli.stderr


# ---- part 3 on the GPU: Model Optimizer's CUDA extension, which exports of large models run -------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("name", ["FP8_DEFAULT_CFG", "FP8_PER_CHANNEL"])
def test_gpu_export_fold_is_refolded_bit_identically(name):
    """mtq.quantize on the GPU folds FP8 through modelopt's CUDA extension (fake_e4m3fy): fqcheck's
    default form gives the same bytes on the CPU and on the GPU; its eager form (modelopt's CPU path)
    differs in some elements, which is why the default follows the CUDA extension."""
    from modelopt.torch.quantization.extensions import get_cuda_ext_fp8
    from fqcheck.quant.formats import differing
    assert get_cuda_ext_fp8() is not None, "modelopt's FP8 CUDA extension did not build"
    m = mb.quantize(mb.model().cuda(), name)
    eager_differs = total = 0
    for w_name in linears():
        mod = m.get_submodule(w_name.rsplit(".", 1)[0])
        w = mod.weight.data
        with torch.no_grad():
            want = mod.weight_quantizer(w.float()).to(w.dtype).cpu()
        spec = QuantSpec("fp8", mod.weight_quantizer.amax.float().cpu())
        assert differing(fold(w.cpu(), spec, "cpu"), want) == 0, w_name
        assert differing(fold(w.cpu(), spec, "cuda"), want) == 0, w_name
        eager_differs += differing(fold(w.cpu(), spec, "cpu", variant=1), want)
        total += w.numel()
    print(f"{name}: CUDA-extension fold vs fqcheck eager form: {eager_differs} of {total} elements differ")


def test_declared_quant_algo_decides_before_the_siblings(offloaded, tmp_path):
    """Source 2: hf_quant_config.json's quant_algo (here with no folded sibling left to infer from)."""
    import json
    d = only_raw_layer_left(offloaded("FP8_DEFAULT_CFG")[0], tmp_path)
    (d / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                        "quantization": {"quant_algo": "FP8"}}))
    deep = lint(d, deep=True, device="cpu", select=["QNT002"])
    assert found(deep) == [("QNT002", w) for w in linears(1)]
    assert all("FP8 E4M3 per-tensor" in f.message and "format from hf_quant_config.json" in f.message
               for f in deep.findings)


@pytest.mark.parametrize("name", OFFLOADED)
def test_plain_fix_never_leaves_raw_weights_without_a_finding(offloaded, name, tmp_path):
    """Without the state file: either the weights are decided (re-folded as modelopt folds) or fix
    refuses, changing nothing, and deep lint names every raw weight."""
    src, m = offloaded(name)
    d = copy(src, tmp_path)
    (d / "vllm_fq_modelopt_state.pth").unlink()
    before = (d / SHARD).read_bytes()
    try:
        res = fqcheck.fix(d, output=tmp_path / "out", device="cpu")
    except FixRefused:
        assert (d / SHARD).read_bytes() == before and not (tmp_path / "out").exists()
        named = {f.tensor for f in lint(d, deep=True, device="cpu", select=["QNT002"]).findings}
        assert set(raw_weights(name)) <= named
        return
    assert res.ok and found(lint(tmp_path / "out", deep=True, device="cpu")) == []
    check_refold(tmp_path / "out", src, m, name)

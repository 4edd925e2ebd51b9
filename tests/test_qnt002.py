"""QNT002 (weight left unquantized, deep) and the QNT003 deep half, on real tiny FakeQuant exports."""
import json
import subprocess
import sys

import pytest
import torch

from builders import load_shard, save_shard
from fqbuild import LINEARS, fq_export, linear_modules, quant_cfg, write_state
from fqcheck.api import lint
from fqcheck.checkpoint import Checkpoint
from fqcheck.checkpoint.data import ShardData
from fqcheck.fixer.edits import ReplaceTensor
from fqcheck.quant.formats import QuantSpec, fold
from fqcheck.quant.state import deep_state_problems, load_state

RAW = "model.layers.1.mlp.down_proj.weight"


def qnt002(path, **kw):
    return [f for f in lint(path, select=["QNT002"], deep=True, device="cpu", **kw).findings]


def test_unfolded_weight_in_fp8_export_is_found_with_fraction(tmp_path):
    d = fq_export(tmp_path / "x", unfolded={RAW})
    [f] = qnt002(d)
    assert (f.code, f.severity, f.file, f.tensor, f.fixable) == ("QNT002", "error", "model.safetensors", RAW, "safe")
    assert "FP8 E4M3 per-tensor" in f.message and "model.layers.1.mlp.down_proj.weight_quantizer" in f.message
    frac = float(f.message.split("(")[1].split("%")[0])
    assert 50.0 < frac <= 100.0
    assert isinstance(f.fix, ReplaceTensor) and (f.fix.file, f.fix.tensor) == ("model.safetensors", RAW)


def test_fully_folded_export_and_plain_checkpoint_are_clean(tmp_path, tiny_llama):
    assert qnt002(fq_export(tmp_path / "x")) == []
    assert qnt002(tiny_llama) == []


def test_refold_producer_writes_the_folded_bytes(tmp_path):
    d = fq_export(tmp_path / "x", unfolded={RAW})
    [f] = qnt002(d)
    ckpt = Checkpoint.open(d)
    h = ckpt.header("model.safetensors")
    with ShardData(h) as sd:
        new = f.fix.producer(sd.view(h.tensors[RAW]))
    w = load_shard(d / "model.safetensors")[RAW]
    amax = w.float().abs().amax().to(torch.bfloat16).float()
    want = fold(w, QuantSpec("fp8", amax))
    assert new == want.view(torch.uint8).numpy().tobytes()
    # write it back (as the fix writer does): the weight is now on the grid, nothing left to report
    t = load_shard(d / "model.safetensors")
    t[RAW] = torch.frombuffer(bytearray(new), dtype=torch.bfloat16).reshape(w.shape)
    save_shard(d / "model.safetensors", t)
    assert qnt002(d) == []


def _int4(w):
    return QuantSpec("int", w.float().reshape(-1, 16).abs().amax(1, keepdim=True), 4, False, True, 16)


def _nvfp4(w):
    return QuantSpec("nvfp4", w.float().abs().amax().to(torch.bfloat16).float(), block_size=16)


def _int8_axis(w):
    return QuantSpec("int", w.float().abs().amax(1, keepdim=True).to(torch.bfloat16).float(), 8, False, True)


@pytest.mark.parametrize("spec_of,weight_cfg,fmt", [
    (_int4, {"num_bits": 4, "narrow_range": True, "block_sizes": {-1: 16, "type": "static"}}, "INT4 block 16"),
    (_nvfp4, {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}}, "NVFP4"),
    (_int8_axis, {"num_bits": 8, "axis": 0, "narrow_range": True}, "INT8 per-channel"),
])
def test_other_formats_named_by_the_quant_cfg(tmp_path, spec_of, weight_cfg, fmt):
    d = fq_export(tmp_path / "x", unfolded={RAW}, spec_of=spec_of, cfg=quant_cfg(weight_cfg))
    [f] = qnt002(d)
    assert f.tensor == RAW and fmt in f.message


def test_older_state_with_weight_quantizer_entries_and_amax(tmp_path):
    """Exports before the weight-quantizer strip kept `*.weight_quantizer` in quantizer_state and its
    _amax in modelopt_state_weights: QNT002 uses them when nothing leaked into the shards."""
    d = fq_export(tmp_path / "x", unfolded={RAW}, leak=False)
    assert qnt002(d) == []  # no amax known anywhere: nothing to judge
    state = torch.load(d / "vllm_fq_modelopt_state.pth", weights_only=True)
    t = load_shard(d / "model.safetensors")
    qs = state["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    for m in linear_modules():
        qs[f"{m}.weight_quantizer"] = {**qs[f"{m}.input_quantizer"], "_disabled": True}
        amax = t[f"{m}.weight"].float().abs().amax().to(torch.bfloat16)
        if f"{m}.weight" != RAW:  # the folded weights' amax is what max calibration saw before folding
            amax = load_shard(d / "model.safetensors")[f"{m}.weight"].float().abs().amax().to(torch.bfloat16)
        state["modelopt_state_weights"][f"{m}.weight_quantizer"] = {"_amax": amax}
    torch.save(state, d / "vllm_fq_modelopt_state.pth")
    found = qnt002(d)
    assert [f.tensor for f in found] == [RAW]
    assert "amax from vllm_fq_modelopt_state.pth" in found[0].message


def test_weight_whose_quantizer_the_cfg_disables_is_not_judged(tmp_path):
    d = fq_export(tmp_path / "x", unfolded={RAW},
                  cfg=quant_cfg({"num_bits": (4, 3)}) + [{"quantizer_name": "*down_proj.weight_quantizer",
                                                          "parent_class": None, "enable": False, "cfg": None}])
    assert qnt002(d) == []


# ---- QNT003, deep half ---------------------------------------------------------------------------
def hits(d):
    return [(file, tensor, message) for message, file, tensor in deep_state_problems(Checkpoint.open(d))]


def test_qnt003_deep_clean_export_has_none(tmp_path):
    assert hits(fq_export(tmp_path / "x")) == []


def test_qnt003_leaked_amax_nan_and_nonpositive(tmp_path):
    d = fq_export(tmp_path / "x")
    t = load_shard(d / "model.safetensors")
    t["model.layers.0.self_attn.q_proj.weight_quantizer._amax"] = torch.tensor(float("nan"), dtype=torch.bfloat16)
    t["model.layers.0.self_attn.k_proj.weight_quantizer._amax"] = torch.tensor([[0.5], [-1.0], [0.0]])
    save_shard(d / "model.safetensors", t)
    h = hits(d)
    assert ("model.safetensors", "model.layers.0.self_attn.q_proj.weight_quantizer._amax",
            "model.layers.0.self_attn.q_proj.weight_quantizer._amax has 1 non-finite value(s) of 1") in h
    [k] = [m for f, n, m in h if n == "model.layers.0.self_attn.k_proj.weight_quantizer._amax"]
    assert "2 value(s) <= 0 of 3" in k
    assert len(h) == 2


def test_qnt003_state_file_meta_amax_and_absent_module(tmp_path):
    d = fq_export(tmp_path / "x")
    write_state(d, linear_modules(), quant_cfg({"num_bits": (4, 3)}), extra_modules=["model.layers.7.mlp.up_proj"])
    state = torch.load(d / "vllm_fq_modelopt_state.pth", weights_only=True)
    state["modelopt_state_weights"]["model.layers.0.mlp.up_proj.input_quantizer"]["_amax"] = torch.empty((), device="meta")
    torch.save(state, d / "vllm_fq_modelopt_state.pth")
    h = hits(d)
    assert ("vllm_fq_modelopt_state.pth", None, "model.layers.0.mlp.up_proj.input_quantizer._amax is a meta tensor (no data)") in h
    absent = [m for f, n, m in h if "has no tensors in the weights" in m]
    assert absent and all("model.layers.7.mlp.up_proj" in m for m in absent)


def test_qnt003_state_file_not_loadable_with_weights_only(tmp_path):
    d = fq_export(tmp_path / "x")
    (d / "vllm_fq_modelopt_state.pth").unlink()
    torch.save({"modelopt_state_dict": [], "hook": subprocess.CompletedProcess}, d / "vllm_fq_modelopt_state.pth")
    [(f, n, m)] = hits(d)
    assert f == "vllm_fq_modelopt_state.pth" and "weights_only=True" in m
    (d / "vllm_fq_modelopt_state.pth").write_bytes(b"not a pickle at all")
    [(f, n, m)] = hits(d)
    assert "not loaded" in m and "malformed pickle" in m


def test_state_reader_reads_modelopt_layout(tmp_path):
    d = fq_export(tmp_path / "x")
    st = load_state(Checkpoint.open(d))
    q = st.quantizers["model.layers.0.self_attn.q_proj.weight_quantizer"]
    assert q.weight_name == "model.layers.0.self_attn.q_proj.weight" and q.amax_where == "model.safetensors"
    assert st.config_for(q.name) == (True, st.config_for(q.name)[1]) and st.config_for(q.name)[1]["num_bits"] == (4, 3)
    assert st.config_for("lm_head.weight_quantizer")[0] is False
    iq = st.quantizers["model.layers.0.self_attn.q_proj.input_quantizer"]
    assert iq.amax.dtype == torch.bfloat16 and iq.attrs["_num_bits"] == (4, 3)
    assert len(LINEARS) * 2 * 2 <= len(st.quantizers)


# ---- CLI and the header-only path ----------------------------------------------------------------
def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fqcheck", *args], capture_output=True, text=True)


def test_cli_deep_device_cpu_reports_qnt002(tmp_path):
    d = fq_export(tmp_path / "x", unfolded={RAW})
    out = run_cli("lint", str(d), "--deep", "--select", "QNT002", "--device", "cpu", "-f", "json")
    assert out.returncode == 1, out.stderr
    [f] = json.loads(out.stdout)["findings"]
    assert (f["code"], f["tensor"]) == ("QNT002", RAW)


def test_cli_bad_device_is_a_one_line_error(tiny_llama):
    out = run_cli("lint", str(tiny_llama), "--device", "tpu")
    assert out.returncode == 2 and "unknown --device" in out.stderr and "Traceback" not in out.stderr
    if not torch.cuda.is_available():
        out = run_cli("lint", str(tiny_llama), "--deep", "--device", "cuda:0")
        assert out.returncode == 2 and "no CUDA GPU" in out.stderr


def test_header_only_lint_does_not_import_torch(tmp_path):
    d = fq_export(tmp_path / "x", unfolded={RAW})
    code = ("import sys, fqcheck.api as a; a.lint(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("fmt,num_bits", [("mxfp8", (4, 3)), ("mxfp4", (2, 1))])
def test_mx_weight_left_unquantized_is_found_and_refolded_without_any_amax(tmp_path, fmt, num_bits):
    """MX scales come from the weight alone: the state naming the format is enough (no _amax)."""
    import fqcheck

    bs = {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}
    spec = QuantSpec(fmt, None, block_size=32)
    d = fq_export(tmp_path / "x", unfolded={RAW}, leak=False, spec_of=lambda w: spec,
                  cfg=quant_cfg({"num_bits": num_bits, "block_sizes": bs}))
    path = d / "vllm_fq_modelopt_state.pth"
    state = torch.load(path, weights_only=True)
    qs = state["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    for m in linear_modules():  # weight quantizers kept in the state, disabled after the fold
        qs[f"{m}.weight_quantizer"] = {**qs[f"{m}.input_quantizer"], "_num_bits": num_bits,
                                       "_block_sizes": bs, "_disabled": True}
    torch.save(state, path)
    [f] = qnt002(d)
    assert f.tensor == RAW and fmt.upper() in f.message and "scales from the weight itself" in f.message
    before = load_shard(d / "model.safetensors")
    res = fqcheck.fix(d, deep=True, select=["QNT002"], backup=False)
    assert res.ok and [a.code for a in res.applied] == ["QNT002"]
    after = load_shard(d / "model.safetensors")
    assert torch.equal(after[RAW], fold(before[RAW], spec))
    assert all(torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) for k in before if k != RAW)
    assert qnt002(d) == []


# ---- format resolution pieces --------------------------------------------------------------------
def test_sequential_quantizer_cfg_is_read_as_a_list():
    from fqcheck.quant.state import QuantState, _normalize_cfg
    st = QuantState(quant_cfg=_normalize_cfg([
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": [{"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}},
                                                        {"num_bits": (4, 3), "axis": None}]}]))
    enabled, attrs = st.config_for("model.layers.0.mlp.down_proj.weight_quantizer")
    assert enabled is True and [a["num_bits"] for a in attrs] == [4, (4, 3)]
    assert st.config_for("model.layers.0.mlp.down_proj.input_quantizer") == (False, {})


def test_spec_for_format_takes_granularity_from_the_amax_shape():
    from fqcheck.quant.resolve import spec_for_format
    shape = (64, 128)
    assert spec_for_format("fp8", torch.tensor(1.0), shape).name == "FP8 E4M3 per-tensor"
    assert spec_for_format("fp8", torch.ones(64, 1), shape).name == "FP8 E4M3 per-channel"
    assert spec_for_format("int8", torch.ones(64), shape).name == "INT8 per-channel"
    assert spec_for_format("int4", torch.ones(128, 1), shape).name == "INT4 block 64"
    assert spec_for_format("int4", torch.ones(64, 1), (64, 100)).name == "INT4 block 100"  # one padded block a row
    assert spec_for_format("fp8", torch.ones(3), shape) is None  # fits no layout
    assert spec_for_format("nvfp4", torch.ones(64, 1), shape) is None


@pytest.mark.parametrize("form", [0, 1])
def test_fp8_refold_follows_the_form_the_folded_siblings_show(tmp_path, form):
    """float32 weights keep the last bits of `g * (1/scale)`, so siblings folded by Model Optimizer's
    CUDA form (0) or its CPU eager form (1) tell which device made the export; the raw weight is
    re-folded the same way."""
    import fqcheck
    from builders import save_tiny_model

    d = save_tiny_model(tmp_path / "x", dtype=torch.float32)
    t = load_shard(d / "model.safetensors")
    for m in linear_modules():
        w = t[f"{m}.weight"]
        amax = w.abs().amax()
        while bool(torch.full((), 448.0) / amax == amax.reciprocal() * 448.0):  # forms must differ
            amax = torch.nextafter(amax, torch.tensor(2.0))
        spec = QuantSpec("fp8", amax)
        if f"{m}.weight" != RAW:
            t[f"{m}.weight"] = fold(w, spec, variant=form)
        t[f"{m}.weight_quantizer._amax"] = amax
    save_shard(d / "model.safetensors", t)
    res = fqcheck.fix(d, backup=False, device="cpu")
    assert res.ok and [f.tensor for f in res.applied if f.code == "QNT002"] == [RAW]
    raw, amax = t[RAW], t[RAW.replace(".weight", ".weight_quantizer._amax")]
    after = load_shard(d / "model.safetensors")[RAW]
    assert torch.equal(after, fold(raw, QuantSpec("fp8", amax), variant=form))
    assert not torch.equal(after, fold(raw, QuantSpec("fp8", amax), variant=1 - form))

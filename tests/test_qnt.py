"""QNT001 (leaked quantizer state) and the header half of QNT003 (state file loadability)."""
import os

import torch

from builders import leak_quantizer_state, load_shard, read_index, save_shard, write_index
from fqcheck.api import lint
from fqcheck.checkpoint import STATE_NAME
from fqcheck.names import LEAK_PATTERN
from fqcheck.fixer.edits import DropTensor


def codes(report, code=None):
    return [(f.code, f.file, f.tensor) for f in report.findings if code is None or f.code == code]


def test_qnt001_leaked_amax(tiny_llama):
    added = leak_quantizer_state(tiny_llama, quantizers=("input_quantizer", "weight_quantizer"))
    r = lint(tiny_llama)
    assert codes(r) == sorted(("QNT001", "model.safetensors", t) for t in added)
    f = r.findings[0]
    assert (f.severity, f.fixable) == ("error", "safe")
    assert f.fix == DropTensor("model.safetensors", f.tensor)
    assert f.message == f"quantizer state {f.tensor} leaked into the weights"  # input quantizer: no hint
    [w] = [f for f in r.findings if f.tensor.endswith("weight_quantizer._amax")]
    assert w.message.endswith("; model.layers.0.self_attn.q_proj.weight may be left unquantized (check with --deep)")


def test_qnt001_sharded_all_buffer_kinds(sharded_llama):
    leak_quantizer_state(sharded_llama, modules=("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"),
                         quantizers=("input_quantizer", "weight_quantizer"))
    shard = sorted(sharded_llama.glob("*.safetensors"))[-1]
    t = load_shard(shard)
    extra = {
        "model.layers.1.mlp.up_proj.input_quantizer._pre_quant_scale": torch.ones(32),
        "model.layers.1.self_attn.k_bmm_quantizer._amax": torch.tensor(1.0),
        "model.layers.1.self_attn.v_bmm_quantizer._amax": torch.tensor(1.0),
        "model.layers.1.mlp.up_proj.weight_quantizer._global_amax": torch.tensor(1.0),
        "model.layers.1.mlp.up_proj.weight_quantizer.0._amax": torch.tensor(1.0),  # SequentialQuantizer
        "model.layers.1.self_attn.k_bmm_quantizer._bias_value": torch.zeros(8),
        "model.layers.1.mlp.up_proj.output_quantizer._amax": torch.tensor(1.0),
    }
    t.update(extra)
    save_shard(shard, t)
    idx = read_index(sharded_llama)
    idx["weight_map"].update({k: shard.name for k in extra})
    write_index(sharded_llama, idx)
    got = codes(lint(sharded_llama, select=["QNT001"]))
    assert len(got) == 4 + len(extra)
    assert ("QNT001", shard.name, "model.layers.1.self_attn.k_bmm_quantizer._bias_value") in got


def test_qnt001_real_quantized_fp8_is_not_a_leak(tiny_llama):
    shard = tiny_llama / "model.safetensors"
    t = load_shard(shard)
    for name in [n for n in t if n.endswith("_proj.weight")]:
        w = t[name].float()
        scale = w.abs().max() / 448.0
        t[name] = (w / scale).to(torch.float8_e4m3fn)
        base = name[: -len("weight")]
        t[base + "weight_scale"] = scale.reshape(())
        t[base + "input_scale"] = torch.tensor(0.5)
    t["model.layers.0.self_attn.k_scale"] = torch.tensor(1.0)
    t["model.layers.0.self_attn.v_scale"] = torch.tensor(1.0)
    save_shard(shard, t)
    r = lint(tiny_llama)
    assert codes(r, "QNT001") == []
    assert codes(r, "CFG003") == []  # F8 weights and F32 scales say nothing about the bf16 config


def test_qnt001_pattern_is_exact():
    legit = ["model.layers.0.mlp.down_proj.weight_scale", "model.layers.0.mlp.down_proj.weight_scale_2",
             "model.layers.0.mlp.down_proj.weight_scale_inv", "model.layers.0.mlp.down_proj.input_scale",
             "model.layers.0.self_attn.k_scale", "model.layers.0.self_attn.v_scale",
             "x.weight_zero_point", "x.weight_packed", "x.weight_shape", "x.qweight", "x.qzeros",
             "x.scales", "x.g_idx", "model.layers.0.mlp.down_proj.weight",
             "model.quantizer_head.weight", "model.layers.0.input_quantizer_amax"]
    leaks = ["a.input_quantizer._amax", "a.weight_quantizer._amax", "a.output_quantizer._amax",
             "a.input_quantizer._pre_quant_scale", "a.k_bmm_quantizer._amax", "a.v_bmm_quantizer._amax",
             "a.k_bmm_quantizer._bias_value", "a.weight_quantizer._svdquant_lora_a", "a.weight_quantizer.1._amax"]
    assert [n for n in legit if LEAK_PATTERN.search(n)] == []
    assert [n for n in leaks if not LEAK_PATTERN.search(n)] == []


def modelopt_state():
    """What export_hf_vllm_fq_checkpoint saves: plain containers, strings, numbers and tensors."""
    return {"modelopt_state_dict": [("quantize", {"config": {"quant_cfg": {"*weight_quantizer": {
        "num_bits": 8, "axis": None}}, "algorithm": "max"}, "metadata": {"quantizer_state": {
            "model.layers.0.self_attn.q_proj.weight_quantizer": {"_num_bits": 8, "_disabled": True}}}})],
        "modelopt_version": "0.35.0",
        "quantizer_state_dict": {"model.layers.0.self_attn.q_proj.input_quantizer": {"_amax": torch.tensor(2.5)},
                                 "model.layers.0.self_attn.q_proj.weight_quantizer": {"_amax": torch.tensor(0.7)}}}


def test_qnt003_clean_state_file(tiny_llama):
    torch.save(modelopt_state(), tiny_llama / STATE_NAME)
    torch.load(tiny_llama / STATE_NAME, weights_only=True)  # the oracle: it loads
    assert codes(lint(tiny_llama)) == []
    assert codes(lint(tiny_llama, deep=True, select=["QNT003"])) == []  # deep hand-off runs if present


class Pwn:
    def __reduce__(self):
        return (os.system, ("true",))


def test_qnt003_unsafe_globals_in_state_file(tiny_llama):
    state = modelopt_state()
    state["hook"] = Pwn()
    torch.save(state, tiny_llama / STATE_NAME)
    r = lint(tiny_llama)
    assert codes(r) == [("PKL001", STATE_NAME, None), ("QNT003", STATE_NAME, None)]
    q = [f for f in r.findings if f.code == "QNT003"][0]
    assert "weights_only=True" in q.message and "system" in q.message


def test_qnt003_state_file_not_a_pickle(tiny_llama):
    (tiny_llama / STATE_NAME).write_bytes(b'{"this": "is json"}')
    r = lint(tiny_llama)
    assert codes(r) == [("QNT003", STATE_NAME, None)]


def test_qnt003_single_file_lint(tmp_path):
    p = tmp_path / STATE_NAME
    torch.save(modelopt_state(), p)
    assert codes(lint(p)) == []
    p.write_bytes(p.read_bytes()[:200])
    assert codes(lint(p)) == [("QNT003", STATE_NAME, None)]


# ---- the older export layout: quant_amax.pth beside deliberately unfolded weights (modelopt 0.41-0.43)
def old_layout(d):
    amax = {f"model.layers.0.self_attn.{p}.{q}._amax": torch.tensor(0.05)
            for p in ("q_proj", "k_proj") for q in ("weight_quantizer", "input_quantizer")}
    torch.save(amax, d / "quant_amax.pth")
    return amax


def test_old_layout_weights_are_never_called_unquantized(tiny_llama):
    import fqcheck
    old_layout(tiny_llama)
    leaked = leak_quantizer_state(tiny_llama, amax=0.05, quantizers=("weight_quantizer",))
    assert codes(lint(tiny_llama)) == [("QNT001", "model.safetensors", t) for t in leaked]
    assert codes(lint(tiny_llama, deep=True, select=["QNT"])) == [("QNT001", "model.safetensors", t) for t in leaked]
    res = fqcheck.fix(tiny_llama, select=["QNT001"], backup=False)  # decided: unfolded on purpose
    assert res.ok and [f.code for f in res.applied] == ["QNT001"]


def test_old_layout_amax_file_is_scanned_like_the_state_file(tiny_llama):
    amax = old_layout(tiny_llama)
    amax["hook"] = Pwn()
    torch.save(amax, tiny_llama / "quant_amax.pth")
    assert codes(lint(tiny_llama)) == [("PKL001", "quant_amax.pth", None), ("QNT003", "quant_amax.pth", None)]


def test_deep_qnt_on_a_checkpoint_without_quantizer_state_does_not_import_torch(tiny_llama):
    """Issue 15: nothing names a quantizer, so QNT's deep half has nothing to read."""
    import subprocess
    import sys
    code = ("import sys, fqcheck.api as a; r = a.lint(sys.argv[1], deep=True, select=['QNT']); "
            "assert r.findings == [] and 'QNT002' in r.rules_run; "
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_llama)], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr

"""CFG rules on configs written by transformers' own save_pretrained, then damaged as exports do."""

import pytest
import torch

from builders import load_shard, read_config, save_shard, save_tiny_model, write_config
from fqcheck.api import lint
from fqcheck.fixer.edits import DropJsonKey


def codes(report, code=None):
    return [(f.code, f.file, f.tensor) for f in report.findings if code is None or f.code == code]


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("qwen2", False), ("qwen3", True),
                                            ("mistral", False), ("gpt2", True)])
def test_clean_save_pretrained_configs(tmp_path, model_type, tie):
    d = save_tiny_model(tmp_path / model_type, model_type, tie=tie)
    r = lint(d, select=["CFG", "TEN", "QNT", "PKL"])
    assert codes(r) == [], [f.message for f in r.findings]


def test_cfg001_missing(tiny_llama):
    (tiny_llama / "config.json").unlink()
    r = lint(tiny_llama, select=["CFG"])
    assert codes(r) == [("CFG001", "config.json", None)]
    assert "missing" in r.findings[0].message


def test_cfg001_missing_is_fine_for_single_file_lint(tiny_llama):
    (tiny_llama / "config.json").unlink()
    assert codes(lint(tiny_llama / "model.safetensors")) == []


def test_cfg001_invalid_json(tiny_llama):
    p = tiny_llama / "config.json"
    p.write_text(p.read_text()[:-10])
    r = lint(tiny_llama, select=["CFG"])
    assert codes(r) == [("CFG001", "config.json", None)]
    assert "invalid JSON" in r.findings[0].message


@pytest.mark.parametrize("key,value,words", [
    ("architectures", "LlamaForCausalLM", "architectures"),
    ("model_type", 7, "model_type"),
    ("tie_word_embeddings", "false", "tie_word_embeddings"),
    ("quantization_config", "fp8", "quantization_config"),
])
def test_cfg001_schema(tiny_llama, key, value, words):
    cfg = read_config(tiny_llama)
    cfg[key] = value
    write_config(tiny_llama, cfg)
    r = lint(tiny_llama, select=["CFG001"])
    assert codes(r) == [("CFG001", "config.json", None)]
    assert words in r.findings[0].message


def test_cfg001_not_an_object(tiny_llama):
    (tiny_llama / "config.json").write_text("[1, 2]")
    r = lint(tiny_llama, select=["CFG"])
    assert codes(r) == [("CFG001", "config.json", None)]


def add_auto_map(d, auto_map):
    cfg = read_config(d)
    cfg["auto_map"] = auto_map
    write_config(d, cfg)


DEEPSEEK_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                "AutoModel": "modeling_deepseek.DeepseekV3Model",
                "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}


def test_cfg002_files_missing_is_error_safe_fix(tiny_llama):
    add_auto_map(tiny_llama, DEEPSEEK_MAP)
    (tiny_llama / "configuration_deepseek.py").write_text("# present\n")
    r = lint(tiny_llama, select=["CFG"])
    assert codes(r) == [("CFG002", "config.json", None)]
    f = r.findings[0]
    assert (f.severity, f.fixable, f.fix) == ("error", "safe", DropJsonKey("config.json", "auto_map"))
    assert "modeling_deepseek.py" in f.message and "OSError" in f.message
    assert "configuration_deepseek.py" not in f.message


def test_cfg002_files_present_is_warning_unsafe_fix(tiny_llama):
    add_auto_map(tiny_llama, {**DEEPSEEK_MAP, "AutoTokenizer": ["tokenization_deepseek.DeepseekTokenizer", None]})
    for n in ("configuration_deepseek.py", "modeling_deepseek.py", "tokenization_deepseek.py"):
        (tiny_llama / n).write_text("raise SystemExit('never imported by fqcheck')\n")
    r = lint(tiny_llama, select=["CFG"])
    assert codes(r) == [("CFG002", "config.json", None)]
    f = r.findings[0]
    assert (f.severity, f.fixable, f.fix) == ("warning", "unsafe", DropJsonKey("config.json", "auto_map"))
    assert "trust_remote_code" in f.message


def test_cfg002_tokenizer_file_missing(tiny_llama):
    add_auto_map(tiny_llama, {"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
    r = lint(tiny_llama, select=["CFG002"])
    assert r.findings[0].severity == "error" and "tokenization_x.py" in r.findings[0].message


def test_cfg002_remote_repo_code_is_warning(tiny_llama):
    add_auto_map(tiny_llama, {"AutoModelForCausalLM": "org/repo--modeling_x.XForCausalLM"})
    r = lint(tiny_llama, select=["CFG002"])
    assert codes(r) == [("CFG002", "config.json", None)]
    assert r.findings[0].severity == "warning" and "org/repo" in r.findings[0].message


def test_cfg002_clean(tiny_llama):
    assert "auto_map" not in read_config(tiny_llama)
    assert codes(lint(tiny_llama, select=["CFG002"])) == []


def test_cfg003_config_dtype_changed(tiny_llama):
    cfg = read_config(tiny_llama)
    key = "dtype" if "dtype" in cfg else "torch_dtype"
    assert cfg[key] == "bfloat16"
    cfg[key] = "float16"
    write_config(tiny_llama, cfg)
    r = lint(tiny_llama, select=["CFG"])
    assert codes(r) == [("CFG003", "config.json", None)]
    f = r.findings[0]
    assert f.severity == "warning" and "'float16'" in f.message and "mostly BF16" in f.message


def test_cfg003_transformers4_torch_dtype(tiny_llama):
    cfg = read_config(tiny_llama)
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = "float32"
    write_config(tiny_llama, cfg)
    assert codes(lint(tiny_llama, select=["CFG003"])) == [("CFG003", "config.json", None)]


def test_cfg003_weights_cast_config_kept(tiny_llama):
    shard = tiny_llama / "model.safetensors"
    save_shard(shard, {k: v.to(torch.float16) for k, v in load_shard(shard).items()})
    r = lint(tiny_llama, select=["CFG003"])
    assert codes(r) == [("CFG003", "config.json", None)] and "mostly F16" in r.findings[0].message


def test_cfg003_clean_fp32(tmp_path):
    d = save_tiny_model(tmp_path / "m", dtype=torch.float32)
    assert codes(lint(d, select=["CFG"])) == []


@pytest.mark.parametrize("suffix,scale", [("weight_scale", True), ("weight_scale_inv", True), ("extra", False)])
def test_cfg003_scales_are_not_evidence(tiny_llama, suffix, scale):
    """F32 scales of a real-quantized export outweigh nothing; the same tensors under other names do."""
    shard = tiny_llama / "model.safetensors"
    tensors = load_shard(shard)
    bf16 = sum(t.numel() for t in tensors.values() if t.dtype == torch.bfloat16)
    f32 = {f"model.layers.{i}.mlp.down_proj.{suffix}": torch.ones(bf16 // 3 + 1) for i in range(4)}
    save_shard(shard, {**tensors, **f32})
    r = lint(tiny_llama, select=["CFG003"])
    if scale:
        assert codes(r) == []
    else:
        total = bf16 + 4 * (bf16 // 3 + 1)
        assert codes(r) == [("CFG003", "config.json", None)]
        assert f"mostly F32 ({4 * (bf16 // 3 + 1)} of {total} floating elements)" in r.findings[0].message

"""Header-only checkpoints written exactly to the loader contract (shared/reference/serve-conformance.md
§2, §3; each shape formula is cited there with vLLM 0.33's create_weights). Tensor data is a hole of
the declared size (a sparse file): the SRV rules read headers only.

A layout is a list of (name, dtype, shape); `write_checkpoint` turns it into model.safetensors (or
shards + index), config.json and, for ModelOpt, hf_quant_config.json."""
from __future__ import annotations

import json
import struct
from pathlib import Path

ITEMSIZE = {"F8_E4M3": 1, "U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}
H, I, V, E = 64, 128, 128, 4          # hidden, intermediate, vocab, experts
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16  # q out = 64, k/v out = 32


def cdiv(a, b):
    return -(-a // b)


def linear(p: str, out: int, inp: int, kind: str, *, bits: int = 4, group: int = 128, static: bool = True):
    """The tensors of one quantized linear `p` of unquantized shape [out, inp], per format."""
    if kind == "bf16":
        return [(f"{p}.weight", "BF16", [out, inp])]
    if kind == "modelopt_fp8":      # modelopt.py ModelOptFp8LinearMethod; unified_export_hf.py
        return [(f"{p}.weight", "F8_E4M3", [out, inp]), (f"{p}.weight_scale", "F32", []),
                (f"{p}.input_scale", "F32", [])]
    if kind == "modelopt_fp8_pcpt":
        return [(f"{p}.weight", "F8_E4M3", [out, inp]), (f"{p}.weight_scale", "F32", [out])]
    if kind == "modelopt_fp8_pbwo":
        return [(f"{p}.weight", "F8_E4M3", [out, inp]), (f"{p}.weight_scale", "F32", [cdiv(out, 128), 1, inp // 128, 1])]
    if kind in ("nvfp4", "w4a16_nvfp4"):  # modelopt.py ModelOptNvFp4LinearMethod, nvfp4_tensor.py
        t = [(f"{p}.weight", "U8", [out, inp // 2]), (f"{p}.weight_scale", "F8_E4M3", [out, inp // 16]),
             (f"{p}.weight_scale_2", "F32", [])]
        return t + ([(f"{p}.input_scale", "F32", [])] if kind == "nvfp4" else [])
    if kind == "fp8_block":         # DeepSeek-V3 README_WEIGHTS.md; fp8.py create_weights
        return [(f"{p}.weight", "F8_E4M3", [out, inp]),
                (f"{p}.weight_scale_inv", "F32", [cdiv(out, 128), cdiv(inp, 128)])]
    if kind == "fp8_tensor":        # fp8.py, per-tensor; input_scale iff static
        return [(f"{p}.weight", "F8_E4M3", [out, inp]), (f"{p}.weight_scale", "F32", [])] + (
            [(f"{p}.input_scale", "F32", [])] if static else [])
    if kind == "ct_fp8_dynamic":    # compressed_tensors_w8a8_fp8.py, channel strategy, dynamic tokens
        return [(f"{p}.weight", "F8_E4M3", [out, inp]), (f"{p}.weight_scale", "BF16", [out, 1])]
    if kind == "ct_int8":           # compressed_tensors_w8a8_int8.py, channel weights, dynamic tokens
        return [(f"{p}.weight", "I8", [out, inp]), (f"{p}.weight_scale", "BF16", [out, 1])]
    if kind == "ct_w4a16":          # compressed_tensors_wNa16.py; pack_quantized/base.py
        return [(f"{p}.weight_packed", "I32", [out, cdiv(inp * bits, 32)]),
                (f"{p}.weight_scale", "BF16", [out, cdiv(inp, group)]), (f"{p}.weight_shape", "I64", [2])]
    if kind == "ct_nvfp4":          # compressed_tensors_w4a4_nvfp4.py; nvfp4/base.py
        return [(f"{p}.weight_packed", "U8", [out, inp // 2]), (f"{p}.weight_scale", "F8_E4M3", [out, inp // 16]),
                (f"{p}.weight_global_scale", "F32", [1]), (f"{p}.input_global_scale", "F32", [1])]
    if kind == "gptq":              # AutoGPTQ qlinear_cuda_old.py; vLLM auto_gptq.py
        per = 32 // bits
        g = cdiv(inp, group)
        return [(f"{p}.qweight", "I32", [inp // per, out]), (f"{p}.qzeros", "I32", [g, out // per]),
                (f"{p}.scales", "F16", [g, out]), (f"{p}.g_idx", "I32", [inp])]
    if kind == "awq":               # AutoAWQ gemm.py; vLLM auto_awq.py
        return [(f"{p}.qweight", "I32", [inp, out // 8]), (f"{p}.qzeros", "I32", [inp // group, out // 8]),
                (f"{p}.scales", "F16", [inp // group, out])]
    raise ValueError(kind)


def model(kind: str, *, layers: int = 2, moe: bool = False, kv: str | None = None, lm_head: str = "bf16",
          router: str = "bf16", hidden: int = H, inter: int = I, head_dim: int = HEAD_DIM, **kw):
    """A tiny Llama (or Qwen-MoE-like with `moe`) layout with every linear in `kind`. `kv`: add
    KV-cache scales named the ModelOpt way ("proj") or the compressed-tensors way ("attn")."""
    H, I, HEAD_DIM = hidden, inter, head_dim  # noqa: N806 - the module defaults, overridable
    t = [("model.embed_tokens.weight", "BF16", [V, H]), ("model.norm.weight", "BF16", [H])]
    for i in range(layers):
        a = f"model.layers.{i}.self_attn"
        t += [(f"model.layers.{i}.input_layernorm.weight", "BF16", [H]),
              (f"model.layers.{i}.post_attention_layernorm.weight", "BF16", [H])]
        t += linear(f"{a}.q_proj", HEADS * HEAD_DIM, H, kind, **kw)
        t += linear(f"{a}.k_proj", KV_HEADS * HEAD_DIM, H, kind, **kw)
        t += linear(f"{a}.v_proj", KV_HEADS * HEAD_DIM, H, kind, **kw)
        t += linear(f"{a}.o_proj", H, HEADS * HEAD_DIM, kind, **kw)
        if kv == "proj":
            t += [(f"{a}.k_proj.k_scale", "F32", []), (f"{a}.v_proj.v_scale", "F32", [])]
        elif kv == "attn":
            t += [(f"{a}.k_scale", "F32", [1]), (f"{a}.v_scale", "F32", [1])]
        m = f"model.layers.{i}.mlp"
        if moe:
            t += linear(f"{m}.gate", E, H, router, **kw)
            for e in range(E):
                t += linear(f"{m}.experts.{e}.gate_proj", I, H, kind, **kw)
                t += linear(f"{m}.experts.{e}.up_proj", I, H, kind, **kw)
                t += linear(f"{m}.experts.{e}.down_proj", H, I, kind, **kw)
        else:
            t += linear(f"{m}.gate_proj", I, H, kind, **kw)
            t += linear(f"{m}.up_proj", I, H, kind, **kw)
            t += linear(f"{m}.down_proj", H, I, kind, **kw)
    t += linear("lm_head", V, H, lm_head, **kw)
    return t


def llama_config(quantization_config: dict | None = None, **extra) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
           "intermediate_size": I, "num_hidden_layers": 2, "num_attention_heads": HEADS,
           "num_key_value_heads": KV_HEADS, "vocab_size": V, "torch_dtype": "bfloat16",
           "tie_word_embeddings": False, **extra}
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    return cfg


def write_safetensors(path: Path, tensors, *, data: bool = False) -> None:
    """A safetensors file whose data is a hole of the declared size (header exact, data zeros), or
    with `data` distinct bytes per tensor (for fix tests that compare bytes)."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in tensors:
        n = ITEMSIZE[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        if data:
            f.write(bytes(i * 7 % 251 for i in range(off)))
        f.truncate(8 + len(hb) + off)


def write_checkpoint(d: Path, tensors, config: dict, *, hf_quant: dict | None = None, shards: int = 1,
                     data: bool = False) -> Path:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tensors = list(tensors)
    if shards == 1:
        write_safetensors(d / "model.safetensors", tensors, data=data)
    else:
        per = cdiv(len(tensors), shards)
        weight_map, total = {}, 0
        for s in range(shards):
            part = tensors[s * per:(s + 1) * per]
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            write_safetensors(d / name, part, data=data)
            for n, dt, shape in part:
                weight_map[n] = name
                size = ITEMSIZE[dt]
                for x in shape:
                    size *= x
                total += size
        (d / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (d / "config.json").write_text(json.dumps(config, indent=1))
    if hf_quant is not None:
        (d / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=1))
    return d


def modelopt_configs(algo: str, exclude: list[str], *, kv: str | None = None, group_size: int | None = None):
    """(config.json quantization_config, hf_quant_config.json) as ModelOpt writes them
    (unified_export_hf.py _write_hf_export_config, convert_hf_config.py)."""
    q = {"quant_algo": algo, "kv_cache_quant_algo": kv, "exclude_modules": exclude}
    if group_size is not None:
        q["group_size"] = group_size
    hq = {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": q}
    flat = {"quant_method": "modelopt", "quant_algo": algo, "ignore": exclude,
            "producer": {"name": "modelopt", "version": "0.47.0"}}
    if group_size is not None:
        flat["group_size"] = group_size
    if kv is not None:
        flat["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    return flat, hq


def deepseek_v3(experts: int = 4):
    """DeepSeek-V3/R1 tensors at their real dimensions (README_WEIGHTS.md, config.json of
    deepseek-ai/DeepSeek-V3): one dense layer, one MoE layer with `experts` routed experts, F8_E4M3
    weights with F32 128x128 `weight_scale_inv` (cdiv for the partial blocks: kv_a_proj_with_mqa has
    576 rows), BF16 router, norms, embeddings and lm_head."""
    hidden, q_lora, kv_lora, rope, nope, v_head, heads, dense_ff, moe_ff, vocab = (
        7168, 1536, 512, 64, 128, 128, 128, 18432, 2048, 129280)
    t = [("model.embed_tokens.weight", "BF16", [vocab, hidden]), ("model.norm.weight", "BF16", [hidden]),
         ("lm_head.weight", "BF16", [vocab, hidden])]
    for i in range(2):
        p, a, m = f"model.layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        t += [(f"{p}.input_layernorm.weight", "BF16", [hidden]), (f"{p}.post_attention_layernorm.weight", "BF16", [hidden]),
              (f"{a}.q_a_layernorm.weight", "BF16", [q_lora]), (f"{a}.kv_a_layernorm.weight", "BF16", [kv_lora])]
        t += linear(f"{a}.q_a_proj", q_lora, hidden, "fp8_block")
        t += linear(f"{a}.q_b_proj", heads * (nope + rope), q_lora, "fp8_block")
        t += linear(f"{a}.kv_a_proj_with_mqa", kv_lora + rope, hidden, "fp8_block")
        t += linear(f"{a}.kv_b_proj", heads * (nope + v_head), kv_lora, "fp8_block")
        t += linear(f"{a}.o_proj", hidden, heads * v_head, "fp8_block")
        mlps = [(m, dense_ff)] if i == 0 else [(f"{m}.shared_experts", moe_ff)] + [
            (f"{m}.experts.{e}", moe_ff) for e in range(experts)]
        if i:
            t += [(f"{m}.gate.weight", "BF16", [256, hidden]), (f"{m}.gate.e_score_correction_bias", "F32", [256])]
        for q, ff in mlps:
            t += linear(f"{q}.gate_proj", ff, hidden, "fp8_block") + linear(f"{q}.up_proj", ff, hidden, "fp8_block")
            t += linear(f"{q}.down_proj", hidden, ff, "fp8_block")
    return t


DEEPSEEK_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

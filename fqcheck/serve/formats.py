"""Per format: the tensors one quantized linear carries, with dtypes and shapes, and what vLLM 0.33
does when one is missing (reference/serve-conformance.md §1.4, §2, §3; the vLLM create_weights of
each scheme: modelopt.py, fp8.py + utils/fp8_utils.py, compressed_tensors_w8a8_fp8.py, _w8a8_int8.py,
_wNa16.py, _w4a4_nvfp4.py, auto_gptq.py, auto_awq.py)."""
from __future__ import annotations

from typing import NamedTuple

from .config import Layout

FLOAT = ("F32", "BF16", "F16")   # scale params are F32; copy_ casts any float (no dtype check, §1.6)
SCALAR = frozenset({(), (1,)})    # PerTensorScaleParameter accepts [] or [1] (parameter.py _is_1d_and_scalar)
QUANT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "U8", "I8", "I32"})
# Tensors that say "this module is stored quantized" (input_scale alone does not: it is the stray
# tensor of an unquantized lm_head, SRV006).
EVIDENCE = ("weight_scale", "weight_scale_2", "weight_scale_inv", "weight_packed", "qweight", "qzeros", "scales",
            "weight_global_scale", "weight_zero_point")
# Quantization tensors a loader has a parameter for only when its scheme declares it.
QUANT_SUFFIXES = frozenset((*EVIDENCE, "input_scale", "input_zero_point", "input_global_scale", "weight_shape",
                            "weight_g_idx", "pre_quant_scale"))
MAIN = {"ct_pack": "weight_packed", "ct_nvfp4": "weight_packed", "gptq": "qweight", "awq": "qweight"}
MAIN_DTYPE = {"fp8": "F8_E4M3", "fp8_pcpt": "F8_E4M3", "fp8_pbwo": "F8_E4M3", "fp8_block": "F8_E4M3",
              "ct_float": "F8_E4M3", "nvfp4": "U8", "w4a16_nvfp4": "U8", "ct_nvfp4": "U8", "ct_int": "I8",
              "ct_pack": "I32", "gptq": "I32", "awq": "I32"}
TOLERATED = {"w4a16_nvfp4": ("input_scale",),  # modelopt.py registers a throw-away input_scale and drops it
             "gptq": ("g_idx",)}               # dropped by base_config.get_checkpoint_weight_mapper


class Want(NamedTuple):
    suffix: str
    dtypes: tuple[str, ...]
    shapes: frozenset | None   # accepted shapes; None: not checked
    required: bool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def main_suffix(layout: Layout) -> str:
    return MAIN.get(layout.kind, "weight")


def wants(layout: Layout, shape: tuple) -> tuple[list[Want], str | None]:
    """The companions of a quantized linear whose main tensor has the right dtype and `shape`, and
    a problem with the main tensor's own shape (None if it fits the format)."""
    k = layout.kind
    if len(shape) != 2:
        return [], f"is {len(shape)}-D; {layout.label} stores a 2-D {main_suffix(layout)}"
    r0, c0 = shape
    if k in ("fp8", "fp8_pcpt", "fp8_pbwo", "fp8_block", "ct_float", "ct_int"):
        o, i = r0, c0
        out: list[Want] = []
        if k == "fp8":
            out.append(Want("weight_scale", FLOAT, SCALAR, True))
        elif k == "fp8_pcpt":
            out.append(Want("weight_scale", FLOAT, frozenset({(o,)}), True))
        elif k == "fp8_pbwo":
            if i % 128:
                return [], f"has in={i}, not a multiple of 128: vLLM 0.33 raises ValueError: FP8_PB_WO requires in divisible by 128"
            out.append(Want("weight_scale", FLOAT, frozenset({(cdiv(o, 128), 1, i // 128, 1)}), True))
        elif k == "fp8_block":
            bn, bk = layout.block
            out.append(Want("weight_scale_inv", FLOAT, frozenset({(cdiv(o, bn), cdiv(i, bk))}), True))
        else:
            out.append(Want("weight_scale", FLOAT, _ct_scale(layout, o, {i}), True))
            if not layout.sym:
                out.append(Want("weight_zero_point", ("I8", "I32", *FLOAT), None, True))
            if k == "ct_int" and layout.static_input and not layout.input_sym:
                out.append(Want("input_zero_point", ("I8", "I32"), SCALAR, True))
        if layout.static_input:
            out.append(Want("input_scale", FLOAT, SCALAR, True))
        return out, None
    if k in ("nvfp4", "w4a16_nvfp4", "ct_nvfp4"):
        o, i = r0, 2 * c0
        if i % 16:
            return [], f"unpacks to in={i}, not a multiple of 16: vLLM 0.33 raises ValueError: Unsupported model when in features size is not multiple of 16"
        g = layout.group or 16
        out = [Want("weight_scale", ("F8_E4M3",), frozenset({(o, i // g)}), True)]
        if k == "ct_nvfp4":
            out.append(Want("weight_global_scale", FLOAT, SCALAR, True))
            if layout.act:
                out.append(Want("input_global_scale", FLOAT, SCALAR, True))
        else:
            out.append(Want("weight_scale_2", FLOAT, SCALAR, True))
            if k == "nvfp4":
                out.append(Want("input_scale", FLOAT, SCALAR, True))
        return out, None
    if k == "ct_pack":
        o, cols = r0, c0
        per = 32 // layout.bits
        ins = set(range((cols - 1) * per + 1, cols * per + 1))  # cdiv packing: the last word may be partial
        out = [Want("weight_scale", FLOAT, _ct_scale(layout, o, ins), True),
               Want("weight_shape", ("I64", "I32"), frozenset({(2,)}), True)]
        if not layout.sym:
            g = layout.group
            groups = {1} if g == -1 else {cdiv(i, g) for i in ins}
            out.append(Want("weight_zero_point", ("I32",), frozenset((cdiv(o * layout.bits, 32), n) for n in groups), True))
        return out, None
    if k == "gptq":
        per = 32 // layout.bits
        i, o = r0 * per, c0
        if o % per:
            return [], f"has out={o}, not a multiple of {per}: GPTQ qzeros cannot pack it"
        G = 1 if layout.group == -1 else cdiv(i, layout.group)
        return [Want("qzeros", ("I32",), frozenset({(G, o // per)}), True),
                Want("scales", FLOAT, frozenset({(G, o)}), True)], None
    if k == "awq":
        i, o = r0, c0 * 8
        if i % layout.group:
            return [], f"has in={i}, not a multiple of group_size {layout.group} (vLLM sizes AWQ scales as in // group_size)"
        G = i // layout.group
        return [Want("qzeros", ("I32",), frozenset({(G, c0)}), True),
                Want("scales", FLOAT, frozenset({(G, o)}), True)], None
    return [], None


def _ct_scale(layout: Layout, o: int, ins: set) -> frozenset:
    s = layout.strategy
    if s == "channel":
        return frozenset({(o, 1)})
    if s == "block":
        b0, b1 = layout.block
        return frozenset((cdiv(o, b0), cdiv(i, b1)) for i in ins)
    if s in ("group", "tensor_group") or layout.kind == "ct_pack":
        g = layout.group
        return frozenset({(o, 1)}) if g == -1 else frozenset((o, cdiv(i, g)) for i in ins)
    return SCALAR


def missing_effect(layout: Layout, suffix: str, expert: bool) -> str:
    """What vLLM 0.33 does when the tensor is not in the checkpoint (§1.4: the strict 'every weight
    loaded' check runs only for unquantized models, so the parameter keeps its initial value)."""
    k = layout.kind
    if k in ("nvfp4", "w4a16_nvfp4") and suffix == "weight_scale" and not expert:
        return ("vLLM 0.33 raises RuntimeError: NVFP4 weight_scale for layer ... was never loaded (still NaN)")
    if k in ("fp8", "fp8_pcpt", "fp8_pbwo", "fp8_block", "ct_float"):  # utils/fp8_utils.py create_fp8_scale_parameter
        if expert:
            return "vLLM 0.33 keeps the expert slot's initial 1.0: loads silently with wrong scales"
        return ("vLLM 0.33 keeps the sentinel float32 min (FP8_SCALE_SENTINEL): loads silently with garbage scales")
    return "vLLM 0.33 keeps the uninitialised (torch.empty) parameter: loads silently with garbage scales"

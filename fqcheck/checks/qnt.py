"""QNT: quantizer state of Model Optimizer exports. Header halves here; data halves in fqcheck.quant."""
from __future__ import annotations

import re
from typing import Iterator

from ..checkpoint import STATE_NAME, Checkpoint
from ..engine import Context, Hit, check
from ..fixer.edits import DropTensor
from ..names import is_quantizer_state


@check("QNT001")
def leaked_quantizer_state(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    for fname, h in ckpt.headers().items():
        if "quantizer" not in h.joined:  # one scan of the shard's names at C speed (90k names)
            continue
        for t in [t for t in h.names if "quantizer" in t]:
            if is_quantizer_state(t):
                weight = weight_of_amax(t)
                msg = f"quantizer state {t} leaked into the weights"
                if weight:
                    msg += f"; {weight} may be left unquantized (check with --deep)"
                yield Hit(msg, file=fname, tensor=t, fix=DropTensor(fname, t))


WEIGHT_AMAX = re.compile(r"^(?:(?P<module>.+)\.)?(?P<attr>(?:\w+_)?weight)_quantizer(?:\.\d+)*\._(?:amax|global_amax)$")


def weight_of_amax(tensor: str) -> str | None:
    """The weight a leaked weight-quantizer amax calibrated (`m.weight_quantizer[.i]._amax` ->
    `m.weight`), or None for any other quantizer buffer."""
    m = WEIGHT_AMAX.match(tensor)
    if not m:
        return None
    return f"{m.group('module')}.{m.group('attr')}" if m.group("module") else m.group("attr")


@check("QNT003")
def state_file(ctx: Context) -> Iterator[Hit]:
    """QNT003 for vllm_fq_modelopt_state.pth.

    Hand-off: this function owns the code (one check per code). It always runs the header half
    (state_file_header_problems: is the file loadable with torch.load(weights_only=True), judged
    from the opcode scan, nothing loaded). Only with options["deep"] and only when the header half
    found nothing does it call fqcheck.quant.state.deep_state_problems(ckpt) (amax finite and
    positive, module names present in the weights): fqcheck.quant reads the state and returns its
    problems as data; without torch there is nothing to load, and the header half stands alone."""
    ckpt = ctx.ckpt
    header = list(state_file_header_problems(ckpt))
    yield from header
    if header or not ctx.options.deep or STATE_NAME not in ckpt.names or not torch_installed():
        return
    from ..quant.state import deep_state_problems
    for message, file, tensor in deep_state_problems(ckpt):
        yield Hit(message, file=file, tensor=tensor)


def torch_installed() -> bool:
    """The deep halves compute with torch, an optional dependency (`fqcheck[deep]`)."""
    import importlib.util
    return importlib.util.find_spec("torch") is not None


# The layout of modelopt 0.41-0.43's FakeQuant export: bf16 weights left unfolded on purpose and the
# quantizers' amax in a torch.save'd {"<module>.<x>_quantizer._amax": tensor} that vLLM's fakequant
# worker loads (AMAX_FILE_PATH) to quantize the weights at load time.
OLD_AMAX_NAME = "quant_amax.pth"


def state_file_header_problems(ckpt: Checkpoint) -> Iterator[Hit]:
    for name in (STATE_NAME, OLD_AMAX_NAME):
        if name not in ckpt.names:
            continue
        from ..checkpoint.pickle_scan import scan_cached  # imported only when there is a state file
        why = scan_cached(ckpt, name).weights_only_refusal()
        if why:
            yield Hit(f"{name} cannot be loaded with torch.load(weights_only=True) as vLLM's "
                      f"FakeQuant worker does: {why}", file=name)

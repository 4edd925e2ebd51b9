"""A leaked weight-quantizer amax is evidence (issue 13): before the QNT001 fix drops it, decide
the weight it calibrated. Reads only those weights: on the grid -> the amax may go; off it -> a
QNT002 re-fold joins the plan (by default: the amax is the calibrated one and the fold is
Model Optimizer's own math); undecidable -> refuse, or with --unsafe-fixes drop it and say so."""
from __future__ import annotations

from ..engine import Finding
from .edits import ReplaceTensor


class Undecided(Exception):
    """Weights whose leaked amax cannot be weighed; args[0]: [(weight, why)]."""


def weigh_weight_amax(ckpt, findings, unsafe: bool = False, quant_format: str | None = None,
                      device: str = "auto", jobs: int = 0) -> tuple[list, list[str]]:
    """(findings plus the re-folds the decision needs, notes). Raises Undecided unless `unsafe`."""
    from ..checks.qnt import weight_of_amax
    findings = list(findings)
    retired = {f.file for f in findings if f.code == "IDX008" and f.fix is not None}
    leaked = {w for f in findings if f.code == "QNT001" and f.tensor and f.file not in retired
              for w in [weight_of_amax(f.tensor)] if w and w in ckpt.tensor_files}
    refolded = {f.tensor for f in findings if f.code == "QNT002" and isinstance(f.fix, ReplaceTensor)}
    todo = leaked - refolded
    if not todo:
        return findings, []  # header-only fixes stay torch-free
    try:
        from ..checks.qnt_deep import verdicts
        found = {v.weight: v for v in verdicts(ckpt, device, quant_format, only=todo, jobs=jobs)}
    except ImportError:
        found = {}
    undecided = []
    for w in sorted(todo):
        v = found.get(w)
        if v is None:
            undecided.append((w, "no weight quantizer state could be read for it (is torch installed?)"))
        elif not v.decided:
            undecided.append((w, v.why))
        elif v.hit is not None:
            h = v.hit
            findings.append(Finding("QNT002", "error", h.message, h.file, h.tensor, "safe", h.fix))
    if undecided and not unsafe:
        raise Undecided(undecided)
    notes = [f"dropped the leaked amax of {w} without verifying that weight (--unsafe-fixes): {why}"
             for w, why in undecided]
    return findings, notes


def refusal(undecided) -> str:
    lines = "\n".join(f"  {w}: {why}" for w, why in undecided)
    return (f"refusing to fix: {len(undecided)} weight(s) have a leaked weight-quantizer amax and may be "
            f"unquantized, and fqcheck cannot decide them (nothing was changed):\n{lines}\n"
            "Name the format with --quant-format fp8|int8|int4|nvfp4, or drop the amax anyway with --unsafe-fixes.")

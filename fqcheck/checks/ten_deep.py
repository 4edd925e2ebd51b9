"""TEN deep rules: what only the tensor data shows (duplicates, NaN/Inf, all-zero placeholders).
All three share one streaming pass (fqcheck.deep.scan), memoised per Checkpoint."""
from __future__ import annotations

from typing import Iterator

from ..engine import Context, Hit, check

DUP_MIN_BYTES = 1024   # smaller tensors (scales, tiny norms) repeat by chance: not worth a finding
ZERO_MIN_NUMEL = 256   # an all-zero weight this small may be deliberate


@check("TEN002")
def duplicate_tensors(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    from ..deep import scan_for, tie_word_embeddings
    from ..names import LM_HEAD, embedding_name
    from ..fixer.edits import DropTensor

    deep = scan_for(ckpt, ctx.options)
    # Matrices only, not all zero (TEN005's business): 1-D norms and biases of a fresh model
    # are all ones or all zeros and would all match each other.
    keys = [k for k, s in deep.stats.items()
            if s.nbytes >= DUP_MIN_BYTES and len(s.shape) >= 2 and s.all_zero is not True]
    tied = tie_word_embeddings(ckpt)
    emb = embedding_name(ckpt.tensor_files)
    for group in deep.duplicate_groups(keys):
        # entries aliasing one byte range are SFT003's finding, not copies: keep one per range
        group = list({(f, deep.stats[(f, t)].begin): (f, t) for f, t in group}.values())
        names = {t for _, t in group}
        if len(names) < 2:
            continue  # one name in several shards: IDX006 reports it
        group.sort(key=lambda k: (k[1] == LM_HEAD, k))  # lm_head is the copy, never the original
        first = group[0]
        if tied and emb is not None and names == {LM_HEAD, emb}:
            f, t = next(k for k in group if k[1] == LM_HEAD)
            yield Hit(f"{LM_HEAD} is stored with the same bytes as {emb} while tie_word_embeddings "
                      f"is true: the tied copy is redundant ({_size(deep.stats[(f, t)].nbytes)})",
                      file=f, tensor=t, fixable="safe", fix=DropTensor(f, t))
            continue
        for f, t in group[1:]:
            where = first[1] if first[0] == f else f"{first[1]} in {first[0]}"
            yield Hit(f"same bytes as {where} ({_size(deep.stats[(f, t)].nbytes)}): shared storage "
                      f"written twice, or a copy where a distinct tensor belongs", file=f, tensor=t,
                      fixable="no")


@check("TEN003")
def non_finite(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    from ..deep import scan_for

    for (f, t), s in sorted(scan_for(ckpt, ctx.options).stats.items()):
        if s.nonfinite:
            parts = [f"{n} {what}" for n, what in ((s.nan, "NaN"), (s.inf, "Inf")) if n]
            yield Hit(f"{' and '.join(parts)} in {s.numel} {s.dtype} values", file=f, tensor=t)


@check("TEN005")
def all_zero_weight(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    from ..deep import scan_for

    for (f, t), s in sorted(scan_for(ckpt, ctx.options).stats.items()):
        # Matrices named *.weight only: fresh models zero biases and some norms on purpose.
        if s.all_zero and t.endswith(".weight") and len(s.shape) >= 2 and s.numel >= ZERO_MIN_NUMEL:
            yield Hit(f"all {s.numel} {s.dtype} values are zero: a materialised placeholder "
                      f"(e.g. a meta or offloaded tensor saved without its data)", file=f, tensor=t)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024

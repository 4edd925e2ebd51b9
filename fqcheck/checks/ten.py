"""TEN: tensors themselves. Header halves here; data-reading halves live in fqcheck.deep."""
from __future__ import annotations

from typing import Iterator

from ..checkpoint import Checkpoint
from ..checkpoint import safetensors as st
from ..engine import Context, Hit, check

from ..names import EMBED_NAMES, LM_HEAD

MAX_LISTED = 8


@check("TEN001")
def meta_tensors(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    if not ckpt.pickle_names:
        return
    from ..checkpoint.pickle_scan import scan_cached  # imported only when there are pickle files

    for name in ckpt.pickle_names:
        scan = scan_cached(ckpt, name)
        n = scan.meta_count
        if not n:
            continue
        keys = scan.meta_keys
        which = ""
        if keys:
            which = ": " + ", ".join(keys[:MAX_LISTED]) + (f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")
        yield Hit(f"{n} meta tensor(s) with no data (shape only, e.g. accelerate-offloaded weights "
                  f"saved from state_dict()){which}; loading gives 'Cannot copy out of meta tensor'",
                  file=name, tensor=keys[0] if len(keys) == 1 else None)


@check("TEN004")
def tied_embeddings(ctx: Context) -> Iterator[Hit]:
    """Header half of TEN004: the tie flag against which heads are stored, their shapes and dtypes.

    Hand-off: with --deep, the byte comparison of a stored lm_head against the embedding (tie true,
    same shape and dtype) is fqcheck.deep.tied_embedding_hits, on the shared pass over the data
    (imported only then)."""
    ckpt = ctx.ckpt
    yield from _tied_header(ckpt)
    if ctx.options.deep:
        from ..deep import tied_embedding_hits
        yield from tied_embedding_hits(ckpt, ctx.options)


def _tied_header(ckpt: Checkpoint) -> Iterator[Hit]:
    cfg = ckpt.config
    if cfg is None or not isinstance(cfg.data, dict) or not ckpt.safetensors_names:
        return
    tie = cfg.data.get("tie_word_embeddings")
    if not isinstance(tie, bool):
        return
    if any(p.kind == st.UNREADABLE for h in ckpt.headers().values() for p in h.problems):
        return  # unreadable shard: what it holds is unknown (SFT001)
    head = ckpt.tensor(LM_HEAD)
    if tie is False and head is None:
        embed = next((n for n in EMBED_NAMES if ckpt.tensor(n) is not None), None)
        if embed is None:
            return  # not a decoder layout we know; ARC rules cover the rest
        if _indexed(ckpt, LM_HEAD):
            return  # its shard is missing: IDX003's finding
        yield Hit(f"config.json has tie_word_embeddings false but no {LM_HEAD} is stored: "
                  f"transformers 5 leaves lm_head randomly initialised (missing key); vLLM 0.32 loads without it, "
                  "silently, and serves garbage (one token repeated)",
                  file=cfg.name, tensor=LM_HEAD)
    elif tie is True and head is not None:
        embed = next((n for n in EMBED_NAMES if ckpt.tensor(n) is not None), None)
        if embed is None:
            return
        hfile, h = head
        _, e = ckpt.tensor(embed)
        if (h.shape, h.dtype) != (e.shape, e.dtype):
            yield Hit(f"tie_word_embeddings is true but the stored {LM_HEAD} ({h.dtype} {list(h.shape)}) "
                      f"differs from {embed} ({e.dtype} {list(e.shape)}): transformers 5.24 and vLLM 0.32 do not "
                      "tie them but serve the stored head (with a warning), so config.json misdescribes the "
                      "model and a loader that ties by the config serves another one", file=hfile, tensor=LM_HEAD)


def _indexed(ckpt: Checkpoint, tensor: str) -> bool:
    idx = ckpt.index
    wm = idx.data.get("weight_map") if idx is not None and isinstance(idx.data, dict) else None
    return isinstance(wm, dict) and tensor in wm

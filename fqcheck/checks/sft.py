"""SFT: the safetensors files themselves, as the strict header reader sees them."""
from __future__ import annotations

import json
from typing import Iterator

from ..checkpoint import Checkpoint
from ..checkpoint import safetensors as st
from ..engine import Context, Hit, check
from ..fixer.edits import SetMetadata


def _problems(ckpt: Checkpoint, kind: str) -> Iterator[Hit]:
    for fname, h in ckpt.headers().items():
        for p in h.problems:
            if p.kind == kind:
                yield Hit(p.message, file=fname, tensor=p.tensor)


@check("SFT001")
def header_unreadable(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    return _problems(ckpt, st.UNREADABLE)


@check("SFT002")
def invalid_entry(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    return _problems(ckpt, st.BAD_ENTRY)


@check("SFT003")
def overlapping_data(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    return _problems(ckpt, st.OVERLAP)


@check("SFT004")
def buffer_mismatch(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    return _problems(ckpt, st.BUFFER)


@check("SFT005")
def duplicate_name(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    return _problems(ckpt, st.DUPLICATE)


@check("SFT006")
def bad_metadata(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    for fname, h in ckpt.headers().items():
        for p in h.problems:
            if p.kind == st.METADATA:
                yield Hit(p.message, file=fname, tensor=p.tensor,
                          fix=SetMetadata(fname, tuple(sorted({**_str_entries(h), "format": "pt"}.items()))))


def _str_entries(h: st.SafetensorsHeader) -> dict:
    """The string entries of the stored __metadata__ (kept by the fix), re-read when the strict
    reader rejected the whole map."""
    meta = h.metadata
    if meta is None:
        try:
            with open(h.path, "rb") as f:
                f.seek(8)
                meta = json.loads(f.read(h.data_start - 8).decode("utf-8")).get("__metadata__")
        except (OSError, ValueError, AttributeError):
            meta = None
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if isinstance(v, str)}

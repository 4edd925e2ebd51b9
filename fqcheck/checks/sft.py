"""SFT: the safetensors files themselves, as the strict header reader sees them."""
from __future__ import annotations

from typing import Iterator

from ..checkpoint import Checkpoint
from ..checkpoint import safetensors as st
from ..engine import Hit, check


def _problems(ckpt: Checkpoint, kind: str) -> Iterator[Hit]:
    for fname, h in ckpt.headers().items():
        for p in h.problems:
            if p.kind == kind:
                yield Hit(p.message, file=fname, tensor=p.tensor)


@check("SFT001")
def header_unreadable(ckpt: Checkpoint) -> Iterator[Hit]:
    return _problems(ckpt, st.UNREADABLE)


@check("SFT002")
def invalid_entry(ckpt: Checkpoint) -> Iterator[Hit]:
    return _problems(ckpt, st.BAD_ENTRY)


@check("SFT003")
def overlapping_data(ckpt: Checkpoint) -> Iterator[Hit]:
    return _problems(ckpt, st.OVERLAP)


@check("SFT004")
def buffer_mismatch(ckpt: Checkpoint) -> Iterator[Hit]:
    return _problems(ckpt, st.BUFFER)


@check("SFT005")
def duplicate_name(ckpt: Checkpoint) -> Iterator[Hit]:
    return _problems(ckpt, st.DUPLICATE)


@check("SFT006")
def bad_metadata(ckpt: Checkpoint) -> Iterator[Hit]:
    return _problems(ckpt, st.METADATA)

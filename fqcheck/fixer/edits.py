"""Edits: what a finding's `fix` says to do. Plain data, no I/O; checks attach them to their hits
and the fix planner merges them per file. Importing this module must stay cheap (no torch)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class DropTensor:
    """Remove one tensor from a safetensors file (and from the index)."""
    file: str
    tensor: str


@dataclass(frozen=True)
class ReplaceTensor:
    """Replace one tensor's data with the output of `producer` (e.g. a re-fold); same dtype and shape.
    `producer` is called with the original tensor's bytes and returns the new bytes."""
    file: str
    tensor: str
    producer: object = field(compare=False, hash=False, default=None)


@dataclass(frozen=True)
class SetMetadata:
    """Rewrite a safetensors header's __metadata__ (tensor bytes unchanged)."""
    file: str
    metadata: tuple = ()  # sorted (key, value) pairs


@dataclass(frozen=True)
class RebuildIndex:
    """Rewrite model.safetensors.index.json from what the shards really hold."""


@dataclass(frozen=True)
class DropJsonKey:
    """Delete a top-level key from a JSON file (e.g. auto_map from config.json)."""
    file: str
    key: str


@dataclass(frozen=True)
class RetireFile:
    """Move a file out of the checkpoint into the backup folder (e.g. a stale shard)."""
    file: str


Edit = Union[DropTensor, ReplaceTensor, SetMetadata, RebuildIndex, DropJsonKey, RetireFile]
"""What a finding's fix says to do: one edit, or a tuple of them applied together."""
Fix = Union[Edit, tuple[Edit, ...], None]

"""Tensor data access for deep checks: zero-copy memoryviews over mmapped shards."""
from __future__ import annotations

import mmap

from .safetensors import SafetensorsHeader, TensorEntry


class ShardData:
    """Maps one safetensors file read-only; `view(entry)` is a zero-copy slice of a tensor's bytes,
    `mm` the map itself (None for an empty file: the deep pass's windows and the writer's copies of
    misaligned ranges read it). Only valid for headers without SFT001/SFT004 problems (offsets
    inside the file)."""

    def __init__(self, header: SafetensorsHeader):
        self.header = header
        self._f = open(header.path, "rb")
        self.mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if header.file_size else None

    def view(self, entry: TensorEntry) -> memoryview:
        start = self.header.data_start + entry.begin
        stop = self.header.data_start + entry.end
        if stop > self.header.file_size:
            raise ValueError(f"{entry.name}: data past the end of {self.header.path.name}")
        if self.mm is None or start == stop:
            return memoryview(b"")
        return memoryview(self.mm)[start:stop]

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view is still alive; the map closes when it is collected
                pass
        self._f.close()

    def __enter__(self) -> "ShardData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()



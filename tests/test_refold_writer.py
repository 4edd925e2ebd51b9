"""The re-fold's path through the shard writer: the producer reads the mapped source in place, the
buffer it returns is written as it is, and a source that shrank is a one-line error."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from builders import raw_safetensors
from fqcheck.checkpoint.safetensors import read_header
from fqcheck.checks.qnt_deep import Refold
from fqcheck.fixer.shard import ShardWriteError, write_shard
from fqcheck.quant.formats import QuantSpec, fold


def _shard(tmp_path):
    """a.flag (3 bytes) first, so the weight after it starts at an odd offset (the writer maps the
    file: the re-fold reads a misaligned bf16 buffer in place)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a.flag": torch.ones(3, dtype=torch.uint8),
               "b.weight": (torch.randn(96, 64, generator=g) * 0.1).to(torch.bfloat16),
               "c.bias": torch.zeros(7, dtype=torch.float32)}
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, t in tensors.items():
        raw = t.view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": {torch.uint8: "U8", torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path = raw_safetensors(tmp_path / "m.safetensors", hb, data)
    assert (read_header(path).data_start + 3) % 2 == 1
    return path, tensors


def _rewrite(path, replace, out):
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return write_shard(read_header(path), fd, set(), replace, {"format": "pt"})
    finally:
        os.close(fd)


def test_refold_reads_the_map_in_place_and_its_buffer_is_written(tmp_path):
    path, tensors = _shard(tmp_path)
    w = tensors["b.weight"]
    spec = QuantSpec("nvfp4", w.float().abs().amax(), block_size=16)
    seen = {}

    def producer(raw):
        seen["readonly"], seen["type"] = raw.readonly, type(raw)
        return Refold(spec, "BF16", w.shape, "cpu")(raw)
    out = tmp_path / "out.safetensors"
    _rewrite(path, {"b.weight": producer}, out)
    assert seen == {"readonly": True, "type": memoryview}  # the mapped source, not a copy
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("b.weight").view(torch.int16), fold(w, spec, "cpu").view(torch.int16))
        assert torch.equal(f.get_tensor("a.flag"), tensors["a.flag"]) and torch.equal(f.get_tensor("c.bias"), tensors["c.bias"])


def test_source_that_shrank_is_a_one_line_error(tmp_path):
    path, _ = _shard(tmp_path)
    header = read_header(path)
    os.truncate(path, header.data_start + header.tensors["b.weight"].begin + 10)  # most of the weight is gone
    fd = os.open(tmp_path / "out.safetensors", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(ShardWriteError, match="b.weight: source file ended early"):
            write_shard(header, fd, set(), {"b.weight": lambda raw: bytes(len(raw))}, {"format": "pt"})
    finally:
        os.close(fd)

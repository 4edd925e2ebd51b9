"""The shard rewriter against the reference reader: random files written by safetensors itself,
random subsets dropped; safe_open must read the result and every kept tensor keeps its bytes."""
import os
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from fixhelp import tensor_bytes
from fqcheck.checkpoint.safetensors import read_header
from fqcheck.fixer.shard import write_shard

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.int64, torch.float8_e4m3fn, torch.bool]

tensor_specs = st.dictionaries(
    st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, blacklist_characters='"\\'), min_size=1, max_size=12),
    st.tuples(st.sampled_from(range(len(DTYPES))), st.lists(st.integers(0, 5), max_size=3)),
    min_size=1, max_size=8)


def _tensor(i, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (*shape, DTYPES[i].itemsize), generator=g, dtype=torch.uint8).view(DTYPES[i]).reshape(shape)


@settings(max_examples=40, deadline=None)
@given(specs=tensor_specs, drop_mask=st.lists(st.booleans(), min_size=8, max_size=8),
       meta=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_rewrite_keeps_bytes(specs, drop_mask, meta):
    with tempfile.TemporaryDirectory() as td:
        src, dst = Path(td) / "a.safetensors", Path(td) / "b.safetensors"
        tensors = {k: _tensor(i, shape, n) for n, (k, (i, shape)) in enumerate(specs.items())}
        save_file(tensors, str(src), metadata={"format": "pt"})
        names = sorted(tensors)
        drop = {n for n, m in zip(names, drop_mask) if m}
        new_meta = {**meta, "format": "pt"}
        fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            write_shard(read_header(src), fd, drop, {}, new_meta)
        finally:
            os.close(fd)
        h = read_header(dst)
        assert h.problems == [] and h.data_start % 8 == 0
        with safe_open(str(dst), framework="pt") as f:
            assert set(f.keys()) == set(names) - drop
            assert f.metadata() == new_meta
            for k in f.keys():
                assert tensor_bytes(f.get_tensor(k)) == tensor_bytes(tensors[k])

import shutil
from pathlib import Path

import pytest

from builders import save_tiny_model

_CACHE: dict = {}


@pytest.fixture
def tiny_llama(tmp_path_factory, tmp_path) -> Path:
    """A fresh copy of a tiny Llama saved by save_pretrained (single shard, bf16)."""
    return _copy(tmp_path_factory, tmp_path, "llama1", lambda d: save_tiny_model(d))


@pytest.fixture
def sharded_llama(tmp_path_factory, tmp_path) -> Path:
    """A fresh copy of a tiny Llama saved in 3 shards with an index."""
    return _copy(tmp_path_factory, tmp_path, "llama3", lambda d: save_tiny_model(d, shards=3))


def _copy(factory, tmp_path, key, build) -> Path:
    # Build each model once per session, hand every test its own copy to damage.
    if key not in _CACHE:
        src = factory.mktemp(f"base-{key}")
        build(src)
        _CACHE[key] = src
    dst = tmp_path / "ckpt"
    shutil.copytree(_CACHE[key], dst)
    return dst

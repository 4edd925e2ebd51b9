"""The copy mode is decided per file: one EXDEV (a file on another filesystem) does not send every
later copy through the slower fallbacks."""
import errno
import os

from fqcheck.fixer import shard


def test_exdev_falls_back_for_that_file_only(tmp_path, monkeypatch):
    real, calls = os.copy_file_range, []

    def cross_device_once(src, dst, n, *offsets):
        calls.append(n)
        if len(calls) == 1:  # the first file lies on another filesystem
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real(src, dst, n, *offsets)
    monkeypatch.setattr(os, "copy_file_range", cross_device_once)
    monkeypatch.setitem(shard._mode, "m", "copy_file_range")
    data = os.urandom(1 << 16)
    (tmp_path / "src").write_bytes(data)
    for i in range(2):
        with open(tmp_path / "src", "rb") as src, open(tmp_path / f"dst{i}", "wb+") as dst:
            shard.copy_range(src.fileno(), dst.fileno(), 0, 0, len(data))
        assert (tmp_path / f"dst{i}").read_bytes() == data
    assert len(calls) >= 2  # the second file was copied with copy_file_range again
    assert shard._mode["m"] == "copy_file_range"

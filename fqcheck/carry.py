"""What a fix's re-lint takes from the fix's first lint instead of reading tensor data again.

The re-lint is the proof that the fixed checkpoint is clean, so it runs every rule on the output:
the header half in full, and the deep half reads every tensor the fix rewrote from the output file.
A tensor the writer copied verbatim is not read again, and this is why that is sound:
- every deep result kept per tensor (the TEN pass's NaN/Inf counts, all-zero flag and fingerprint;
  QNT002's grid test) is a function of the tensor's bytes, dtype and shape, and, for the grid test,
  of the quantizer spec, which the re-lint resolves again from the output and which is part of the
  memo key (a spec that changed, e.g. an amax now read from the state file, is tested afresh);
- the output's bytes are the bytes the first lint read: the writer copied exactly that byte range
  (fixer/shard.py: every short count is an error, the file size is checked); the source file did not
  change from before the first lint until the writing ended (device, inode, size, mtime and ctime
  equal: every write moves ctime, which no user can set back); the output file did not change from
  the end of its writing until the re-lint (device, inode, size, mtime equal; a rename moves ctime,
  not mtime); and the output entry has the source entry's dtype, shape and size.
When any of that does not hold, the tensor is simply read again.
"""
from __future__ import annotations

import os


def stamp(path, ctime: bool = True) -> tuple | None:
    """What changes when a file's content may have changed (None: cannot stat it)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) + ((st.st_ctime_ns,) if ctime else ())


def fstamp(fd: int) -> tuple:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Carry:
    """Output file -> (source file, the tensors copied verbatim into it, the output file's stamp at
    the end of its writing). source() answers for the re-lint's deep passes."""

    def __init__(self, source_ckpt):
        self.source_ckpt = source_ckpt
        self.files: dict[str, tuple[str, frozenset | None, tuple]] = {}
        self.out = None
        self._valid: dict[str, bool] = {}

    def add(self, out_file: str, src_file: str, names, out_stamp: tuple | None) -> None:
        """names: the tensors copied verbatim (None: all of them, a whole file copied or untouched)."""
        if out_stamp is not None:
            self.files[out_file] = (src_file, None if names is None else frozenset(names), out_stamp)

    def attach(self, out_ckpt) -> None:
        self.out = out_ckpt
        out_ckpt.carry = self

    def source(self, fname: str, tname: str):
        """(source Checkpoint, source file) whose results for tensor `tname` hold for the output's
        `fname`, or None: read it."""
        got = self.files.get(fname)
        if got is None or self.out is None:
            return None
        src_file, names, out_stamp = got
        if names is not None and tname not in names:
            return None
        if fname not in self._valid:
            self._valid[fname] = stamp(self.out.path(fname), ctime=False) == out_stamp
        if not self._valid[fname]:
            return None
        try:
            a = self.out.header(fname).tensors.get(tname)
            b = self.source_ckpt.header(src_file).tensors.get(tname)
        except (OSError, KeyError):
            return None
        if a is None or b is None or (a.dtype, tuple(a.shape), a.nbytes) != (b.dtype, tuple(b.shape), b.nbytes):
            return None
        return self.source_ckpt, src_file

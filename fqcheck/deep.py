"""The deep pass: one streaming read of every readable shard's tensor data, shared by the deep rules.

Per tensor it records NaN/Inf counts, whether every value is zero, and a fingerprint (a hash of
sampled windows) from which duplicate tensors are found; only tensors whose fingerprints collide
are hashed in full, so the common case costs one vectorised bit test per byte and no hashing.
Data is read through mmap in windows of `chunk_bytes`; each window's pages are unmapped after use,
so resident memory stays bounded by a window, not by a shard.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Iterable

from .checkpoint import Checkpoint
from .checkpoint import safetensors as st
from .checkpoint.data import ShardData
from .engine import Hit
from .names import LM_HEAD, embedding_name
from .options import Options
from .progress import bar as progress_bar

CHUNK_BYTES = 64 << 20   # one mmap window; resident memory is bounded by this
BLOCK_BYTES = 1 << 20    # numpy works on cache-sized blocks inside a window
SAMPLE_BYTES = 4096      # fingerprint: this many bytes at the head, the tail and 14 points between
SAMPLES = 16
WORKERS = 2              # reading threads; resident memory is at most WORKERS x CHUNK_BYTES
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)

# dtype -> (unsigned view, magnitude mask, smallest non-finite magnitude, Inf magnitude, has a zero).
# A value is non-finite when (bits & mask) >= threshold, and zero (+0 or -0) when (bits & mask) == 0.
FLOAT_BITS = {
    "F64": ("u8", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000, 0x7FF0_0000_0000_0000, True),
    "F32": ("u4", 0x7FFF_FFFF, 0x7F80_0000, 0x7F80_0000, True),
    "F16": ("u2", 0x7FFF, 0x7C00, 0x7C00, True),
    "BF16": ("u2", 0x7FFF, 0x7F80, 0x7F80, True),
    "F8_E5M2": ("u1", 0x7F, 0x7C, 0x7C, True),
    "F8_E4M3": ("u1", 0x7F, 0x7F, None, True),   # E4M3FN: no Inf, S.1111.111 is NaN
    "F8_E8M0": ("u1", 0xFF, 0xFF, None, False),  # scale type: 0xFF is NaN, there is no zero
}


@dataclass(slots=True)  # one per tensor: no per-instance __dict__ (a million tiny tensors add up)
class TensorStats:
    file: str
    name: str
    dtype: str
    shape: tuple
    nbytes: int
    fingerprint: bytes        # hash of sampled windows + size; equal bytes => equal fingerprint
    begin: int = 0            # data offset in the file (aliased entries share it: SFT003)
    nonfinite: int = 0        # NaN + Inf (floating dtypes only)
    inf: int = 0
    all_zero: bool | None = None  # None for non-floating dtypes (not scanned)

    @property
    def nan(self) -> int:
        return self.nonfinite - self.inf

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class DeepScan:
    """The result of the pass over one checkpoint: stats per (file, tensor), full digests on demand."""

    def __init__(self, ckpt: Checkpoint, stats: dict, chunk_bytes: int):
        self._headers = ckpt.headers()  # not the Checkpoint: the memo must not keep its key alive
        self.stats: dict[tuple[str, str], TensorStats] = stats
        self.chunk_bytes = chunk_bytes
        self._digests: dict[tuple[str, str], bytes] = {}

    def digest(self, key: tuple[str, str]) -> bytes:
        """Full blake2b of one tensor's bytes (read again; only asked for fingerprint collisions)."""
        if key not in self._digests:
            fname, tname = key
            header = self._headers[fname]
            h = hashlib.blake2b(digest_size=32)
            with ShardData(header) as sd:
                entry = header.tensors[tname]
                for mv in _windows(sd, entry, self.chunk_bytes):
                    h.update(mv)
                    mv.release()
            self._digests[key] = h.digest()
        return self._digests[key]

    def same_bytes(self, a: tuple[str, str], b: tuple[str, str]) -> bool:
        sa, sb = self.stats.get(a), self.stats.get(b)
        if sa is None or sb is None or sa.nbytes != sb.nbytes or sa.fingerprint != sb.fingerprint:
            return False
        return self.digest(a) == self.digest(b)

    def duplicate_groups(self, keys: Iterable[tuple[str, str]]) -> list[list[tuple[str, str]]]:
        """Groups (of two or more) of the given tensors whose bytes are identical."""
        by_fp: dict[tuple, list] = {}
        for k in keys:
            s = self.stats[k]
            by_fp.setdefault((s.nbytes, s.fingerprint), []).append(k)
        groups = []
        for cands in by_fp.values():
            if len(cands) < 2:
                continue
            by_digest: dict[bytes, list] = {}
            for k in cands:
                by_digest.setdefault(self.digest(k), []).append(k)
            groups.extend(g for g in by_digest.values() if len(g) > 1)
        return sorted(groups)


def scannable(header: st.SafetensorsHeader) -> bool:
    """Shards whose offsets can be trusted: no unreadable header (SFT001), no buffer mismatch (SFT004)."""
    return not any(p.kind in (st.UNREADABLE, st.BUFFER) for p in header.problems)


def scan(ckpt: Checkpoint, *, chunk_bytes: int = CHUNK_BYTES, progress: bool | None = None,
         workers: int | None = None) -> DeepScan:
    """Run the deep pass once per Checkpoint object (memoised on it) and return its results."""
    return ckpt.once("deep.scan", lambda: _scan(ckpt, chunk_bytes, progress, workers))


def _scan(ckpt: Checkpoint, chunk_bytes: int, progress: bool | None, workers: int | None) -> DeepScan:
    import numpy as np

    if chunk_bytes <= 0 or chunk_bytes % 8:
        raise ValueError("chunk_bytes must be a positive multiple of 8")
    workers = max(1, workers or min(WORKERS, os.cpu_count() or 1))
    shards = [(f, h) for f, h in ckpt.headers().items() if scannable(h)]
    total = sum(e.nbytes for _, h in shards for e in h.tensors.values() if e.dtype in FLOAT_BITS)
    bar = progress_bar("deep scan", total, progress)
    stats: dict[tuple[str, str], TensorStats] = {}
    graded = ckpt.memoized("qnt.grid.by_tensor")  # weights QNT002 already read
    try:
        for fname, header in shards:
            skip = _carried(ckpt, fname, header, stats)
            if skip and bar is not None:
                bar.advance(sum(header.tensors[t].nbytes for t in skip if header.tensors[t].dtype in FLOAT_BITS))
            with ShardData(header) as sd:
                _scan_shard(np, fname, sd, chunk_bytes, bar, stats, workers, skip, graded)
    finally:
        if bar is not None:
            bar.stop()
    return DeepScan(ckpt, stats, chunk_bytes)


def _carried(ckpt: Checkpoint, fname: str, header, stats: dict) -> set:
    """A fix's re-lint: the tensors of `fname` whose stats the first lint's pass already has (copied
    verbatim by the fix, fqcheck.carry says why that is sound), put into `stats`; their names."""
    carry = ckpt.carry
    if carry is None:
        return set()
    done = set()
    for name, entry in header.tensors.items():
        src = carry.source(fname, name)
        if src is None:
            continue
        src_ckpt, src_file = src
        memo = src_ckpt.memoized("deep.scan")
        s = memo.stats.get((src_file, name)) if memo is not None else None
        if s is None:
            continue
        stats[(fname, name)] = TensorStats(fname, name, s.dtype, s.shape, s.nbytes, s.fingerprint, entry.begin,
                                           s.nonfinite, s.inf, s.all_zero)
        done.add(name)
    return done


def _scan_shard(np, fname: str, sd: ShardData, chunk_bytes: int, bar, stats: dict, workers: int,
                skip: set = frozenset(), graded: dict | None = None) -> None:
    """`workers` threads take the shard's tensors in file order (numpy releases the GIL while it
    reads the mapping, so two threads read about twice as fast when two cores are free). skip: the
    tensors already in `stats`; graded: (file, tensor) -> QNT002's GridStats of a weight it read."""
    bad = {p.tensor for p in sd.header.problems if p.kind == st.BAD_ENTRY}  # SFT002: sizes untrusted
    entries = iter(sorted((e for e in sd.header.tensors.values() if e.name not in bad and e.name not in skip),
                          key=lambda e: e.begin))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                with lock:
                    entry = next(entries, None)
                if entry is None:
                    return
                _scan_tensor(np, fname, sd, entry, chunk_bytes, bar, stats, graded)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers - 1)]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _scan_tensor(np, fname: str, sd: ShardData, entry: st.TensorEntry, chunk_bytes: int, bar, stats: dict,
                 graded: dict | None = None) -> None:
    s = TensorStats(fname, entry.name, entry.dtype, entry.shape, entry.nbytes, _fingerprint(sd, entry),
                    begin=entry.begin)
    g = graded.get((fname, entry.name)) if graded else None
    if g is not None and not g.nonfinite and entry.dtype in FLOAT_BITS:
        # QNT002's pass over this weight already saw every value: no NaN or Inf, and whether all are
        # +-0 (its lookup classes say so per bit pattern); a weight with NaN/Inf is scanned to count them
        s.all_zero = not g.nonzero if FLOAT_BITS[entry.dtype][4] else None
        if bar is not None:
            bar.advance(entry.nbytes)
    elif entry.dtype in FLOAT_BITS and entry.nbytes:
        _scan_floats(np, sd, entry, s, chunk_bytes, bar)
    stats[(fname, entry.name)] = s


def _scan_floats(np, sd: ShardData, entry: st.TensorEntry, s: TensorStats, chunk_bytes: int, bar) -> None:
    kind, mask, threshold, inf, has_zero = FLOAT_BITS[entry.dtype]
    dt = np.dtype(kind)
    block = max(dt.itemsize, min(BLOCK_BYTES, chunk_bytes)) // dt.itemsize
    buf = np.empty(block, dt)
    mask, threshold = dt.type(mask), dt.type(threshold)
    top = 0  # largest magnitude pattern seen: 0 means all zero so far
    for mv in _windows(sd, entry, chunk_bytes):
        arr = np.frombuffer(mv, dt)
        for i in range(0, arr.size, block):
            part = arr[i:i + block]
            out = buf[:part.size]
            np.bitwise_and(part, mask, out=out)
            m = out.max()
            if m >= threshold:  # rare: count exactly
                s.nonfinite += int(np.count_nonzero(out >= threshold))
                if inf is not None:
                    s.inf += int(np.count_nonzero(out == dt.type(inf)))
            if m > top:
                top = m
        del arr, part
        if bar is not None:
            bar.advance(len(mv))
        mv.release()
    s.all_zero = bool(top == 0) if has_zero else None


def _windows(sd: ShardData, entry: st.TensorEntry, chunk_bytes: int):
    """Yield memoryviews of at most chunk_bytes over one tensor; each window's pages are unmapped
    after use so resident memory stays bounded (the caller must release the view before resuming)."""
    mm = sd.mm
    start = sd.header.data_start + entry.begin
    stop = sd.header.data_start + entry.end
    for lo in range(start, stop, chunk_bytes):
        hi = min(stop, lo + chunk_bytes)
        page_lo = lo - lo % _PAGE
        yield memoryview(mm)[lo:hi]
        # Whole pages only: a page shared with the next window is left mapped.
        page_hi = hi - hi % _PAGE if hi < stop else -(-hi // _PAGE) * _PAGE
        if page_hi > page_lo:
            _madvise(mm, _MADV_DONTNEED, page_lo, min(page_hi, len(mm)) - page_lo)


def _madvise(mm, advice: int, start: int, length: int) -> None:
    try:
        mm.madvise(advice, start, length)
    except (OSError, ValueError, AttributeError):  # old kernel or not Linux: only a speed/RSS hint
        pass


def _fingerprint(sd: ShardData, entry: st.TensorEntry) -> bytes:
    """Hash of SAMPLES windows spread over the tensor (all of it when small), and its size."""
    h = hashlib.blake2b(digest_size=16)
    h.update(entry.nbytes.to_bytes(8, "little"))
    n = entry.nbytes
    base = sd.header.data_start + entry.begin
    mm = sd.mm
    if n <= SAMPLES * SAMPLE_BYTES:
        if n:
            with memoryview(mm)[base:base + n] as mv:
                h.update(mv)
    else:
        step = (n - SAMPLE_BYTES) // (SAMPLES - 1)
        for i in range(SAMPLES):
            lo = base + i * step
            with memoryview(mm)[lo:lo + SAMPLE_BYTES] as mv:
                h.update(mv)
    return h.digest()



def scan_for(ckpt: Checkpoint, options: Options | None = None) -> DeepScan:
    """The pass as the deep checks call it: progress off under --quiet, --jobs threads."""
    from .workers import count
    return scan(ckpt, progress=False if options is not None and options.quiet else None,
                workers=count(options.jobs if options is not None else 0))


# -- tied embeddings (TEN004's deep half; the TEN004 check itself lives in checks/ten.py) --------



def tie_word_embeddings(ckpt: Checkpoint) -> bool:
    """True only when config.json says so explicitly (top level, or its text_config)."""
    cfg = ckpt.config.data if ckpt.config is not None else None
    if not isinstance(cfg, dict):
        return False
    if "tie_word_embeddings" in cfg:
        return cfg["tie_word_embeddings"] is True
    text = cfg.get("text_config")
    return isinstance(text, dict) and text.get("tie_word_embeddings") is True


def _key(ckpt: Checkpoint, name: str, deep: DeepScan) -> tuple[str, str] | None:
    for f in ckpt.tensor_files.get(name, ()):
        if (f, name) in deep.stats:
            return (f, name)
    return None


def tied_embedding_hits(ckpt: Checkpoint, options: Options | None = None) -> list[Hit]:
    """TEN004, deep half: tie_word_embeddings is true and the stored lm_head.weight has other bytes
    than the input embedding (loaders tie the two and silently drop the stored lm_head)."""
    if not tie_word_embeddings(ckpt) or LM_HEAD not in ckpt.tensor_files:
        return []
    emb = embedding_name(ckpt.tensor_files)
    if emb is None:
        return []
    deep = scan_for(ckpt, options)
    head_key, emb_key = _key(ckpt, LM_HEAD, deep), _key(ckpt, emb, deep)
    if head_key is None or emb_key is None:  # in an unreadable shard: SFT rules report it
        return []
    if deep.same_bytes(head_key, emb_key):
        return []  # the same bytes stored twice: TEN002, fixable by dropping lm_head
    h, e = deep.stats[head_key], deep.stats[emb_key]
    how = (f"shape {list(h.shape)} {h.dtype} vs {list(e.shape)} {e.dtype}"
           if (h.shape, h.dtype) != (e.shape, e.dtype) else "same shape, different values")
    return [Hit(f"tie_word_embeddings is true but {LM_HEAD} differs from {emb} ({how}): loaders tie "
                f"lm_head to the embedding and silently ignore the stored {LM_HEAD}",
                file=head_key[0], tensor=LM_HEAD)]

"""Text from a checkpoint (tensor and file names, JSON values) is untrusted: before it reaches a
terminal or a CI log, every character that could move the cursor, start an escape sequence,
reorder the line (bidi controls) or break it (newlines, LS/PS) is shown as a visible escape."""
from __future__ import annotations

import re

# C0 and DEL, C1 (U+0080-U+009F: U+009B is a one-character CSI), the bidi embeddings, overrides
# and isolates, LS/PS, BOM, and lone surrogates (a non-UTF-8 file name as os.fsdecode gives it).
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069"
                     "\u2028\u2029\ufeff\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:  # surrogateescape: the raw byte that was not UTF-8
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: object) -> str:
    """`text` with every unsafe character shown as \\xNN or \\uNNNN (tabs are kept)."""
    s = str(text)
    return _UNSAFE.sub(_escape, s) if _UNSAFE.search(s) else s

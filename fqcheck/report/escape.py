"""Names and text from a checkpoint (file names, tensor names, header strings) are untrusted:
before any of it reaches a terminal, a CI log or a report, `printable` makes it inert."""
from __future__ import annotations

import re

# C0 and C1 controls (ESC, BEL, CSI U+009B...), DEL, bidi embeddings/overrides/isolates and marks
# (they reorder what a reader sees: "Trojan Source"), LS/PS (line breaks to many renderers), BOM,
# and lone surrogates (a non-UTF-8 file name, as Python decodes it; UTF-8 output refuses them).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")


def _code(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: object) -> str:
    """`text` (str() of it) with every unsafe character shown as a \\xNN / \\uNNNN escape: one line,
    shown as stored."""
    return _UNSAFE.sub(_code, str(text))

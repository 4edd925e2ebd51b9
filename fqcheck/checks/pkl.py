"""PKL: pickle files, read opcode by opcode (fqcheck.checkpoint.pickle_scan), never unpickled."""
from __future__ import annotations

from typing import Iterator

from ..engine import Context, Hit, check

MAX_LISTED = 8


@check("PKL001")
def unsafe_globals(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    if not ckpt.pickle_names:
        return
    from ..checkpoint.pickle_scan import scan_cached  # imported only when there are pickle files

    for name in ckpt.pickle_names:
        bad = scan_cached(ckpt, name).unsafe_globals()
        if bad:
            listed = ", ".join(bad[:MAX_LISTED]) + (f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
            yield Hit(f"pickle imports {len(bad)} global(s) outside torch's weights_only allowlist: "
                      f"{listed}; torch.load(weights_only=True) refuses it, and loading it with "
                      "weights_only=False runs that code", file=name)

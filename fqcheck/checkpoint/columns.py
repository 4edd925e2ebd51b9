"""Column helpers the header-only rules share: ~90k tensor names on a DeepSeek-R1 layout, so each
walk over them runs at C speed (map/deque, str.join/count), never name by name in Python. The speed
tricks of the header path live here and in safetensors.py, not in the rules."""
from __future__ import annotations

import operator
from collections import deque

_call = getattr(operator, "call", lambda f, x: f(x))  # operator.call is Python 3.11+


def deal(items, labels, buckets) -> None:
    """Append each of `items` to `buckets[label]`, label by label from `labels` (the same length):
    buckets is a list (labels are ints) or a dict. One C-level pass, no Python loop. Raises
    KeyError/IndexError for a label without a bucket (some items may already be dealt then)."""
    if isinstance(buckets, list):  # the unbound list.append: no bound method to build and call through
        deque(map(list.append, map(buckets.__getitem__, labels), items), maxlen=0)
    else:
        appends = {k: b.append for k, b in buckets.items()}
        deque(map(_call, map(appends.__getitem__, labels), items), maxlen=0)

"""The re-folds of a fix, computed ahead of the writer by the --jobs workers (fqcheck.workers).

The writer stays what it was: one thread writes each shard in file order and asks for each replaced
tensor when it reaches it. Here the producers of every replaced tensor, in that same order, run on
the workers (N CPU threads, or one thread per GPU, each GPU with its own staging) from their own
read-only map of the source, at most one result per worker waiting: memory is bounded by the largest
re-folded tensor per worker. Nothing here touches a file but to read the source, so the journal and
transaction rules of the writer (transaction.py) are unchanged; an error in a producer reaches the
writer when it asks for that tensor, as if the writer had called the producer itself.
"""
from __future__ import annotations

import threading

from ..checkpoint.data import ShardData
from .shard import ShardWriteError


class _Inline:
    """No workers: the writer calls each producer itself, as before."""

    def producers(self, name: str, replace: dict) -> dict:
        return replace

    def close(self) -> None:
        pass


class _Ahead:
    def __init__(self, ckpt, order: list, workers: list):
        from ..workers import Ahead
        self._ckpt = ckpt
        self._index = {(name, e.name): i for i, (name, e, _) in enumerate(order)}
        self._maps: dict[str, ShardData] = {}
        self._lock = threading.Lock()
        self._ahead = Ahead(self._compute, order, workers)

    def _map(self, name: str) -> ShardData:
        with self._lock:
            sd = self._maps.get(name)
            if sd is None:
                try:
                    sd = self._maps[name] = ShardData(self._ckpt.header(name))
                except ValueError as e:  # emptied since its header was read
                    raise ShardWriteError(f"{name}: cannot map the source: {e}") from e
            return sd

    def _compute(self, item, worker):
        name, entry, producer = item
        sd = self._map(name)
        try:
            raw = sd.view(entry)
        except ValueError:
            raw = b""
        if len(raw) != entry.nbytes:
            raise ShardWriteError(f"{entry.name}: source file ended early")
        if getattr(producer, "takes_device", False):
            return producer(raw, device=worker)
        return producer(raw)

    def producers(self, name: str, replace: dict) -> dict:
        """The shard's producers as the writer calls them: each hands over its precomputed result."""
        return {t: self._taker(self._index[(name, t)]) for t in replace}

    def _taker(self, i: int):
        return lambda raw: self._ahead.get(i)

    def close(self) -> None:
        self._ahead.close()  # the workers have stopped: no map is in use
        for sd in self._maps.values():
            sd.close()
        self._maps.clear()


def ahead_of_writer(ckpt, plan, workers):
    """The producers the writer should call for each rewritten shard (`producers(name, replace)`),
    computed ahead by `workers` (fqcheck.workers.devices) when there are any; close() when done."""
    order = []
    for name in sorted(plan.shards):
        sp = plan.shards[name]
        if not sp.replace:
            continue
        h = ckpt.header(name)
        for e in sorted((h.tensors[t] for t in sp.replace), key=lambda e: e.begin):
            order.append((name, e, sp.replace[e.name]))
    if not order or not workers:
        return _Inline()
    return _Ahead(ckpt, order, workers)

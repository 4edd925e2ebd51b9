"""--jobs: whole tensors spread over worker threads, N on the CPU or one per GPU with --device cuda.

Threads only: the Python API never forks (the command line's header reader is the one process it
may start, checkpoint/parallel.py). numpy and torch release the GIL in the calls that carry the
data (a gather over a mapped weight, a fold, a host<->GPU copy), so threads use the cores. Each
worker takes whole tensors: one tensor is never split between workers (splitting one weight over
two GPUs ran 12 GB/s against 28-31 on one: README, Performance), so memory stays bounded by the
largest tensor per worker plus each worker's chunk buffers. Importing this module imports neither
torch nor numpy.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Callable, Iterable

MAX_AUTO = 16  # --jobs 0 (auto): the cores this process may run on, at most this many


def count(jobs: int = 0) -> int:
    """Worker threads for --jobs N on the CPU: N, or with 0 the usable cores (at most MAX_AUTO)."""
    if jobs and jobs > 0:
        return jobs
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO))


def devices(device_opt: str = "auto", jobs: int = 0) -> list[str]:
    """One entry per worker: "cpu" N times, or one "cuda:i" per GPU used. --device cuda (or auto
    with a GPU) takes every visible GPU, at most N with --jobs N; cuda:i names one GPU. Imports torch."""
    from .quant.formats import resolve_device
    dev = resolve_device(device_opt)
    if dev.type != "cuda":
        return ["cpu"] * count(jobs)
    if dev.index is not None:
        return [str(dev)]
    import torch
    n = torch.cuda.device_count()
    n = min(n, jobs) if jobs and jobs > 0 else n
    return [f"cuda:{i}" for i in range(max(1, n))]


@contextlib.contextmanager
def torch_threads(n: int | None = 1):
    """torch's intra-op threads set to n while workers run (each worker then computes on its own
    core instead of every op waking a pool over all of them); untouched when torch is not loaded
    or n is None (GPU workers: their host-side copies into staging use torch's threads)."""
    torch = sys.modules.get("torch")
    if torch is None or n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spread(fn: Callable, items: Iterable, workers: list) -> list:
    """[fn(item, worker) for item in items], computed by one thread per entry of `workers` (each
    takes the next item when it is free); results in the order of items. An exception in fn is
    re-raised here after every thread has stopped."""
    items = list(items)
    if len(workers) <= 1 or len(items) <= 1:
        with torch_threads(_threads(workers)):
            return [fn(it, workers[0] if workers else "cpu") for it in items]
    with Ahead(fn, items, workers, window=len(items)) as ahead:
        return [ahead.get(i) for i in range(len(items))]


def _threads(workers) -> int | None:
    """torch threads while these workers run: one each on the CPU; untouched for GPU workers."""
    return 1 if all(str(w) == "cpu" for w in workers) else None


class Ahead:
    """fn(item, worker) for items in order, computed ahead by one thread per worker while the caller
    consumes them in order with get(0), get(1), ... (the fix writer stays ordered). At most `window`
    results are computed and not yet taken (default: one per worker), so memory is bounded by the
    largest result per worker. close() (or leaving the with block) stops the threads and waits for them."""

    def __init__(self, fn: Callable, items: list, workers: list, window: int | None = None):
        self._fn, self._items = fn, list(items)
        self._results: dict[int, tuple] = {}
        self._next = 0
        self._stop = False
        self._cond = threading.Condition()
        self._room = threading.Semaphore(max(1, window or len(workers)))
        self._threads_ctx = torch_threads(_threads(workers))
        self._threads_ctx.__enter__()
        self._threads = [threading.Thread(target=self._work, args=(w,), daemon=True,
                                          name=f"fqcheck-job-{k}") for k, w in enumerate(workers)]
        for t in self._threads:
            t.start()

    def _work(self, worker) -> None:
        while True:
            self._room.acquire()
            with self._cond:
                if self._stop or self._next >= len(self._items):
                    self._room.release()
                    return
                i = self._next
                self._next += 1
            try:
                r = (True, self._fn(self._items[i], worker))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                r = (False, e)
            with self._cond:
                self._results[i] = r
                self._cond.notify_all()

    def get(self, i: int):
        """The result for items[i] (taken once); fn's exception is raised here."""
        with self._cond:
            while i not in self._results:
                self._cond.wait()
            ok, value = self._results.pop(i)
        self._room.release()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        with self._cond:
            if self._stop:
                return
            self._stop = True
        for _ in self._threads:
            self._room.release()  # wake a worker waiting for room: it sees _stop and returns
        for t in self._threads:
            t.join()
        self._results.clear()
        self._threads_ctx.__exit__(None, None, None)

    def __enter__(self) -> "Ahead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

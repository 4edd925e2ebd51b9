"""Deep lint throughput against `cat` over the same page-cached shards (budget: >= 70 % of cat).

    python3 bench/bench_deep_lint.py --size-gb 2 [--shards 4] [--reps 5] [--dir /tmp/fqcheck-bench-deep]

Writes real safetensors shards of random finite bf16 matrices (once; reused when present), reads them
once to warm the page cache, then alternates `cat FILES > /dev/null` and
`python3 -m fqcheck lint --deep --quiet DIR` (whole process: interpreter start included), the same
without --deep (the fixed cost), and an in-process `fqcheck.deep.scan` (the pass alone). Reports best and median of each, the ratios, the
peak RSS of the lint process and the load average (the machine may be shared).
The budget is judged on the deep pass's best time (the whole process adds a fixed start-up and, with
--deep's --arch, torch and transformers imports): exit status 0 when it meets the budget, 1 when not.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = 4096  # each tensor: ROWS x cols bf16
BUDGET = 0.70  # default budget: the deep pass's throughput as a fraction of cat's (DESIGN.md)


def write_shards(d: Path, size_gb: float, shards: int) -> list[Path]:
    import numpy as np

    d.mkdir(parents=True, exist_ok=True)
    per_shard = int(size_gb * (1 << 30)) // shards
    tensor_bytes = 32 << 20
    rng = np.random.default_rng(0)
    paths = []
    for s in range(shards):
        p = d / f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        paths.append(p)
        n = max(1, per_shard // tensor_bytes)
        cols = tensor_bytes // 2 // ROWS
        hdr, off = {"__metadata__": {"format": "pt"}}, 0
        for i in range(n):
            hdr[f"model.layers.{s}.mlp.experts.{i}.weight"] = {
                "dtype": "BF16", "shape": [ROWS, cols], "data_offsets": [off, off + tensor_bytes]}
            off += tensor_bytes
        if p.exists() and p.stat().st_size >= off:
            continue
        raw = json.dumps(hdr).encode()
        raw += b" " * (-len(raw) % 8)
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for _ in range(n):
                # random bits with bit 14 cleared: finite, mostly non-zero bf16 values below 2
                u = rng.integers(0, 1 << 16, tensor_bytes // 2, dtype=np.uint16) & 0xBFFF
                f.write(u.tobytes())
    return paths


def timed(cmd: list[str], **kw) -> tuple[float, int, int]:
    """Wall seconds, exit code and peak RSS (KiB) of one child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, **kw)
    _, status, ru = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    return dt, proc.returncode, ru.ru_maxrss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fqcheck-bench-deep"))
    ap.add_argument("--budget", type=float, default=BUDGET, help="least fraction of the baseline's throughput")
    a = ap.parse_args()

    paths = write_shards(a.dir, a.size_gb, a.shards)
    total = sum(p.stat().st_size for p in paths)
    devnull = subprocess.DEVNULL
    subprocess.run(["cat", *map(str, paths)], stdout=devnull, check=True)  # warm the page cache

    sys.path.insert(0, str(ROOT))
    from fqcheck.checkpoint import Checkpoint
    from fqcheck.deep import scan

    cat_t, lint_t, pass_t, pass1_t, head_t, rss = [], [], [], [], [], 0
    lint_cmd = [sys.executable, "-m", "fqcheck", "lint", "--deep", "--quiet", str(a.dir)]
    for _ in range(a.reps):
        cat_t.append(timed(["cat", *map(str, paths)], stdout=devnull)[0])
        head_t.append(timed([c for c in lint_cmd if c != "--deep"], cwd=ROOT, stdout=devnull)[0])
        dt, rc, maxrss = timed(lint_cmd, cwd=ROOT, stdout=devnull)
        if rc not in (0, 1):
            sys.exit(f"lint failed with exit code {rc}")
        lint_t.append(dt)
        rss = max(rss, maxrss)
        t = time.perf_counter()
        scan(Checkpoint.open(a.dir), progress=False)
        pass_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        scan(Checkpoint.open(a.dir), progress=False, workers=1)
        pass1_t.append(time.perf_counter() - t)

    gb = total / 1e9

    def line(name, ts):
        best, med = min(ts), statistics.median(ts)
        print(f"{name:<28} best {gb / best:6.2f} GB/s ({best:.3f} s)   median {gb / med:6.2f} GB/s ({med:.3f} s)")
        return best, med

    print(f"{len(paths)} shards, {gb:.2f} GB, {a.reps} reps, load average {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} cores")
    cb, cm = line("cat", cat_t)
    lb, lm = line("fqcheck lint --deep", lint_t)
    pb, pm = line("deep pass only (in-process)", pass_t)
    line("deep pass, one thread", pass1_t)
    hb, hm = min(head_t), statistics.median(head_t)
    print(f"{'fqcheck lint (header only)':<28} best {hb:.3f} s   median {hm:.3f} s   (fixed cost: "
          f"interpreter, imports, headers)")
    print(f"lint --deep / cat: best {cb / lb:.0%}, median {cm / lm:.0%}   "
          f"(pass only: best {cb / pb:.0%}, median {cm / pm:.0%};   lint --deep minus header-only "
          f"lint: median {cm / max(lm - hm, 1e-9):.0%})   budget >= {a.budget:.0%}")
    print(f"peak RSS of the lint process: {rss / 1024:.0f} MiB")
    ok = cb / pb >= a.budget
    print(f"budget (deep pass, best, against cat's best): {cb / pb:.0%}", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

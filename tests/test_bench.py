"""The benchmarks are budget gates: a missed budget they print is a non-zero exit."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_fix_exits_1_when_it_misses_its_budget(tmp_path):
    # a few MB and a budget no fix can meet (1000 x cp): the smallest run that must fail
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_fix.py"), "--size-gb", "0.004", "--shards", "2",
                        "--tensor-mb", "1", "--dir", str(tmp_path / "b"), "--budget", "1000"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 1, p.stderr
    assert p.stdout.splitlines()[-1] == "budget: FAIL"
    assert "(budget >= 100000%)" in p.stdout

"""Progress bars: on deep lint and fix, drawn on stderr only for a terminal, never under --quiet."""
import pytest

from fqcheck.demo import build
from terminal import stderr_on_a_terminal

# MIN_BYTES = 0: the tiny demo checkpoint counts as large enough to show a bar.
RUN = ("import sys, fqcheck.progress as p, fqcheck.cli as c\np.MIN_BYTES = 0\n"
       "sys.argv[0] = 'fqcheck'\nc.main()\n")


@pytest.fixture
def damaged(tmp_path):
    build(tmp_path / "ck")
    return tmp_path / "ck"


def test_deep_lint_bar_on_a_terminal(damaged):
    p, err = stderr_on_a_terminal(["-c", RUN, "lint", damaged, "--deep", "--select", "TEN"])
    assert p.returncode == 0, err
    assert "deep scan" in err


def test_fix_bar_counts_files_on_a_terminal(damaged):
    # the demo's leaked weight amax sits beside raw weights: fix decides them (--quant-format) first
    p, err = stderr_on_a_terminal(["-c", RUN, "fix", damaged, "--select", "QNT001,SFT006", "--quant-format", "fp8"])
    assert p.returncode == 0, err
    assert "fix 0/2 files" in err  # the two shards the plan rewrites
    assert b"Changed:" in p.stdout


@pytest.mark.parametrize("cmd", [["lint", "--deep", "--select", "TEN", "-q"], ["fix", "-q", "--select", "SFT006"]])
def test_quiet_draws_nothing(damaged, cmd):
    p, err = stderr_on_a_terminal(["-c", RUN, cmd[0], damaged, *cmd[1:]])
    assert p.returncode == 0 and err == "", err


def test_not_on_a_terminal_draws_nothing(damaged):
    import subprocess
    import sys

    from terminal import ROOT
    p = subprocess.run([sys.executable, "-c", RUN, "fix", str(damaged), "--select", "SFT006"], capture_output=True,
                       cwd=ROOT, text=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr

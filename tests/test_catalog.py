"""The catalog and the code stay one-to-one, and the codes are exactly DESIGN.md's fixed set."""
import subprocess
import sys

import pytest

from fqcheck.catalog import CatalogError, load_catalog, load_rule
from fqcheck.engine import registered

DESIGN_CODES = {
    *(f"SFT00{i}" for i in range(1, 7)),
    *(f"IDX00{i}" for i in range(1, 10)),
    "QNT001", "QNT002", "QNT003", "CFG001", "CFG002", "CFG003",
    "TEN001", "TEN002", "TEN003", "TEN004", "TEN005", "PKL001", "ARC001", "ARC002", "ARC003",
    *(f"SRV00{i}" for i in range(1, 9)),
}


def test_catalog_codes_are_the_design_codes():
    assert set(load_catalog()) == DESIGN_CODES


def test_every_rule_has_a_check_and_every_check_a_rule():
    catalog = load_catalog()
    checks = registered()
    declarative = {c for c, r in catalog.items() if r.match}
    assert set(checks) <= set(catalog), f"checks without a catalog file: {set(checks) - set(catalog)}"
    assert set(catalog) == set(checks) | declarative, f"rules without a check: {set(catalog) - set(checks) - declarative}"


def test_every_rule_page_says_why_and_what_the_fix_does():
    for r in load_catalog().values():
        assert len(r.why) > 40, r.code
        assert r.fix_description, r.code
        assert r.family == r.code[:3].lower(), r.code


def test_malformed_rule_file_is_a_clear_error(tmp_path):
    p = tmp_path / "USR001.toml"
    p.write_text('code = "USR001"\nname = "x"\nfamily = "usr"\nseverity = "fatal"\nlevel = "header"\nfix = "no"\nsummary = "s"\n')
    with pytest.raises(CatalogError, match="severity"):
        load_rule(p)


def test_user_declarative_rule_runs_from_rules_dir(tiny_llama, tmp_path):
    rules = tmp_path / "myrules"
    rules.mkdir()
    (rules / "USR001.toml").write_text(
        'code = "USR001"\nname = "no-lm-head"\nfamily = "usr"\nseverity = "warning"\nlevel = "header"\n'
        'fix = "no"\nsummary = "lm_head present"\n[match]\ntensor_pattern = "^lm_head\\\\."\n'
        'message = "{tensor} is stored"\n')
    out = subprocess.run([sys.executable, "-m", "fqcheck", "lint", str(tiny_llama), "--rules", str(rules),
                          "--select", "USR", "-f", "json", "--fail-on", "warning"], capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    import json
    [f] = json.loads(out.stdout)["findings"]
    assert (f["code"], f["tensor"], f["message"]) == ("USR001", "lm_head.weight", "lm_head.weight is stored")


def test_user_rule_cannot_shadow_a_builtin(tmp_path):
    rules = tmp_path / "r"
    rules.mkdir()
    (rules / "SFT001.toml").write_text(
        'code = "SFT001"\nname = "x"\nfamily = "sft"\nseverity = "error"\nlevel = "header"\nfix = "no"\n'
        'summary = "s"\n[match]\nconfig_key = "x"\n')
    with pytest.raises(CatalogError, match="already defined"):
        load_catalog((str(rules),))

#!/usr/bin/env python3
"""The opt-in vLLM conformance suite: vLLM is the judge of what fqcheck says about it.

Builds rule fixtures (tiny Llama/Qwen2 models with head_dim 32, saved by transformers, then
damaged), lints each with the default `fqcheck lint` (the Python API, no flags), fixes a copy
with the default `fqcheck fix`, then loads every broken fixture and every fixed copy with vLLM's
CPU build in ONE process of its own virtualenv (conformance/vllm_worker.py; ~25 s import, ~6 s a
checkpoint) and greedy-decodes from fixed prompt ids. It asserts:
  1. every fixture vLLM fails on, or serves with other tokens than its clean original, is flagged
     (an error, or a warning where the rule's severity is warning) by the default lint;
  2. every fix fqcheck calls successful loads in vLLM and serves the clean original's tokens;
  3. each claim a message (or rule page) makes about vLLM matches what vLLM did (exception type and
     text, or "loads and serves different/same tokens").
Prints a Markdown table (the README keeps the last one) and exits 1 on any failed assertion.

    bash conformance/setup_vllm.sh                      # once: /tmp/venv-vllm
    python3 conformance/run.py [--venv /tmp/venv-vllm] [--keep DIR] [--only NAME,...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fixture builders the unit tests use

# head_dim = 128 / 4 = 32: vLLM's CPU attention needs one of 32, 64, 80, ...
SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=128, num_hidden_layers=2)


@dataclass
class Case:
    name: str
    base: str            # the clean fixture whose tokens a correct load reproduces
    code: str | None     # the rule the default lint must raise (None: a clean base)
    claim: str | None    # text the finding's message (or, for page claims, the rule page) must hold
    vllm: tuple          # ("error", ExcType, text) | ("differs",) | ("same",) | ("loads",) | ("dtype", name)
    page_claim: bool = False


CASES = [
    Case("clean", "clean", None, None, ("loads",)),
    Case("clean_sharded", "clean_sharded", None, None, ("loads",)),
    Case("clean_tied", "clean_tied", None, None, ("loads",)),
    Case("qwen2_clean", "qwen2_clean", None, None, ("loads",)),
    Case("arc002_missing_down_proj", "clean", "ARC002", "vLLM 0.32 loads without it", ("differs",)),
    Case("arc002_qwen2_missing_up_proj", "qwen2_clean", "ARC002", "vLLM 0.32 loads without it", ("differs",)),
    Case("arc003_down_proj_128x200", "clean", "ARC003", "RuntimeError: start (0) + length (N) exceeds dimension size",
         ("error", "RuntimeError", "exceeds dimension size (200)")),
    Case("arc001_extra_gate", "clean", "ARC001", "ValueError: There is no module or parameter named",
         ("error", "ValueError", "There is no module or parameter named")),
    Case("cfg002_auto_map_code_missing", "clean", "CFG002", "without it both ignore auto_map", ("same",)),
    Case("idx003_shard_missing", "clean_sharded", "IDX003", "Weight files referenced in index but missing",
         ("error", "FileNotFoundError", "Weight files referenced in index but missing")),
    Case("ten004_untied_lm_head_missing", "clean", "TEN004", "vLLM 0.32 loads without it", ("differs",)),
    Case("ten004_tied_other_lm_head", "clean_tied", "TEN004", "serve the stored head", ("differs",)),
    Case("sft001_header_len_2e62", "clean", "SFT001", "header too large",
         ("error", "SafetensorError", "header too large"), page_claim=True),
    Case("sft001_header_len_2e62_no_dtype", "clean", "SFT001", "raises `MemoryError`", ("error", "MemoryError", ""),
         page_claim=True),
    Case("qnt001_leaked_amax", "clean", "QNT001", None, ("error", "", "")),
    Case("cfg001_config_missing", "clean", "CFG001", "vLLM 0.32: ValidationError",
         ("error", "ValidationError", "Invalid repository ID or local directory")),
    Case("cfg003_config_says_float16", "clean", "CFG003", "vLLM 0.32 with dtype auto cast them to float16",
         ("dtype", "float16")),
]


def build(name: str, out: Path) -> Path:
    import torch

    from builders import edit_shard, leak_quantizer_state, read_config, read_index, save_tiny_model, \
        write_config

    d = out / name
    base = {"clean_sharded": dict(shards=3), "clean_tied": dict(tie=True)}.get(name, {})
    model_type = "qwen2" if name.startswith("qwen2") or "qwen2" in name else "llama"
    if name == "idx003_shard_missing":
        base = dict(shards=3)
    if name == "ten004_tied_other_lm_head":
        base = dict(tie=True)
    save_tiny_model(d, model_type, seed=0, **base, **SIZES)
    if name == "arc002_missing_down_proj":
        edit_shard(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    elif name == "arc002_qwen2_missing_up_proj":
        edit_shard(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    elif name == "arc003_down_proj_128x200":
        n = "model.layers.0.mlp.down_proj.weight"
        edit_shard(d, lambda t: t.__setitem__(n, t[n][:, :200].clone()))
    elif name == "arc001_extra_gate":
        edit_shard(d, lambda t: t.__setitem__("model.layers.0.mlp.extra_gate.weight",
                                              torch.ones(64, 128, dtype=torch.bfloat16)))
    elif name == "cfg002_auto_map_code_missing":
        cfg = read_config(d)
        cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
        write_config(d, cfg)
    elif name == "idx003_shard_missing":
        victim = sorted(set(read_index(d)["weight_map"].values()))[1]
        (d / victim).unlink()
    elif name == "ten004_untied_lm_head_missing":
        edit_shard(d, lambda t: t.pop("lm_head.weight"))
    elif name == "ten004_tied_other_lm_head":
        torch.manual_seed(1)
        edit_shard(d, lambda t: t.__setitem__("lm_head.weight", torch.randn(256, 128, dtype=torch.float32)))
    elif name.startswith("sft001_header_len_2e62"):
        if name.endswith("no_dtype"):  # vLLM then reads the headers itself to pick the dtype
            cfg = read_config(d)
            cfg.pop("dtype", None)
            cfg.pop("torch_dtype", None)
            write_config(d, cfg)
        f = d / "model.safetensors"
        b = bytearray(f.read_bytes())
        b[:8] = struct.pack("<Q", 2 ** 62)
        f.write_bytes(bytes(b))
    elif name == "cfg001_config_missing":
        (d / "config.json").unlink()
    elif name == "cfg003_config_says_float16":
        cfg = read_config(d)
        cfg["dtype"] = "float16"
        write_config(d, cfg)
    elif name == "qnt001_leaked_amax":
        leak_quantizer_state(d, modules=("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"))
    return d


def lint_and_fix(case: Case, d: Path) -> dict:
    import fqcheck
    from fqcheck.catalog import load_catalog
    from fqcheck.fixer.plan import FixRefused

    r = fqcheck.lint(d, quiet=True)
    errors = [f for f in r.findings if f.severity == "error"]
    flags = [f for f in r.findings if f.severity in ("error", "warning")]
    rec = {"codes": sorted({f.code + ("" if f.severity == "error" else " (warning)") for f in flags}),
           "messages": {f.code: f.message for f in r.findings}}
    if case.code and case.page_claim:
        rec["messages"][case.code] = load_catalog()[case.code].why
    if not errors:
        return rec
    fixed = d.parent / (d.name + ".fixed")
    shutil.copytree(d, fixed)
    try:
        res = fqcheck.fix(fixed, backup=False, quiet=True)
        rec["fix"] = "ok" if res.ok else "findings remain"
    except FixRefused:
        rec["fix"] = "refused"
    except Exception as e:  # noqa: BLE001 - recorded, and fails assertion 2 only if fix said ok
        rec["fix"] = f"error: {type(e).__name__}"
    rec["fixed_dir"] = str(fixed) if rec["fix"] == "ok" else None
    return rec


def judge(case: Case, rec: dict, got: dict, base: dict, fixed: dict | None) -> list[str]:
    """The failed assertions for one case (empty: it conforms)."""
    fails = []
    bad = not got.get("loaded") or got.get("tokens") != base.get("tokens")
    if case.code is None:
        if not got.get("loaded"):
            fails.append(f"clean fixture does not load in vLLM: {got.get('exc_type')}: {got.get('exc')}")
        if rec["codes"]:
            fails.append(f"clean fixture flagged: {rec['codes']}")
        return fails
    if bad and not rec["codes"]:
        fails.append("vLLM fails on it or serves other tokens, and the default lint passes it")
    if not any(c.split()[0] == case.code for c in rec["codes"]):
        fails.append(f"default lint did not raise {case.code} (raised {rec['codes']})")
    kind = case.vllm[0]
    if kind == "error":
        etype, text = case.vllm[1], case.vllm[2]
        if got.get("loaded") or (etype and got.get("exc_type") != etype) or text not in got.get("exc", ""):
            fails.append(f"expected vLLM {etype or 'an error'} {text!r}, got {_outcome(got)}")
    elif kind == "differs" and not (got.get("loaded") and got.get("tokens") != base.get("tokens")):
        fails.append(f"expected vLLM to load and serve other tokens, got {_outcome(got)}")
    elif kind == "dtype" and not (got.get("loaded") and got.get("dtype") == case.vllm[1]):
        fails.append(f"expected vLLM to load it in {case.vllm[1]}, got {_outcome(got)} in {got.get('dtype')}")
    elif kind == "same" and not (got.get("loaded") and got.get("tokens") == base.get("tokens")):
        fails.append(f"expected vLLM to load and serve the clean tokens, got {_outcome(got)}")
    if case.claim and case.claim not in rec["messages"].get(case.code, ""):
        fails.append(f"{case.code}'s {'page' if case.page_claim else 'message'} lacks the claim {case.claim!r}")
    if rec.get("fix") == "ok" and (fixed is None or not fixed.get("loaded") or fixed.get("tokens") != base.get("tokens")):
        fails.append(f"fqcheck fix said ok but vLLM then gives {_outcome(fixed or {})}")
    return fails


def _outcome(got: dict) -> str:
    if got.get("loaded"):
        return f"loaded, tokens {got.get('tokens')}"
    return f"{got.get('exc_type')}: {str(got.get('exc', ''))[:160]}"


def _cell(got: dict, base: dict) -> str:
    if not got:
        return "-"
    if got.get("loaded"):
        dtype = f" in {got.get('dtype')}" if got.get("dtype") != base.get("dtype") else ""
        return f"loads{dtype}, " + ("same tokens" if got.get("tokens") == base.get("tokens") else "**other tokens**")
    text = (str(got.get("exc", "")).splitlines() or [""])[0][:70].replace("`", "'")
    return f"`{got.get('exc_type')}{': ' + text if text else ''}`"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv", default=os.environ.get("VLLM_VENV", "/tmp/venv-vllm"))
    ap.add_argument("--keep", type=Path, help="build the fixtures here and keep them")
    ap.add_argument("--only", help="comma-separated case names (their bases are added)")
    args = ap.parse_args()
    py = Path(args.venv) / "bin" / "python"
    if not py.exists():
        print(f"no vLLM virtualenv at {args.venv}: run bash conformance/setup_vllm.sh first", file=sys.stderr)
        return 2
    cases = CASES
    if args.only:
        want = set(args.only.split(","))
        want |= {c.base for c in CASES if c.name in want}
        cases = [c for c in CASES if c.name in want]
    work = args.keep or Path(tempfile.mkdtemp(prefix="fqcheck-conformance-"))
    work.mkdir(parents=True, exist_ok=True)
    dirs, recs = {}, {}
    for c in cases:
        if (work / c.name).exists():
            shutil.rmtree(work / c.name)
        shutil.rmtree(work / (c.name + ".fixed"), ignore_errors=True)
        dirs[c.name] = build(c.name, work)
        recs[c.name] = lint_and_fix(c, dirs[c.name])
    to_load = [str(d) for d in dirs.values()] + [r["fixed_dir"] for r in recs.values() if r.get("fixed_dir")]
    (work / "load.json").write_text(json.dumps(to_load))
    print(f"loading {len(to_load)} checkpoints with vLLM (log: {work / 'vllm.log'})", file=sys.stderr)
    with open(work / "vllm.log", "w") as log:
        subprocess.run([str(py), str(ROOT / "conformance" / "vllm_worker.py"), str(work / "load.json"),
                        str(work / "loaded.json")], check=True, cwd=work, stdout=log, stderr=log)
    loaded = json.loads((work / "loaded.json").read_text())
    rows, failures = [], 0
    for c in cases:
        rec, got, base = recs[c.name], loaded[str(dirs[c.name])], loaded[str(dirs[c.base])]
        fixed = loaded.get(rec.get("fixed_dir") or "")
        fails = judge(c, rec, got, base, fixed)
        failures += bool(fails)
        rows.append(f"| {c.name} | {_cell(got, base)} | {', '.join(rec['codes']) or 'clean'} | "
                    f"{rec.get('fix', '-')} | {_cell(fixed, base) if fixed else '-'} | "
                    f"{'ok' if not fails else 'FAIL: ' + '; '.join(fails)} |")
    import fqcheck
    print(f"vLLM {loaded.get('vllm')} (CPU), fqcheck from {Path(fqcheck.__file__).parent}\n")
    print("| fixture | vLLM loads the broken checkpoint | default `fqcheck lint` | `fqcheck fix` | "
          "vLLM after fix | verdict |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{len(cases) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

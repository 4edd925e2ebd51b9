"""SARIF 2.1.0, as GitHub code scanning and other SARIF viewers read it.

Checkpoint files are binary, so results carry no region: GitHub shows them at file level, and
upload-sarif then skips hashing the (possibly huge) file for fingerprints; we give our own stable
partialFingerprints (code, file, tensor) instead.
"""
from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import quote

from .. import __version__
from ..api import Report
from ..catalog import Rule
from .escape import printable
from .paths import base_dir, base_uri, locator

SCHEMA_URI = "https://json.schemastore.org/sarif-2.1.0.json"
INFORMATION_URI = "https://pypi.org/project/fqcheck/"
LEVEL = {"error": "error", "warning": "warning", "info": "note"}
SRCROOT = "%SRCROOT%"


def _unwrap(text: str) -> str:
    """Rule pages are hard-wrapped TOML strings; viewers wrap themselves."""
    return re.sub(r"(?<!\n)\n(?!\n)", " ", text)


def _rule(rule: Rule) -> dict:
    why = f"\n\nWhy it matters: {_unwrap(rule.why)}" if rule.why else ""
    fix = f"\n\nWhat the fix does: {_unwrap(rule.fix_description)}" if rule.fix_description else ""
    return {
        "id": rule.code,
        "name": rule.name,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": rule.summary + why},
        "help": {"text": f"{rule.code} {rule.name}: {rule.summary}{why}{fix}\n\n(fix: {rule.fix}; "
                         f"`fqcheck explain {rule.code}`)"},
        "defaultConfiguration": {"level": LEVEL[rule.severity]},
        "properties": {"tags": [rule.family, rule.level], "fix": rule.fix},
    }


def render(report: Report, **_) -> str:
    base = base_dir(report)
    locate = locator(report, base)
    codes = sorted(set(report.rules_run) | {f.code for f in report.findings})
    index = {c: i for i, c in enumerate(codes)}
    rules = [_rule(report.rules[c]) if c in report.rules else {"id": c} for c in codes]
    seen: dict[str, int] = {}
    results = []
    for f in report.findings:
        # a URI: spaces, '%', ':' and '#' in file names are escaped; a non-UTF-8 name as its bytes
        uri = quote(locate(f), safe="/", errors="surrogateescape")
        if not f.file:  # a finding about the whole checkpoint points at its folder
            uri = "./" if uri == "." else uri + "/"
        where = f"{printable(f.tensor)}: " if f.tensor else ""
        key = hashlib.sha256(f"{f.code}\0{uri}\0{printable(f.tensor or '')}".encode()).hexdigest()[:16]
        seen[key] = seen.get(key, 0) + 1  # same rule, file and tensor twice: keep them apart
        props = {"severity": f.severity, "fixable": f.fixable}
        if f.tensor:
            props["tensor"] = printable(f.tensor)
        results.append({
            "ruleId": f.code,
            "ruleIndex": index[f.code],
            "level": LEVEL[f.severity],
            "message": {"text": f"{where}{printable(f.message)}"},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": uri, "uriBaseId": SRCROOT}}}],
            "partialFingerprints": {"primaryLocationLineHash": f"{key}:{seen[key]}"},
            "properties": props,
        })
    log = {
        "$schema": SCHEMA_URI,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "fqcheck", "version": __version__, "semanticVersion": __version__,
                                "informationUri": INFORMATION_URI, "rules": rules}},
            "originalUriBaseIds": {SRCROOT: {"uri": base_uri(base)}},
            "results": results,
        }],
    }
    # json's C encoder only runs without indent: pretty-print what a person might read, and write
    # a huge log (a broken export can have 100,000 findings) compactly, 5x faster.
    return json.dumps(log, indent=2 if len(results) <= 5000 else None) + "\n"

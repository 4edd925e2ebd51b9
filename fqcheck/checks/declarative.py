"""Rules with a [match] table in their catalog file need no Python: they are evaluated here."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from ..catalog import CatalogError, Rule, rules_dir
from ..checkpoint import Checkpoint, load_json
from ..engine import Hit
from ..fixer.edits import DropJsonKey, DropTensor


def evaluate(rule: Rule, ckpt: Checkpoint) -> Iterator[Hit]:
    m = rule.match
    if "tensor_pattern" in m:
        yield from _tensor_pattern(rule, ckpt)
    elif "config_key" in m:
        yield from _config_key(rule, ckpt)
    elif "json_schema" in m:
        yield from _json_schema(rule, ckpt)
    else:
        raise CatalogError(f"rule {rule.code} has neither a registered check nor a [match] table")


def _message(rule: Rule, **fields) -> str:
    template = rule.match.get("message", rule.summary)
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError):
        return template


@lru_cache(maxsize=64)
def _compile(pattern: str, source: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise CatalogError(f"{source}: bad tensor_pattern: {e}") from None


def _tensor_pattern(rule: Rule, ckpt: Checkpoint) -> Iterator[Hit]:
    rx = _compile(rule.match["tensor_pattern"], str(rule.source))
    for fname, h in ckpt.headers().items():
        for t in h.names:
            if rx.search(t):
                # a fixable tensor-pattern rule is fixed by dropping the tensor (and its index entry)
                fix = DropTensor(fname, t) if rule.fix != "no" else None
                yield Hit(_message(rule, tensor=t, file=fname), file=fname, tensor=t, fix=fix)


def _config_key(rule: Rule, ckpt: Checkpoint) -> Iterator[Hit]:
    cfg = ckpt.config
    if cfg is None or not isinstance(cfg.data, dict):
        return
    node = cfg.data
    for part in rule.match["config_key"].split("."):
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    key = rule.match["config_key"]
    fix = DropJsonKey(cfg.name, key) if rule.fix != "no" and "." not in key else None
    yield Hit(_message(rule, key=key, file=cfg.name), file=cfg.name, fix=fix)


def _json_schema(rule: Rule, ckpt: Checkpoint) -> Iterator[Hit]:
    fname = rule.match.get("file", "config.json")
    if fname not in ckpt.names:
        return
    doc = load_json(ckpt.path(fname), fname)
    if doc.error:
        return  # unreadable JSON is the business of CFG001/IDX002
    base = rule.source.parent if rule.source and rule.source.parent != rules_dir() else rules_dir() / "schemas"
    for err in schema_errors(doc.data, base / rule.match["json_schema"]):
        yield Hit(_message(rule, error=err, file=fname) if "message" in rule.match else err, file=fname)


def schema_errors(data, schema_file: Path, limit: int = 20) -> list[str]:
    """Human-readable JSON Schema violations. fqcheck.schema checks valid documents without
    importing jsonschema (~0.1 s); use it (or this) for any schema validation."""
    from ..schema import SchemaFileError, schema_errors as errors

    try:
        return errors(data, schema_file, limit)
    except SchemaFileError as e:
        raise CatalogError(str(e)) from None

"""JSON Schema validation that is cheap when the document is valid.

jsonschema costs ~0.1 s to import and walks every value in Python; an index's weight_map has ~90k
entries on a large checkpoint. `schema_errors` first runs `quick_valid`, an exact checker for the
plain subset of JSON Schema our schemas use (type, properties, required, additionalProperties,
items, enum, const, bounds, lengths, pattern); only when it says "not valid" or "cannot tell"
(a keyword outside the subset: $ref, anyOf, ...) is jsonschema imported to produce the errors.
Annotations (title, description, $comment, default, examples, format) never change validity.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

_ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "default", "examples", "format",
                "deprecated", "readOnly", "writeOnly"}
_SUPPORTED = _ANNOTATIONS | {"type", "properties", "required", "additionalProperties", "items", "enum", "const",
                             "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems",
                             "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "pattern"}


class SchemaFileError(Exception):
    """A schema file is missing or not JSON (a packaging bug, reported as a usage error)."""


def _is_type(v, t: str) -> bool:
    if t == "object":
        return type(v) is dict
    if t == "array":
        return type(v) is list
    if t == "string":
        return type(v) is str
    if t == "boolean":
        return type(v) is bool
    if t == "null":
        return v is None
    if t == "number":
        return type(v) in (int, float)
    if t == "integer":  # JSON Schema: 1.0 is an integer
        return type(v) is int or (type(v) is float and v.is_integer())
    raise _Unsupported


class _Unsupported(Exception):
    pass


def _eq(a, b) -> bool:
    """JSON equality: true is not 1, 1 is 1.0."""
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_eq, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_eq(a[k], b[k]) for k in a)
    return a == b and (type(a) in (int, float)) == (type(b) in (int, float))


def _string_type_only(schema) -> bool:
    return isinstance(schema, dict) and schema.keys() <= (_ANNOTATIONS | {"type"}) and schema.get("type") == "string"


def _valid(v, s) -> bool:
    if s is True or s == {}:
        return True
    if s is False:
        return False
    if not isinstance(s, dict) or not s.keys() <= _SUPPORTED:
        raise _Unsupported
    t = s.get("type")
    if t is not None:
        if not any(_is_type(v, x) for x in (t if isinstance(t, list) else [t])):
            return False
    if "enum" in s and not any(_eq(v, e) for e in s["enum"]):
        return False
    if "const" in s and not _eq(v, s["const"]):
        return False
    if type(v) in (int, float):
        if "minimum" in s and not v >= s["minimum"]:
            return False
        if "maximum" in s and not v <= s["maximum"]:
            return False
        if "exclusiveMinimum" in s and not v > s["exclusiveMinimum"]:
            return False
        if "exclusiveMaximum" in s and not v < s["exclusiveMaximum"]:
            return False
    elif type(v) is str:
        if "minLength" in s and len(v) < s["minLength"]:  # code points, as JSON Schema counts
            return False
        if "maxLength" in s and len(v) > s["maxLength"]:
            return False
        if "pattern" in s and not re.search(s["pattern"], v):
            return False
    elif type(v) is list:
        if len(v) < s.get("minItems", 0) or len(v) > s.get("maxItems", len(v)):
            return False
        if "items" in s:
            items = s["items"]
            if not isinstance(items, (dict, bool)):
                raise _Unsupported  # tuple-form items (older drafts)
            if _string_type_only(items):
                return set(map(type, v)) <= {str}
            return all(_valid(x, items) for x in v)
    elif type(v) is dict:
        if len(v) < s.get("minProperties", 0) or len(v) > s.get("maxProperties", len(v)):
            return False
        if not all(k in v for k in s.get("required", ())):
            return False
        props = s.get("properties", {})
        for k, sub in props.items():
            if k in v and not _valid(v[k], sub):
                return False
        extra = s.get("additionalProperties", True)
        if extra is not True:
            rest = [x for k, x in v.items() if k not in props] if props else list(v.values())
            if _string_type_only(extra):  # e.g. a weight_map: ~90k names -> shard file
                return set(map(type, rest)) <= {str}
            return all(_valid(x, extra) for x in rest)
    return True


def quick_valid(data, schema) -> bool | None:
    """True: valid. False: invalid. None: the schema uses a keyword outside the subset."""
    try:
        return _valid(data, schema)
    except (_Unsupported, re.error, TypeError):
        return None


@lru_cache(maxsize=32)
def load_schema(schema_file: str):
    try:
        return json.loads(Path(schema_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SchemaFileError(f"schema {schema_file}: {e}") from None


@lru_cache(maxsize=32)
def _validator(schema_file: str):
    import jsonschema  # ~0.1 s: only when a document is invalid or the schema is beyond quick_valid

    schema = load_schema(schema_file)
    return jsonschema.validators.validator_for(schema)(schema)


def schema_errors(data, schema_file: str | Path, limit: int = 20) -> list[str]:
    """Human-readable violations of the JSON Schema in `schema_file` ("where: what"), [] if valid."""
    schema_file = str(schema_file)
    if quick_valid(data, load_schema(schema_file)):
        return []
    out = []
    for e in sorted(_validator(schema_file).iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(map(str, e.absolute_path)) or "(root)"
        msg = e.message if len(e.message) <= 300 else e.message[:150] + " ... " + e.message[-150:]
        out.append(f"{where}: {msg}")  # both ends: a huge value in front, the verdict at the back
        if len(out) >= limit:
            break
    return out

"""fqcheck.schema: the jsonschema-free quick check is exact (never calls an invalid document valid,
nor a valid one invalid) on the keywords it supports, and valid documents never import jsonschema."""
import json
import os
import subprocess
import sys

import jsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from fqcheck.schema import quick_valid, schema_errors

INDEX = {"type": "object", "required": ["weight_map"],
         "properties": {"metadata": {"type": "object", "properties": {"total_size": {"type": "integer", "minimum": 0}}},
                        "weight_map": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}}}
CONFIG = {"type": "object", "properties": {
    "model_type": {"type": "string", "minLength": 1, "pattern": "^[a-z0-9_]+$"},
    "architectures": {"type": ["array", "null"], "items": {"type": "string"}, "maxItems": 2},
    "torch_dtype": {"enum": ["float16", "bfloat16", "float32", None]},
    "tie_word_embeddings": {"type": "boolean"}, "n": {"type": "number", "exclusiveMaximum": 5},
    "format": {"const": "pt"}, "shape": {"type": "array", "items": {"type": "integer"}}},
    "additionalProperties": {"type": ["string", "integer", "boolean", "null", "object", "array"]}}
SCHEMAS = [INDEX, CONFIG, {"type": "integer"}, {"additionalProperties": False, "properties": {"a": True}}]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10) | st.sampled_from([1.0, 2.5, -0.0, 5.0])
    | st.sampled_from(["", "pt", "llama", "Bad Type", "model-1.safetensors", "bfloat16"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["weight_map", "metadata", "total_size", "model_type", "architectures", "torch_dtype",
                         "tie_word_embeddings", "n", "format", "shape", "a", "b"]), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=250, deadline=1000, derandomize=True)
@given(st.sampled_from(range(len(SCHEMAS))), json_values)
def test_quick_valid_agrees_with_jsonschema(i, doc):
    schema = SCHEMAS[i]
    quick = quick_valid(doc, schema)
    assert quick is not None
    assert quick == jsonschema.Draft202012Validator(schema).is_valid(doc), doc


def test_unsupported_keywords_defer_to_jsonschema():
    assert quick_valid({"a": 1}, {"anyOf": [{"type": "object"}]}) is None
    assert quick_valid(1, {"$ref": "#/x"}) is None


def test_schema_errors_on_files(tmp_path):
    p = tmp_path / "index.schema.json"
    p.write_text(json.dumps(INDEX))
    good = {"metadata": {"total_size": 8}, "weight_map": {f"t{i}": "a.safetensors" for i in range(90_000)}}
    assert schema_errors(good, p) == []
    bad = {"metadata": {"total_size": -1}, "weight_map": {"w": 3}}
    assert schema_errors(bad, p) == ["metadata/total_size: -1 is less than the minimum of 0",
                                     "weight_map/w: 3 is not of type 'string'"]


def test_valid_documents_do_not_import_jsonschema(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(INDEX))
    code = ("import sys, json; from fqcheck.schema import schema_errors\n"
            f"assert schema_errors({{'weight_map': {{'a': 'b'}}}}, {str(p)!r}) == []\n"
            "print('jsonschema' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert r.stdout.strip() == "False", r.stderr

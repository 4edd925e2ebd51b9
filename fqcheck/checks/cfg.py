"""CFG: config.json, as transformers and vLLM read it. Nothing named in it is imported or run."""
from __future__ import annotations

from typing import Iterator

from ..catalog import schema_path
from ..checkpoint import CONFIG_NAME
from ..engine import Context, Hit, check
from ..fixer.edits import DropJsonKey

CONFIG_SCHEMA = "config.schema.json"
# config dtype strings (transformers' str(torch.dtype) without "torch.") -> safetensors dtype
CONFIG_DTYPES = {"bfloat16": "BF16", "float16": "F16", "half": "F16", "float32": "F32", "float": "F32"}
WEIGHT_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}  # -> bytes per element
# Scale-like tensors of real-quantized exports are F32 whatever the model dtype: not evidence.
SCALE_SUFFIXES = ("_scale", "_scale_2", "scale_inv", "_amax", "zero_point", ".scales", "_scales")


@check("CFG001")
def config_invalid(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    if getattr(ckpt, "_only", None) is not None:
        return  # linting one file: there is no directory config to expect
    cfg = ckpt.config
    if cfg is None:
        yield Hit(f"{CONFIG_NAME} missing: loaders cannot tell the architecture (transformers 5: OSError: "
                  f"does not appear to have a file named {CONFIG_NAME}; vLLM 0.32: ValidationError: Invalid "
                  "repository ID or local directory specified)", file=CONFIG_NAME)
        return
    if cfg.error:
        yield Hit(f"{CONFIG_NAME} unreadable: {cfg.error}", file=CONFIG_NAME)
        return
    from .declarative import schema_errors  # jsonschema is imported only now
    errors = schema_errors(cfg.data, schema_path(CONFIG_SCHEMA))
    if errors:
        yield Hit(f"{CONFIG_NAME} breaks its schema: " + "; ".join(errors[:5]), file=CONFIG_NAME)


def _auto_map_refs(auto_map: dict) -> list[str]:
    refs = []
    for v in auto_map.values():
        for r in (v if isinstance(v, list) else [v]):
            if isinstance(r, str) and r:
                refs.append(r)
    return refs


@check("CFG002")
def auto_map(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    cfg = ckpt.config
    if cfg is None or not isinstance(cfg.data, dict) or "auto_map" not in cfg.data:
        return
    am = cfg.data["auto_map"]
    refs = _auto_map_refs(am) if isinstance(am, dict) else []
    fix = DropJsonKey(CONFIG_NAME, "auto_map")
    local, remote = [], []
    for r in refs:
        if "--" in r:
            remote.append(r.split("--", 1)[0])  # code from another Hub repo, fetched at load time
        elif "." in r:
            local.append(r.rsplit(".", 1)[0] + ".py")
    missing = sorted({f for f in local if f not in ckpt.names})
    if missing:
        # what loaders do with it (OSError only with trust_remote_code): CFG002's page
        yield Hit(f"auto_map names code file(s) missing from the directory: {', '.join(missing)}; loading "
                  "with trust_remote_code=True fails with OSError",
                  file=CONFIG_NAME, severity="error", fixable="safe", fix=fix)
        return
    where = []
    if local:
        where.append("runs " + ", ".join(sorted(set(local))) + " from the checkpoint")
    if remote:
        where.append("downloads and runs code from " + ", ".join(sorted(set(remote))))
    yield Hit("auto_map present: loading needs trust_remote_code=True and "
              + ("; ".join(where) or "custom code") + "; dropping it uses the built-in class for model_type",
              file=CONFIG_NAME, severity="warning", fixable="unsafe", fix=fix)


@check("CFG003")
def dtype_mismatch(ctx: Context) -> Iterator[Hit]:
    ckpt = ctx.ckpt
    cfg = ckpt.config
    if cfg is None or not isinstance(cfg.data, dict):
        return
    key = "dtype" if isinstance(cfg.data.get("dtype"), str) else "torch_dtype"
    declared = cfg.data.get(key)
    want = CONFIG_DTYPES.get(declared) if isinstance(declared, str) else None
    if want is None:
        return  # absent, "auto", or not a weight dtype
    if _declared_wins(ckpt, want):
        return
    counts = _elements(ckpt, WEIGHT_DTYPES, SCALE_SUFFIXES)
    total = sum(counts.values())
    if not total:
        return
    have = max(counts, key=counts.get)
    if have != want:
        yield Hit(f"config.json {key} is {declared!r} ({want}) but the weights are mostly {have} "
                  f"({counts[have]} of {total} floating elements): transformers 5 and vLLM 0.32 with dtype "
                  f"auto cast them to {declared} on load", file=CONFIG_NAME)


def _elements(ckpt, dtypes, skip_suffixes=()) -> dict[str, int]:
    """Elements per dtype of `dtypes` (from byte ranges: no shape walk), leaving out the names that end
    in one of skip_suffixes."""
    counts = dict.fromkeys(dtypes, 0)
    for h in ckpt.headers().values():
        for dtype, nbytes in h.dtype_bytes(dtypes, skip_suffixes).items():
            counts[dtype] += nbytes // WEIGHT_DTYPES[dtype]
    return counts


def _declared_wins(ckpt, want: str) -> bool:
    """Whether the weights are mostly `want` (no finding), shown without testing the names of the other
    dtypes against the scale suffixes (on an FP8 export, ~45k F32 scales): `want`'s own count against
    the others' counts with their scales in, which can only be larger. False when that does not
    show it; dtype_mismatch then counts exactly."""
    mine = _elements(ckpt, (want,), SCALE_SUFFIXES)[want]
    upper = _elements(ckpt, WEIGHT_DTYPES)
    order = list(WEIGHT_DTYPES)  # max() keeps the first of equal counts, in this order
    return mine > 0 and all(mine > n or (mine == n and order.index(want) < order.index(d))
                            for d, n in upper.items() if d != want)

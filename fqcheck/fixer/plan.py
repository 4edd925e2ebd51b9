"""The planner: findings -> one Plan of per-file edits, or a refusal naming what cannot be fixed."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..checkpoint import INDEX_NAME, Checkpoint
from ..checkpoint import safetensors as st
from . import edits as E
from .errors import FixRefused
from .index import build_index, dumps
from .shard import planned_size, raw_metadata


@dataclass
class ShardPlan:
    file: str
    drop: set[str] = field(default_factory=set)
    replace: dict = field(default_factory=dict)  # tensor -> producer
    metadata: dict | None = None  # the __metadata__ written (as stored unless metadata_changed)
    metadata_changed: bool = False
    new_size: int = 0


@dataclass
class Plan:
    shards: dict[str, ShardPlan] = field(default_factory=dict)
    json_files: dict[str, bytes] = field(default_factory=dict)  # file -> new content
    json_changes: dict[str, list[str]] = field(default_factory=dict)  # file -> what changes
    retire: list[str] = field(default_factory=list)
    applied: list = field(default_factory=list)   # findings whose edits are in the plan
    skipped: list = field(default_factory=list)   # fixable findings left alone (unsafe, no edit)
    notes: list = field(default_factory=list)     # what an unsafe fix did without checking

    @property
    def empty(self) -> bool:
        return not (self.shards or self.json_files or self.retire)

    def files_written(self) -> list[str]:
        return sorted([*self.shards, *self.json_files])

    def describe(self) -> list[str]:
        lines = []
        for name in sorted(self.shards):
            s = self.shards[name]
            what = []
            if s.drop:
                what.append(f"drop {len(s.drop)} tensor(s): {_names(s.drop)}")
            if s.replace:
                what.append(f"replace {len(s.replace)} tensor(s): {_names(s.replace)}")
            if s.metadata_changed:
                what.append(f"set __metadata__ = {json.dumps(s.metadata)}")
            lines.append(f"{name}: rewrite ({s.new_size:,} bytes): " + "; ".join(what))
        for name in sorted(self.json_files):
            lines.append(f"{name}: " + "; ".join(self.json_changes.get(name, ["rewrite"])))
        for name in sorted(self.retire):
            lines.append(f"{name}: retire (moved into the backup)")
        lines.extend(f"note: {n}" for n in self.notes)
        return lines


def _names(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f", ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def make_plan(ckpt: Checkpoint, findings, unsafe: bool = False, quant_format: str | None = None,
              device: str = "auto", jobs: int = 0) -> Plan:
    """quant_format / device / jobs: for deciding the weights whose weight-quantizer amax leaked (on
    the Checkpoint the lint ran on, its grid tests are not repeated)."""
    blocking = [f for f in findings if f.severity == "error" and f.fixable == "no"]
    if blocking:
        lines = "\n".join(f"  {f.code} {f.file or ''}{':' + f.tensor if f.tensor else ''}: {f.message}"
                          for f in blocking)
        raise FixRefused(f"refusing to fix: {len(blocking)} error(s) cannot be fixed safely "
                         f"(nothing was changed):\n{lines}", blocking)
    from .evidence import Undecided, refusal, weigh_weight_amax
    try:
        findings, notes = weigh_weight_amax(ckpt, findings, unsafe, quant_format, device, jobs)
    except Undecided as e:
        raise FixRefused(refusal(e.args[0])) from None
    plan = Plan(notes=notes)
    drops: dict[str, set[str]] = {}
    replaces: dict[str, dict] = {}
    metas: dict[str, dict] = {}
    json_drops: dict[str, list[str]] = {}
    retire: set[str] = set()
    rebuild = False
    for f in findings:
        if f.fixable == "no":
            continue
        edits = f.fix if isinstance(f.fix, (list, tuple)) else ([f.fix] if f.fix is not None else [])
        if not edits or (f.fixable == "unsafe" and not unsafe):
            plan.skipped.append(f)
            continue
        for e in edits:
            if isinstance(e, E.DropTensor):
                drops.setdefault(e.file, set()).add(e.tensor)
            elif isinstance(e, E.ReplaceTensor):
                replaces.setdefault(e.file, {})[e.tensor] = e.producer
            elif isinstance(e, E.SetMetadata):
                metas.setdefault(e.file, {}).update(dict(e.metadata))
            elif isinstance(e, E.RebuildIndex):
                rebuild = True
            elif isinstance(e, E.DropJsonKey):
                json_drops.setdefault(e.file, []).append(e.key)
            elif isinstance(e, E.RetireFile):
                retire.add(e.file)
            else:
                raise FixRefused(f"refusing to fix: {f.code} carries an unknown edit {e!r}")
        plan.applied.append(f)

    plan.retire = sorted(retire)
    headers = ckpt.headers()
    for fname in sorted(set(drops) | set(replaces) | set(metas)):
        if fname in retire:
            continue
        h = headers.get(fname) or ckpt.header(fname)
        bad = [p for p in h.problems if p.kind != st.METADATA]
        if bad:  # offsets cannot be trusted: never rewrite such a file, whatever was selected
            raise FixRefused(f"refusing to fix: {fname} cannot be rewritten safely: {bad[0].message} "
                             "(nothing was changed)")
        drop = {t for t in drops.get(fname, ()) if t in h.tensors}
        repl = {t: p for t, p in replaces.get(fname, {}).items() if t in h.tensors and t not in drop}
        if not (drop or repl or fname in metas):
            continue
        stored = raw_metadata(h)
        meta = {**_str_entries(stored), **metas[fname]} if fname in metas else stored
        sp = ShardPlan(fname, drop, repl, meta, metadata_changed=fname in metas)
        sp.new_size = planned_size(h, drop, meta)
        plan.shards[fname] = sp

    _check_no_tensor_lost(ckpt, drops, retire, headers)
    _plan_json(ckpt, plan, drops, retire, rebuild, json_drops, headers)
    return plan


def _check_no_tensor_lost(ckpt, drops, retire, headers) -> None:
    """A tensor may leave the checkpoint only when every copy of it was dropped on purpose; one whose
    last copy would go with a retired file (e.g. a duplicate dropped from the live shard while the
    stale shard holding the other copy is retired) makes the plan unsafe."""
    for name, files in ckpt.tensor_files.items():
        kept = [f for f in files if f not in retire and name not in drops.get(f, ())]
        if kept:
            continue
        if any(f in retire for f in files) and any(name in drops.get(f, ()) and f not in retire for f in files):
            raise FixRefused(f"refusing to fix: {name} would be lost (dropped from "
                             f"{', '.join(f for f in files if name in drops.get(f, ()))} while its other copy "
                             f"goes with the retired {', '.join(f for f in files if f in retire)}); nothing was changed")


def _str_entries(meta) -> dict:
    return {k: v for k, v in meta.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(meta, dict) else {}


def _plan_json(ckpt, plan, drops, retire, rebuild, json_drops, headers) -> None:
    index = ckpt.index
    changed_shards = any(drops.values()) or any(n.endswith(".safetensors") for n in retire)
    if ckpt._only is None and (rebuild or (index is not None and changed_shards)):
        kept = {}
        for fname in ckpt.safetensors_names:
            if fname in retire:
                continue
            h = headers[fname]
            dropped = drops.get(fname, set())
            kept[fname] = [e for e in h.tensors.values() if e.name not in dropped]
        old = index.data if index is not None and index.error is None else None
        prefer = old.get("weight_map") if isinstance(old, dict) and isinstance(old.get("weight_map"), dict) else {}
        new = build_index(old, kept, prefer)
        for key in json_drops.pop(INDEX_NAME, []):
            new.pop(key, None)
        content = dumps(new)
        if index is None or _raw(ckpt, INDEX_NAME) != content:
            plan.json_files[INDEX_NAME] = content
            before = set(prefer) if old else set()
            after = set(new["weight_map"])
            what = ["create" if index is None else "rebuild"]
            if before - after:
                what.append(f"remove {len(before - after)} entr(ies): {_names(before - after)}")
            if after - before and old:
                what.append(f"add {len(after - before)} entr(ies): {_names(after - before)}")
            what.append(f"total_size = {new['metadata']['total_size']}")
            plan.json_changes[INDEX_NAME] = what
    for fname, keys in json_drops.items():
        if fname in retire:
            continue
        jf = ckpt._json(fname) if fname in ckpt.names else None
        if jf is None or jf.error or not isinstance(jf.data, dict):
            raise FixRefused(f"refusing to fix: {fname} is not a readable JSON object (nothing was changed)")
        data = dict(jf.data)
        gone = [k for k in dict.fromkeys(keys) if k in data]
        for k in gone:
            del data[k]
        if gone:
            plan.json_files[fname] = (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
            plan.json_changes[fname] = [f"drop key {k!r}" for k in gone]


def _raw(ckpt, name) -> bytes:
    try:
        return ckpt.path(name).read_bytes()
    except OSError:
        return b""

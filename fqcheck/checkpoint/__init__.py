"""The read side: what a checkpoint directory holds, parsed lazily and never trusted."""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import msgspec

from .parallel import HeaderPrefetch
from .safetensors import UNREADABLE, Problem, SafetensorsHeader, TensorEntry, read_header

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
STATE_NAME = "vllm_fq_modelopt_state.pth"
BACKUP_DIR = ".fqcheck"  # fix backups and journal live here; loaders and lint ignore it
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".ckpt")
MAX_JSON_BYTES = 64 << 20
_MSGSPEC = msgspec.json.Decoder()  # index/config files larger than this are hostile, not checkpoints


class CheckpointError(Exception):
    """The path cannot be linted at all (missing, not a directory or checkpoint file)."""


@dataclass
class JsonFile:
    name: str
    data: Any = None
    error: str | None = None  # set when the file is unreadable or not JSON


_SCANNED_LOOKUPS = 8  # tensor() calls answered by a scan before tensor_files is built
# Pickles that hold no weights: the quantizer state of a FakeQuant export, trainer leftovers.
NOT_WEIGHTS = re.compile(r"(vllm_fq_modelopt_state|quant_amax|training_args|optimizer|scheduler|rng_state.*)\.(pth|pt|bin)")


class Checkpoint:
    carry = None  # a fix's re-lint: what it may take from the fix's first lint (fqcheck.carry)

    def __init__(self, root: Path, only: str | None = None):
        self.root = root
        self._only = only
        self._lookups = 0  # calls to tensor()
        self._outside: dict[str, str] = {}

    def once(self, key: str, make):
        """make() the first time `key` is asked for on this Checkpoint, the same value after: the
        analyses several rules share (the index view, the model comparison, the deep pass, the SRV
        pass). A lint or fix run opens its own Checkpoint, so this is also the run's memo."""
        memo = self.__dict__.setdefault("_memo", {})
        if key not in memo:
            memo[key] = make()
        return memo[key]

    def memoized(self, key: str, default=None):
        """What once(key, ...) computed on this Checkpoint, without computing it (default if not yet)."""
        return self.__dict__.get("_memo", {}).get(key, default)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        p = Path(path)
        if p.is_dir():
            return cls(p)
        if p.is_file() and (p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES):
            return cls(p.parent, only=p.name)
        if not p.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        raise CheckpointError(f"{path}: not a checkpoint directory or a .safetensors/.bin/.pth file")

    def path(self, name: str) -> Path:
        return self.root / name

    @cached_property
    def names(self) -> list[str]:
        """Top-level regular files (or links to them inside the checkpoint), sorted. A link that
        resolves outside (see `outside`) is not one of them: no rule reads what it points at."""
        if self._only is not None:
            return [self._only]
        out, links = [], []
        with os.scandir(self.root) as it:
            for e in it:
                if e.name == BACKUP_DIR:
                    continue
                try:
                    if e.is_file():  # follows links: a cache snapshot's files are links into blobs/
                        (links if e.is_symlink() else out).append(e.name)
                except OSError:
                    continue
        if links:
            allowed = self.allowed_roots
            for n in links:
                real = os.path.realpath(self.path(n))
                if inside(real, allowed):
                    out.append(n)
                else:
                    self._outside[n] = real
        return sorted(out)

    @property
    def outside(self) -> dict[str, str]:
        """Top-level links (to files) that resolve outside the checkpoint -> their real target.
        IDX009 reports them; nothing opens them."""
        self.names  # noqa: B018 - fills _outside
        return self._outside

    @cached_property
    def allowed_roots(self) -> list[str]:
        return allowed_roots(self.root)

    @cached_property
    def listed(self) -> frozenset[str]:
        """`names` as a set: files the folder listing showed to be regular files inside the
        checkpoint, which need no further stat (an index names ~160 of them). Empty when one file
        is linted: that file was named, not listed."""
        return frozenset(self.names) if self._only is None else frozenset()

    def escape(self, rel: str) -> str | None:
        """Why `rel` (a path relative to the checkpoint, e.g. an index value) leads outside it,
        or None (also when it does not exist). Only lstat/readlink: the target is never opened."""
        if rel in self.listed:
            return None  # the listing already resolved it: a file here, or a link to one inside
        if rel.startswith(("/", "\\")) or rel[1:2] == ":":  # a Windows drive, as ntpath.splitdrive sees one
            return "is an absolute path"
        parts = re.split(r"[/\\]", rel)
        if ".." in parts:
            return "has a '..' component"
        p = os.path.join(self.root, rel)
        try:
            if len(parts) == 1:  # the usual case, a file of the checkpoint folder: one lstat
                if not stat.S_ISLNK(os.lstat(p).st_mode):
                    return None
            elif not os.path.lexists(p):
                return None
            real = os.path.realpath(p)
        except (OSError, ValueError):
            return None
        if not inside(real, self.allowed_roots):
            return f"is a link that resolves to {real}, outside the checkpoint directory"
        return None

    @cached_property
    def safetensors_names(self) -> list[str]:
        return [n for n in self.names if n.endswith(".safetensors")]

    @cached_property
    def pickle_names(self) -> list[str]:
        return [n for n in self.names if n.endswith(PICKLE_SUFFIXES)]

    @cached_property
    def weight_pickles(self) -> list[str]:
        """Pickle files that may hold weights (not a quantizer state or trainer leftovers)."""
        return [n for n in self.pickle_names if not NOT_WEIGHTS.fullmatch(n)]

    @cached_property
    def _headers(self) -> dict[str, SafetensorsHeader]:
        return {n: self.header(n) for n in self.safetensors_names}

    @cached_property
    def _header_cache(self) -> dict[str, SafetensorsHeader]:
        return {}

    def header(self, name: str) -> SafetensorsHeader:
        """One file's header, read on first use: IDX reads only the shards it has checked are
        inside the checkpoint (also e.g. a shard the index names in a subfolder)."""
        h = self._header_cache.get(name)
        if h is None:
            why = self.escape(name) if self._only is None and (name in self.outside or "/" in name
                                                               or "\\" in name) else None
            h = self._header_cache[name] = outside_header(self.path(name), why) if why else read_header(self.path(name))
        return h

    def headers(self) -> dict[str, SafetensorsHeader]:
        return self._headers

    def read_headers(self, jobs: int = 1) -> None:
        """Read the index, config.json and every shard header now. jobs=2 reads the headers on a
        second core too (a forked child, see .parallel: only the CLI asks for it; the API never
        forks) while this process parses the index. A link that leads outside the checkpoint is
        left for the rules to judge (IDX009) first."""
        todo = [n for n in self.safetensors_names if n not in self._header_cache and self._stays_inside(n)]
        pending = HeaderPrefetch([self.path(n) for n in todo]) if jobs > 1 and todo else None
        self.index, self.config  # noqa: B018 - cached properties, read while the child works
        headers = pending.finish() if pending is not None else map(read_header, map(self.path, todo))
        for n, h in zip(todo, headers):
            self._header_cache.setdefault(n, h)

    def _stays_inside(self, name: str) -> bool:
        return name not in self.outside

    @cached_property
    def tensor_files(self) -> dict[str, list[str]]:
        """Tensor name -> the safetensors files that hold it (normally one)."""
        where: dict[str, list[str]] = {}
        for fname, h in self._headers.items():
            for t in h.names:
                where.setdefault(t, []).append(fname)
        return where

    def tensor(self, name: str) -> tuple[str, TensorEntry] | None:
        """The first file (in name order) that holds `name`, and its entry. The first few lookups
        scan each shard's names at C speed (~1 ms on 90k names: header checks need two or three);
        after those, tensor_files is built once and answers the rest (deep checks ask per weight)."""
        self._lookups += 1
        if self._lookups > _SCANNED_LOOKUPS:
            files = self.tensor_files.get(name)
            return (files[0], self._headers[files[0]].tensors[name]) if files else None
        for fname, h in self._headers.items():
            if name in h.names:
                return fname, h.tensors[name]
        return None

    @cached_property
    def index(self) -> JsonFile | None:
        return self._json(INDEX_NAME)

    @cached_property
    def config(self) -> JsonFile | None:
        return self._json(CONFIG_NAME)

    def _json(self, name: str) -> JsonFile | None:
        """A top-level JSON file of the checkpoint, parsed once per run (None when absent)."""
        if self._only is not None or name not in self.names:
            return None
        values = self.safetensors_names if name == INDEX_NAME else None
        return self.once(f"json:{name}", lambda: load_json(self.path(name), name, values))


_CACHE_REPO = re.compile(r"(models|datasets|spaces)--.+")


def allowed_roots(root: Path) -> list[str]:
    """Real paths a file may resolve into: the checkpoint dir and, for a genuine Hugging Face cache
    snapshot (models--org--name/snapshots/<rev>/...), that cache repo's blobs/ folder: a real
    directory (not a link) in a folder named as the cache names its repos."""
    real = Path(os.path.realpath(root))
    roots = [str(real)]
    for anc in (real, *real.parents):
        if anc.parent.name == "snapshots" and _CACHE_REPO.fullmatch(anc.parent.parent.name):
            blobs = anc.parent.parent / "blobs"
            try:
                if stat.S_ISDIR(os.lstat(blobs).st_mode):
                    roots.append(str(blobs))
            except OSError:
                pass
            break
    return roots


def outside_header(path: Path, why: str) -> SafetensorsHeader:
    """The header of a file that is not read because it lies outside the checkpoint."""
    h = SafetensorsHeader(path, 0)
    h.problems.append(Problem(UNREADABLE, f"not read: it {why}"))
    return h


def inside(path: str, bases: list[str]) -> bool:
    """`path` (a real path) is one of `bases` or lies under one."""
    return any(path == b or path.startswith(b.rstrip(os.sep) + os.sep) for b in bases)


def load_json(path: Path, name: str, shards: list[str] | None = None) -> JsonFile:
    """Parse a JSON file; never raises. `shards`: for an index, the shard files at the top level,
    which its weight_map values usually are."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        return JsonFile(name, error=f"cannot read: {e.strerror or e}")
    if len(raw) > MAX_JSON_BYTES:
        return JsonFile(name, error=f"larger than {MAX_JSON_BYTES >> 20} MiB")
    if shards:
        data = _usual_index(raw, shards)
        if data is not None:
            return JsonFile(name, data=data)
    try:  # msgspec (1.5x json's speed on a 90k-entry index) accepts a subset of what json does
        return JsonFile(name, data=_MSGSPEC.decode(raw))
    except (msgspec.DecodeError, RecursionError):
        pass  # json decides, and words the error
    try:
        return JsonFile(name, data=json.loads(raw.decode("utf-8")))
    except UnicodeDecodeError as e:
        return JsonFile(name, error=f"not UTF-8 (byte {e.start})")
    except (ValueError, RecursionError) as e:
        return JsonFile(name, error=f"invalid JSON: {str(e).splitlines()[0][:200]}")


def _usual_index(raw: bytes, shards: list[str]) -> dict | None:
    """The usual index (only weight_map and metadata, every value the name of a top-level shard),
    decoded with the values typed as those names: each value is then one shared object, not one
    string per tensor (~1/4 faster on a 90k-entry index, and the checks compare them by identity).
    None for any other index: the generic decode then reads it as it is."""
    index_type = msgspec.defstruct("Index", [("weight_map", dict[str, Literal[tuple(shards)]], msgspec.UNSET),
                                             ("metadata", Any, msgspec.UNSET)], forbid_unknown_fields=True)
    try:
        obj = msgspec.json.decode(raw, type=index_type)
    except (msgspec.DecodeError, RecursionError):
        return None
    return {k: v for k in ("metadata", "weight_map") if (v := getattr(obj, k)) is not msgspec.UNSET}


__all__ = ["Checkpoint", "CheckpointError", "JsonFile", "SafetensorsHeader", "TensorEntry",
           "INDEX_NAME", "CONFIG_NAME", "STATE_NAME", "BACKUP_DIR", "allowed_roots", "inside", "load_json"]

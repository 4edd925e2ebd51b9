"""Pickle files (.bin/.pth/.pt/.pkl/.ckpt) read opcode by opcode with pickletools.genops.

NOTHING here unpickles or executes anything, and torch is never imported: the scan records every
global a pickle would import, the persistent-id storage records torch writes, and which state-dict
keys hold meta tensors (no data), and decides, like torch.load(weights_only=True) would, whether the
file is loadable. Reads are bounded (member size, opcode count) and a malformed pickle is a
recorded problem, never an exception.

Formats: torch's zip archive (`<name>/data.pkl` plus storages; other *.pkl members are scanned for
globals too), torch's legacy format (several pickles in a row: magic number, protocol version,
sys_info, the object, the storage keys, then raw storage bytes) and plain pickles.
"""
from __future__ import annotations

import io
import mmap
import pickletools
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

MAX_OPS = 5_000_000          # opcodes per file; a state dict of 100k tensors needs ~3M
MAX_PICKLE_BYTES = 64 << 20   # pickle bytes read per file; a 100k-tensor data.pkl is ~15 MB
MAX_MEMBERS = 64             # *.pkl members scanned in one zip
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PICKLES = 5           # magic, protocol, sys_info, object, storage keys

# --- torch.load(weights_only=True)'s decision, as a static table --------------------------------
# Source: torch/_weights_only_unpickler.py of torch 2.x (checked against 2.13):
# _get_allowed_globals() builds the default allowlist below. The test tests/test_pkl.py compares
# this table's verdict with the real torch.load(weights_only=True) on legit and malicious files.
_STORAGES = ["BFloat16", "Bool", "Byte", "Char", "ComplexDouble", "ComplexFloat", "Double",
             "Float", "Half", "Int", "Long", "Short"]
_TENSORS = ["BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short"]
_SPARSE = ["BFloat16", "Byte", "Char", "Double", "Float", "Half", "Int", "Long", "Short"]
ALLOWED_GLOBALS = frozenset(
    # the literal entries at the top of _get_allowed_globals()
    ["collections.OrderedDict", "collections.Counter", "torch.nn.parameter.Parameter",
     "torch.serialization._get_layout", "torch.Size", "torch.Tensor", "torch.device",
     "_codecs.encode", "builtins.bytearray", "builtins.set", "builtins.complex"]
    # dtypes: storage._dtype_to_storage_type_map(), storage._new_dtypes(), torch.uint1..7, int1..7
    + [f"torch.{d}" for d in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
        "bool", "complex128", "complex64", "complex32", "qint8", "quint8", "qint32", "quint4x2",
        "quint2x4", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16", "float8_e5m2",
        "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2", "uint16", "uint32", "uint64")]
    + [f"torch.uint{i}" for i in range(1, 8)] + [f"torch.int{i}" for i in range(1, 8)]
    # torch._tensor_classes (dense, sparse, cuda) and torch._storage_classes (legacy typed storages)
    + [f"torch.{t}Tensor" for t in _TENSORS] + [f"torch.cuda.{t}Tensor" for t in _TENSORS]
    + [f"torch.sparse.{t}Tensor" for t in _SPARSE] + [f"torch.cuda.sparse.{t}Tensor" for t in _SPARSE]
    + [f"torch.{s}Storage" for s in _STORAGES + ["QInt32", "QInt8", "QUInt2x4", "QUInt4x2", "QUInt8"]]
    + [f"torch.cuda.{s}Storage" for s in _STORAGES]
    + ["torch.storage.TypedStorage", "torch.storage.UntypedStorage"]
    # quantization schemes
    + [f"torch.{q}" for q in ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
                              "per_channel_symmetric", "per_channel_affine_float_qparams")]
    # _tensor_rebuild_functions() and the subclass hook
    + [f"torch._utils.{f}" for f in (
        "_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_tensor",
        "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
        "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor")]
    + ["torch._tensor._rebuild_from_type_v2"]
)
# Never allowed, even when a user registers them with torch.serialization.add_safe_globals.
BLOCKED_MODULES = ("sys", "os", "posix", "nt")
# torch._utils.IMPORT_MAPPING / NAME_MAPPING: Python 2 names GLOBAL may use (protocol 2).
_IMPORT_MAPPING = {"__builtin__": "builtins", "copy_reg": "copyreg", "Queue": "queue",
                   "repr": "reprlib", "_abcoll": "collections.abc", "UserDict": "collections",
                   "UserList": "collections", "UserString": "collections", "whichdb": "dbm",
                   "StringIO": "io", "cStringIO": "io"}
_NAME_MAPPING = {("__builtin__", "xrange"): "builtins.range", ("__builtin__", "reduce"): "functools.reduce",
                 ("__builtin__", "intern"): "sys.intern", ("__builtin__", "unichr"): "builtins.chr",
                 ("__builtin__", "unicode"): "builtins.str", ("__builtin__", "long"): "builtins.int",
                 ("__builtin__", "basestring"): "builtins.str"}
# Opcodes the weights_only Unpickler implements (its load() loop); any other one is refused.
WEIGHTS_ONLY_OPS = frozenset(
    "GLOBAL NEWOBJ REDUCE BUILD APPEND APPENDS SETITEM SETITEMS MARK TUPLE TUPLE1 TUPLE2 TUPLE3 NONE "
    "NEWFALSE NEWTRUE EMPTY_TUPLE EMPTY_LIST EMPTY_DICT EMPTY_SET BININT BININT1 BININT2 BINFLOAT "
    "BINUNICODE SHORT_BINSTRING BINPERSID BINGET LONG_BINGET BINPUT LONG_BINPUT LONG1 PROTO STOP".split())
_META_REBUILD = "torch._utils._rebuild_meta_tensor_no_storage"


def is_allowed(name: str, extra_allowed=()) -> bool:
    """torch.load(weights_only=True)'s verdict on one global (`module.name`); `extra_allowed` are
    the names a user registered with torch.serialization.add_safe_globals."""
    if name.split(".", 1)[0] in BLOCKED_MODULES:
        return False
    return name in ALLOWED_GLOBALS or name in extra_allowed


@dataclass(frozen=True)
class StorageRef:
    storage_type: str
    key: str
    location: str
    numel: int | None


@dataclass
class PickleScan:
    file: str
    format: str = "unknown"  # zip | legacy | raw | unknown
    globals: dict = field(default_factory=dict)      # "module.name" -> times referenced
    storages: dict = field(default_factory=dict)     # key -> StorageRef (first reference)
    meta_rebuilds: int = 0                           # _rebuild_meta_tensor_no_storage calls
    meta_keys: list = field(default_factory=list)    # dict keys whose value is a meta tensor
    unsupported_ops: set = field(default_factory=set)
    problems: list = field(default_factory=list)     # malformed input, as sentences

    def unsafe_globals(self, extra_allowed=()) -> list[str]:
        return sorted(g for g in self.globals if not is_allowed(g, extra_allowed))

    @property
    def meta_storages(self) -> list[StorageRef]:
        return [s for s in self.storages.values() if s.location.startswith("meta")]

    @property
    def meta_count(self) -> int:
        return self.meta_rebuilds + len(self.meta_storages)

    def weights_only_refusal(self, extra_allowed=()) -> str | None:
        """Why torch.load(weights_only=True) would refuse this file, or None when it loads."""
        if self.problems:
            return self.problems[0]
        if self.format == "raw":
            return "a plain pickle, not a torch.save file (torch.load: 'Invalid magic number; corrupt file?')"
        bad = self.unsafe_globals(extra_allowed)
        if bad:
            return f"imports globals outside the weights_only allowlist: {_cap(bad)}"
        if self.unsupported_ops:
            return ("uses pickle opcodes the weights_only unpickler does not implement: "
                    f"{_cap(sorted(self.unsupported_ops))} (saved with pickle_protocol > 2?)")
        return None


def _cap(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def scan_file(path: str | Path, name: str | None = None) -> PickleScan:
    path = Path(path)
    scan = PickleScan(name or path.name)
    try:
        if zipfile.is_zipfile(path):
            _scan_zip(path, scan)
        else:
            _scan_raw(path, scan)
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, RuntimeError, KeyError,
            IndexError, NotImplementedError, ValueError, struct.error, zlib.error, MemoryError) as e:
        # a hostile archive (bad central directory, CRC, compression) is a finding, not a traceback
        scan.problems.append(f"unreadable: {type(e).__name__}: {str(e)[:200]}")
    return scan


def scan_cached(ckpt, name: str) -> PickleScan:
    """One scan per file per Checkpoint, shared by the PKL/TEN/QNT checks."""
    cache = ckpt.__dict__.setdefault("_pickle_scans", {})
    if name not in cache:
        cache[name] = scan_file(ckpt.path(name), name)
    return cache[name]


def _scan_zip(path: Path, scan: PickleScan) -> None:
    scan.format = "zip"
    with zipfile.ZipFile(path) as zf:
        members = [i for i in zf.infolist() if i.filename.endswith(".pkl")]
        data = [i for i in members if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
        if len(data) != 1:
            scan.problems.append(f"zip archive with {len(data)} data.pkl records: not a torch.save file "
                                 "(torch.load: 'PytorchStreamReader failed locating file data.pkl')")
        if len(members) > MAX_MEMBERS:
            scan.problems.append(f"{len(members)} pickle members, over the cap of {MAX_MEMBERS}")
            members = data
        budget = MAX_PICKLE_BYTES
        for info in members:
            if info.file_size > budget:
                scan.problems.append(f"{info.filename}: {info.file_size} bytes, over the "
                                     f"{MAX_PICKLE_BYTES >> 20} MiB cap on pickle bytes")
                continue
            budget -= info.file_size
            with zf.open(info) as f:
                raw = f.read(info.file_size)  # zipfile stops at the member's size
            _Sim(scan, io.BytesIO(raw), info.filename).run()


def _scan_raw(path: Path, scan: PickleScan) -> None:
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            scan.problems.append("empty file")
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            mm = _Bounded(m, MAX_PICKLE_BYTES)
            first = _Sim(scan, mm, "pickle 1")
            first.run()
            if scan.problems:
                return
            if first.ints == [LEGACY_MAGIC]:
                scan.format = "legacy"
                for i in range(2, LEGACY_PICKLES + 1):
                    _Sim(scan, mm, f"pickle {i}").run()
                    if scan.problems:
                        return
            else:
                scan.format = "raw"


class _Bounded:
    """File view for genops over an mmap: no read goes past `limit` bytes into the file, so a
    hostile length prefix (a 4 GB string) gets a short read (-> malformed), never an allocation."""

    def __init__(self, mm: mmap.mmap, limit: int):
        self.mm, self.end = mm, min(len(mm), limit)

    def tell(self) -> int:
        return self.mm.tell()

    def read(self, n: int = -1) -> bytes:
        avail = self.end - self.mm.tell()
        if n < 0 or n > avail:
            return b""  # a claim past the limit: genops reports the short read, nothing is allocated
        return self.mm.read(n)

    def readline(self) -> bytes:
        pos = self.mm.tell()
        i = self.mm.find(b"\n", pos, self.end)
        return self.mm.read((self.end if i < 0 else i + 1) - pos)


class _Global:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


_MARK, _UNKNOWN, _META = object(), object(), object()
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
               "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_INT_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}


class _Sim:
    """Walks one pickle, keeping a symbolic stack and memo: just enough to name STACK_GLOBAL
    targets (module and name pushed as strings, often through MEMOIZE/BINGET), decode
    persistent-id storage tuples, and see which dict key receives a meta tensor."""

    def __init__(self, scan: PickleScan, f, where: str):
        self.scan, self.f, self.where = scan, f, where
        self.stack: list = []
        self.memo: dict = {}
        self.ints: list[int] = []  # top-level int pickles (the legacy magic number)

    def run(self) -> None:
        n = 0
        try:
            for op, arg, _pos in pickletools.genops(self.f):
                n += 1
                if n > MAX_OPS:
                    self.scan.problems.append(f"{self.where}: more than {MAX_OPS} opcodes")
                    return
                if op.name not in WEIGHTS_ONLY_OPS:
                    self.scan.unsupported_ops.add(op.name)
                self.step(op, arg)
        except (ValueError, IndexError, KeyError, EOFError, OverflowError, TypeError,
                struct.error, MemoryError) as e:
            self.scan.problems.append(f"{self.where}: malformed pickle: {str(e)[:200] or type(e).__name__}")

    def _global(self, module, name) -> _Global:
        if isinstance(module, str) and isinstance(name, str):
            full = _NAME_MAPPING.get((module, name)) or f"{_IMPORT_MAPPING.get(module, module)}.{name}"
        else:
            full = "<unresolved STACK_GLOBAL>"  # built at run time: unknowable, so not allowed
        self.scan.globals[full] = self.scan.globals.get(full, 0) + 1
        return _Global(full)

    def _pop_mark(self) -> list:
        out = []
        while True:
            v = self.stack.pop()  # IndexError (no mark) -> malformed
            if v is _MARK:
                out.reverse()
                return out
            out.append(v)

    def step(self, op, arg) -> None:
        s, name = self.stack, op.name
        if name in _STRING_OPS:
            s.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in _INT_OPS:
            s.append(arg if isinstance(arg, int) else _UNKNOWN)
        elif name == "GLOBAL" or name == "INST":
            module, _, gname = str(arg).partition(" ")
            g = self._global(module, gname)
            if name == "INST":
                self._pop_mark()
                s.append(_UNKNOWN)
            else:
                s.append(g)
        elif name == "STACK_GLOBAL":
            gname, module = s.pop(), s.pop()
            s.append(self._global(module, gname))
        elif name == "MARK":
            s.append(_MARK)
        elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[len(self.memo) if name == "MEMOIZE" else arg] = s[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            s.append(self.memo[arg])  # KeyError -> malformed, as for pickle itself
        elif name == "TUPLE":
            s.append(tuple(self._pop_mark()))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(name[-1])
            items = tuple(s[-k:])
            if len(items) != k:
                raise IndexError("stack underflow")
            del s[-k:]
            s.append(items)
        elif name == "EMPTY_TUPLE":
            s.append(())
        elif name == "BINPERSID":
            s.append(self._persistent(s.pop()))
        elif name == "REDUCE":
            args, fn = s.pop(), s.pop()
            meta = (isinstance(fn, _Global) and fn.name == _META_REBUILD) or _has_meta(args)
            if isinstance(fn, _Global) and fn.name == _META_REBUILD:
                self.scan.meta_rebuilds += 1
            s.append(_META if meta else _UNKNOWN)
        elif name == "SETITEM":
            v, k = s.pop(), s.pop()
            self._item(k, v)
        elif name == "SETITEMS":
            items = self._pop_mark()
            for i in range(0, len(items) - 1, 2):
                self._item(items[i], items[i + 1])
        elif name == "DUP":
            s.append(s[-1])
        elif name == "STOP":
            v = s.pop()
            if type(v) is int:
                self.ints.append(v)
        else:
            self._generic(op)

    def _generic(self, op) -> None:
        before = op.stack_before
        if pickletools.markobject in before:
            self._pop_mark()
            n = before.index(pickletools.markobject)
        else:
            n = len(before)
        if n:
            if len(self.stack) < n:
                raise IndexError("stack underflow")
            del self.stack[-n:]
        self.stack.extend([_UNKNOWN] * len(op.stack_after))

    def _persistent(self, pid):
        # torch: ('storage', storage_type, key, location, numel[, view_metadata (legacy)])
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            stype = pid[1].name if isinstance(pid[1], _Global) else "?"
            key, loc, numel = pid[2], pid[3], pid[4]
            if isinstance(key, str) and isinstance(loc, str):
                ref = StorageRef(stype, key, loc, numel if isinstance(numel, int) else None)
                self.scan.storages.setdefault(key, ref)
                if loc.startswith("meta"):
                    return _META
        return _UNKNOWN

    def _item(self, k, v) -> None:
        if v is _META and isinstance(k, str) and len(self.scan.meta_keys) < 100_000:
            self.scan.meta_keys.append(k)


def _has_meta(v, depth: int = 0) -> bool:
    if v is _META:
        return True
    return isinstance(v, tuple) and depth < 4 and any(_has_meta(x, depth + 1) for x in v)

"""PKL001 and the pickle scanner: real torch.save files, legit and malicious, scanned without loading.

Malicious files are built with pickle/torch.save here and only ever given to
torch.load(weights_only=True) (which refuses them) or to fqcheck's opcode scanner."""
import argparse
import io
import os
import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch

from builders import fresh
from fqcheck.api import lint
from fqcheck.checkpoint.pickle_scan import ALLOWED_GLOBALS, scan_file


class RunsShell:  # what a weaponised checkpoint looks like: __reduce__ returns os.system
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class RunsEval:
    def __reduce__(self):
        return (eval, ("1+1",))


class RunsExec:
    def __reduce__(self):
        return (exec, ("pass",))


def codes(report, code=None):
    return [(f.code, f.file, f.tensor) for f in report.findings if code is None or f.code == code]


def torch_refuses(path) -> bool:
    try:
        torch.load(path, weights_only=True)
        return False
    except Exception:  # noqa: BLE001 - any refusal counts
        return True


def sd():
    torch.manual_seed(0)
    return {"w": torch.randn(3, 2), "b": torch.zeros(3, dtype=torch.bfloat16)}


LEGIT = {
    "state_dict.pth": lambda: sd(),
    "ordered.pt": lambda: OrderedDict(sd()),
    "param.bin": lambda: {"p": torch.nn.Parameter(torch.ones(2))},
    "fp8.pth": lambda: {"w": torch.zeros(4, dtype=torch.float8_e4m3fn), "s": torch.tensor(1.0)},
    "nested.pth": lambda: {"model": sd(), "step": 3, "lr": 0.1, "names": ["a", "b"], "tags": {1, 2},
                           "shape": torch.Size([2, 3]), "dev": torch.device("cpu")},
    "meta.pth": lambda: {"w": torch.empty(2, 2, device="meta")},
}
MALICIOUS = {
    "system.pth": lambda: {"w": torch.ones(1), "x": RunsShell()},
    "eval.bin": lambda: {"x": RunsEval()},
    "namespace.ckpt": lambda: {"args": argparse.Namespace(lr=1), "model": sd()},
    "frozenset.pth": lambda: {"f": frozenset({1})},  # not in torch's allowlist, whatever it looks like
}


@pytest.mark.parametrize("fname", sorted(LEGIT) + sorted(MALICIOUS))
@pytest.mark.parametrize("legacy", [False, True])
def test_allowlist_agrees_with_torch_weights_only(tmp_path, fname, legacy):
    if legacy and fname == "fp8.pth":
        pytest.skip("torch's legacy format cannot load float8 storages at all (torch bug, not a pickle matter)")
    obj = {**LEGIT, **MALICIOUS}[fname]()
    p = tmp_path / fname
    torch.save(obj, p, _use_new_zipfile_serialization=not legacy)
    pkl001 = codes(lint(p, select=["PKL001"]))
    assert bool(pkl001) == torch_refuses(p)
    assert bool(pkl001) == (fname in MALICIOUS)
    scan = scan_file(p)
    assert scan.format == ("legacy" if legacy else "zip")
    assert (scan.weights_only_refusal() is None) == (not torch_refuses(p))


def test_pkl001_os_system_message(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    torch.save({"model.weight": torch.ones(2), "evil": RunsShell()}, p)
    r = lint(tmp_path, select=["PKL001"])
    assert codes(r) == [("PKL001", "pytorch_model.bin", None)]
    m = r.findings[0].message
    assert "posix.system" in m or "os.system" in m
    assert "weights_only=True" in m and "weights_only=False runs" in m
    assert r.findings[0].severity == "error" and r.findings[0].fixable == "no"


def test_pkl001_protocol4_stack_global_resolved(tmp_path):
    # pickle protocol 4 names globals with STACK_GLOBAL from memoized strings: resolved, not guessed
    p = tmp_path / "model.pkl"
    # the second global's module string 'builtins' is a BINGET of the memoized first one
    p.write_bytes(pickle.dumps({"a": RunsEval(), "b": RunsExec(), "c": OrderedDict()}, protocol=4))
    scan = scan_file(p)
    assert scan.format == "raw"
    assert scan.globals == {"builtins.eval": 1, "builtins.exec": 1, "collections.OrderedDict": 1}
    assert codes(lint(p, select=["PKL001"])) == [("PKL001", "model.pkl", None)]
    assert "builtins.eval" in lint(p, select=["PKL001"]).findings[0].message


def test_protocol4_torch_save_has_no_unsafe_globals_but_is_refused(tmp_path):
    p = tmp_path / "sd.pth"
    torch.save(sd(), p, pickle_protocol=4)
    scan = scan_file(p)
    assert scan.unsafe_globals() == []
    assert codes(lint(p, select=["PKL001"])) == []
    assert torch_refuses(p) and "opcodes" in scan.weights_only_refusal()


def test_clean_save_pretrained_bin_has_no_pkl_findings(tmp_path):
    from builders import tiny_config
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(tiny_config())
    try:
        model.save_pretrained(tmp_path, safe_serialization=False)
    except TypeError:
        pytest.skip("this transformers cannot write pytorch_model.bin")
    bins = [n for n in os.listdir(tmp_path) if n.endswith(".bin")]
    if not bins:  # transformers 5 always writes safetensors: write the .bin as transformers 4 did
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
        bins = ["pytorch_model.bin"]
    r = lint(tmp_path, select=["PKL", "TEN001"])
    assert codes(r) == []
    assert not torch_refuses(tmp_path / bins[0])


@pytest.mark.parametrize("content", [
    os.urandom(4096),
    b"",
    b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01",  # truncated pickle
    b"\x80\x02X\xff\xff\xff\x7f",  # claims a 2 GB string
    b"\x80\x02h\x05.",  # BINGET of an empty memo
])
def test_garbage_is_a_finding_not_a_traceback(tmp_path, content):
    p = tmp_path / "vllm_fq_modelopt_state.pth"
    p.write_bytes(content)
    r = lint(p)  # a folder of just a state file holds no weights: lint the file itself
    assert ("QNT003", "vllm_fq_modelopt_state.pth", None) in codes(r)
    assert scan_file(p).weights_only_refusal()


def test_truncated_zip_is_a_finding(tmp_path):
    p = tmp_path / "vllm_fq_modelopt_state.pth"
    torch.save(sd(), p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert torch_refuses(p)
    assert ("QNT003", p.name, None) in codes(lint(p, select=["QNT003", "PKL001", "TEN001"]))


def test_zip_without_data_pkl(tmp_path):
    p = tmp_path / "model.pth"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/other.txt", "hi")
    assert torch_refuses(p)
    assert "data.pkl" in scan_file(p).weights_only_refusal()


def test_allowlist_table_is_torch_default_allowlist():
    # the static table must be exactly what the installed torch allows by default
    from torch._weights_only_unpickler import _get_allowed_globals
    assert ALLOWED_GLOBALS == frozenset(_get_allowed_globals())


def test_user_safe_globals_are_honoured_like_torch(tmp_path):
    p = tmp_path / "ns.pth"
    torch.save({"args": argparse.Namespace(lr=1)}, p)
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert not torch_refuses(p)
    assert scan_file(p).weights_only_refusal(extra_allowed={"argparse.Namespace"}) is None
    # os/posix/sys/nt stay blocked even when registered
    q = tmp_path / "sys.pth"
    torch.save({"x": RunsShell()}, q)
    assert scan_file(q).weights_only_refusal(extra_allowed={"posix.system", "os.system"})


def _real_pickle() -> bytes:
    buf = io.BytesIO()
    torch.save({"a.weight": torch.ones(2), "m": torch.empty(2, device="meta"), "n": [1, 2.5, "x"]}, buf)
    with zipfile.ZipFile(buf) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:
    REAL = _real_pickle()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255)), max_size=6),
           st.integers(1, len(REAL)))
    def test_mutated_pickles_never_raise(tmp_path, edits, cut):
        data = bytearray(REAL[:cut])
        for pos, val in edits:
            if pos < len(data):
                data[pos] = val
        p = fresh(tmp_path / "fuzz.pkl")  # one file per example, not rewritten in place: see fresh
        p.write_bytes(bytes(data))
        scan = scan_file(p)  # must not raise
        assert scan.format in ("raw", "legacy", "unknown")

    ZIP = None

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.data())
    def test_mutated_torch_zips_never_raise(tmp_path, data):
        global ZIP
        if ZIP is None:
            buf = io.BytesIO()
            torch.save({"w": torch.ones(3), "m": torch.empty(1, device="meta")}, buf)
            ZIP = buf.getvalue()
        raw = bytearray(ZIP)
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(len(raw) // 2, len(raw)))
        p = fresh(tmp_path / "fuzz.pth")  # one file per example, not rewritten in place: see fresh
        p.write_bytes(bytes(raw[:cut]))
        scan_file(p)  # must not raise
        lint(p)  # nor the checks on top of it

"""Names and text from a checkpoint reach no output raw: control, C1, bidi and line-separator
characters are escaped in every format, the fix plan, restore's output and the summary line, and
a GitHub annotation cannot be broken out of."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from builders import save_shard
from fqcheck.report.escape import printable

ROOT = Path(__file__).resolve().parents[1]
EVIL = "\x1b[2J\x07\x9b31m\u202e\u2066\u2028\u2029\r\n::error file=x::pwned\x85"
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def test_printable_escapes_each_unsafe_character():
    assert printable("a\x1bb\x9bc\u202ed\u2066e\u2028f\udcffg\th") == \
        "a\\x1bb\\x9bc\\u202ed\\u2066e\\u2028f\\udcffg\\x09h"
    assert printable("model.layers.0.weight ü 漢") == "model.layers.0.weight ü 漢"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """A checkpoint whose tensor names and file names carry escapes, bidi controls and line breaks,
    and a file whose name is not UTF-8."""
    d = tmp_path_factory.mktemp("esc") / "ckpt"
    d.mkdir()
    t = {f"model.layers.0{EVIL}.weight_quantizer._amax": torch.tensor(1.0),  # QNT001, fixable
         "model.embed_tokens.weight": torch.zeros(4, 4)}
    save_shard(d / "model.safetensors", t)
    save_shard(d / f"x{EVIL}.safetensors", {"a": torch.zeros(2)}, metadata={})  # SFT006, fixable
    fd = os.open(os.fsencode(str(d)) + b"/bad\xff\xfe.safetensors", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"\x05\x00\x00\x00\x00\x00\x00\x00{}")  # SFT001 on a non-UTF-8 name
    os.close(fd)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return d


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fqcheck", *map(str, args)], capture_output=True, cwd=ROOT, **kw)


@pytest.mark.parametrize("fmt", ["text", "github", "junit", "sarif", "json"])
def test_every_format_escapes(hostile, fmt):
    out = cli("lint", hostile, "-f", fmt)
    assert out.returncode == 1, out.stderr
    text = out.stdout.decode("utf-8")  # valid UTF-8: the non-UTF-8 name is escaped too
    assert not RAW.search(text.replace("\n", "")), repr(RAW.search(text.replace("\n", "")))
    assert "\udcff" not in text and "Traceback" not in out.stderr.decode()
    if fmt == "github":  # one command per finding: nothing starts a line of its own
        lines = text.splitlines()
        assert lines and all(re.match(r"::(error|warning|notice) file=[^:]*,title=[A-Z]+\d+ [a-z0-9-]+::", ln) for ln in lines)
        assert not any("::pwned" in ln.split("::", 2)[1] for ln in lines)
    if fmt == "json":
        assert json.loads(text)["summary"]["errors"] >= 3
    if fmt == "text":
        assert "x\\x1b[2J\\x07\\x9b31m\\u202e\\u2066\\u2028\\u2029\\x0d\\x0a::error" in text
        assert "bad\\udcff\\udcfe.safetensors" in text


def test_fix_plan_and_restore_output_escape(hostile, tmp_path):
    import shutil
    d = tmp_path / "ckpt"
    shutil.copytree(hostile, d)
    os.unlink(os.fsencode(str(d)) + b"/bad\xff\xfe.safetensors")  # unfixable: would block the fix
    for args in (("--dry-run",), ()):
        out = cli("fix", d, *args)
        text = out.stdout.decode()
        assert out.returncode in (0, 1), out.stderr
        assert "\\x1b[2J" in text and not RAW.search(text.replace("\n", "")), text
    out = cli("restore", d)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "x\\x1b[2J" in text and not RAW.search(text.replace("\n", "")) and len(text.splitlines()) == 1

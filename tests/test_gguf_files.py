"""GGUF files that lie: every inconsistency between the header and the file is a GGUFError naming the
file and the problem (never an IndexError from deep in a reader, a hang, or a huge allocation)."""
from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lmstack.checkpoint.gguf.errors import GGUFError  # noqa: E402
from lmstack.checkpoint.gguf.export import export_gguf  # noqa: E402
from lmstack.checkpoint.gguf.load import load_gguf  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    from tests.fixtures import make_tiny_hf
    from tests.tok_fixtures import build_test_tokenizer

    d = tmp_path_factory.mktemp("m")
    make_tiny_hf("llama", d, vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    build_test_tokenizer(d, "chatml", vocab_size=300)
    return export_gguf(d, d / "m.gguf", "q8_0").read_bytes()


def _rewrite(src: bytes, path, arch="llama", drop=(), kv=None, tensor=None):
    """A copy of a good file with keys dropped / replaced and one tensor replaced (name -> array, type)."""
    tmp = path.with_suffix(".src")
    tmp.write_bytes(src)
    r = gguf.GGUFReader(str(tmp))
    w = gguf.GGUFWriter(str(path), arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", *drop) or not f.types:
            continue
        if kv and f.name in kv:
            continue
        sub = f.types[-1] if len(f.types) > 1 else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub)
    for k, (v, t) in (kv or {}).items():
        w.add_key_value(k, v, t)
    for t in r.tensors:
        if tensor and t.name in tensor:
            a, qt = tensor[t.name]
            if a is not None:
                w.add_tensor(t.name, a, raw_dtype=qt)
            continue
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _patched(src: bytes, path, offset: int, fmt: str, value):
    b = bytearray(src)
    struct.pack_into(fmt, b, offset, value)
    path.write_bytes(bytes(b))
    return path


def test_lying_files_are_named_errors(good, tmp_path):
    V = gguf.GGUFValueType
    key0 = 24 + 8 + len("general.architecture") + 4  # first key's string value length field
    cases = {
        "empty": (lambda p: _write(p, b""), "too short for a GGUF header"),
        "magic": (lambda p: _write(p, b"GGML" + good[4:]), r"not a GGUF file \(starts with b'GGML'"),
        "version": (lambda p: _patched(good, p, 4, "<I", 7), "GGUF version 7 is not supported"),
        "2^62 tensors": (lambda p: _patched(good, p, 8, "<Q", 2**62), "claims .* 4611686018427387904 tensors, more than"),
        "2^62 keys": (lambda p: _patched(good, p, 16, "<Q", 2**62), "claims 4611686018427387904 keys"),
        "huge string": (lambda p: _patched(good, p, key0, "<Q", 2**60), "key 'general.architecture' .*-byte string.*truncated"),
        "truncated header": (lambda p: _write(p, good[:3000]), r"needs \d+ bytes at offset \d+, but the file has 3000 bytes \(truncated or corrupt\)"),
        "truncated data": (lambda p: _write(p, good[:-1000]), "tensor 'output.weight' .* past the end of the .*truncated"),
        "wrong shape": (lambda p: _rewrite(good, p, tensor={"blk.0.attn_q.weight": (np.zeros((64, 32), np.float32), None)}),
                        r"tensor 'blk.0.attn_q.weight' has shape \(64, 32\), but the file's hyperparameters make it \(64, 64\)"),
        "missing tensor": (lambda p: _rewrite(good, p, tensor={"blk.0.ffn_down.weight": (None, None)}),
                           r"missing tensors .*mlp.down_proj"),
        "bad hparams": (lambda p: _rewrite(good, p, kv={"llama.attention.head_count_kv": (3, V.UINT32)}),
                        "hyperparameters do not make a valid model"),
        "missing key": (lambda p: _rewrite(good, p, drop=("llama.block_count",)), "required GGUF key llama.block_count is missing"),
        "unknown arch": (lambda p: _rewrite(good, p, arch="falcon"), "GGUF architecture 'falcon' is not supported"),
    }
    for name, (make, msg) in cases.items():
        f = make(tmp_path / f"{name.replace(' ', '_').replace('^', '')}.gguf")
        with pytest.raises(GGUFError, match=msg) as e:
            load_gguf(f)
        assert str(f) in str(e.value), name


def test_unknown_tensor_type_and_dims(good, tmp_path):
    """Type ids and dimension counts GGML does not define: located in the tensor table and named."""
    r = gguf.GGUFReader(str(_write(tmp_path / "g.gguf", good)))
    t = next(t for t in r.tensors if t.name == "token_embd.weight")
    # the tensor record: name (8 + len), n_dims u32, dims u64 x n, type u32, offset u64 -- find it by name
    at = good.index(struct.pack("<Q", len(t.name)) + t.name.encode())
    n_dims_at = at + 8 + len(t.name)
    type_at = n_dims_at + 4 + 8 * 2
    f = _patched(good, tmp_path / "type.gguf", type_at, "<I", 250)
    with pytest.raises(GGUFError, match="tensor 'token_embd.weight' has type id 250, which GGML does not define"):
        load_gguf(f)
    f = _patched(good, tmp_path / "dims.gguf", n_dims_at, "<I", 9)
    with pytest.raises(GGUFError, match="tensor 'token_embd.weight' has 9 dimensions"):
        load_gguf(f)


def test_cli_reports_a_bad_file_in_one_line(good, tmp_path):
    f = tmp_path / "t.gguf"
    f.write_bytes(good[:-1000])
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "generate", "--model", str(f), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{f}: tensor 'output.weight'" in r.stderr and "truncated" in r.stderr


def test_a_model_too_big_for_memory_is_refused_before_allocating(good, tmp_path, monkeypatch):
    import lmstack.checkpoint.gguf.load as load

    f = _write(tmp_path / "m.gguf", good)
    monkeypatch.setattr(load, "available_memory", lambda: 100_000)
    with pytest.raises(GGUFError, match=r"m.gguf: dequantizing its weights to float32 needs 0\.\d MiB, but only "
                                        r"0.1 MiB of memory is available"):
        load_gguf(f)

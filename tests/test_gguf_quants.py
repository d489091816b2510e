"""GGUF tensor types against llama.cpp: export picks each tensor's type as llama-quantize does and
writes the same bytes; re-export of a file in its own type is byte-identical; every type the `gguf`
package dequantizes (plus Q8_K) loads with ggml's values; what cannot be dequantized is named."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from lmstack.checkpoint.gguf.export import export_gguf  # noqa: E402
from lmstack.checkpoint.gguf.load import gguf_to_hf, load_gguf, load_gguf_model  # noqa: E402
from lmstack.checkpoint.gguf.quants import EXPORT_TYPES, dequantizable_types, dequantize  # noqa: E402
from tests.llama_ref import llama_model  # noqa: E402

Q = gguf.GGMLQuantizationType
QUANTIZED = [t for t in EXPORT_TYPES if t.startswith("q")]
FTYPE = {"q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0",
         "q5_1": "MOSTLY_Q5_1", "q4_k": "MOSTLY_Q4_K_M", "q6_k": "MOSTLY_Q6_K"}


def _model(tmp_path_factory, name, **over):
    from tests.fixtures import make_tiny_hf
    from tests.tok_fixtures import build_test_tokenizer

    d = tmp_path_factory.mktemp(name)
    make_tiny_hf("llama", d, vocab_size=320, num_attention_heads=4, num_key_value_heads=2, **over)
    build_test_tokenizer(d, "chatml", vocab_size=300)
    return d


@pytest.fixture(scope="module")
def k256(tmp_path_factory):
    """Rows of 256 (K-quant super-blocks fit), an untied head, 8 layers (llama.cpp's Q4_K_M gives some
    layers' attn_v / ffn_down more bits)."""
    return _model(tmp_path_factory, "k256", hidden_size=256, intermediate_size=256, num_hidden_layers=8)


@pytest.fixture(scope="module")
def tied192(tmp_path_factory):
    """Rows of 192 (not a multiple of 256, like SmolLM's 576) and a tied embedding: the fallbacks."""
    return _model(tmp_path_factory, "t192", hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                  tie_word_embeddings=True)


def _llama_quantize(src: Path, dst: Path, ftype: int) -> Path:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = ftype, 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0
    return dst


def _tensors(f):
    return {t.name: t for t in gguf.GGUFReader(str(f)).tensors}


@pytest.mark.parametrize("which", ["k256", "tied192"])
def test_export_types_and_bytes_match_llama_quantize(which, k256, tied192, tmp_path):
    """For every quantized export type: each tensor's type and bytes equal what llama.cpp's
    llama_model_quantize writes from the f32 export of the same model (its tensor-type rules,
    shape fallbacks and reference quantizers, Q4_K and Q6_K included)."""
    d = k256 if which == "k256" else tied192
    f32 = export_gguf(d, tmp_path / "f32.gguf", "f32")
    for ty in QUANTIZED:
        ours = _tensors(export_gguf(d, tmp_path / f"{ty}.gguf", ty))
        ref = _tensors(_llama_quantize(f32, tmp_path / f"{ty}-ref.gguf", int(getattr(gguf.LlamaFileType, FTYPE[ty]))))
        assert sorted(ours) == sorted(ref)
        assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in ref.items()}, ty
        for n, t in ref.items():
            assert np.array_equal(np.asarray(ours[n].data).view(np.uint8), np.asarray(t.data).view(np.uint8)), (ty, n)
        if ty == "q4_0" and which == "tied192":  # the tied embedding is the output: Q6_K -> Q8_0 (192 % 256)
            assert ours["token_embd.weight"].tensor_type == Q.Q8_0
        if ty == "q4_0" and which == "k256":
            assert ours["output.weight"].tensor_type == Q.Q6_K and ours["token_embd.weight"].tensor_type == Q.Q4_0
        if ty == "q4_k" and which == "k256":  # Q4_K_M: more bits for layers 0, 3, 6, 7 of 8
            v = [ours[f"blk.{i}.attn_v.weight"].tensor_type.name for i in range(8)]
            assert v == ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]


def test_requantized_q4_1_is_byte_identical(k256, tmp_path):
    """A Q4_1 file exported again as Q4_1 is the same file; and its Q4_1 tensors, dequantized to an
    fp32 HF folder and quantized again, give the same blocks (the quantizer is idempotent there)."""
    a = export_gguf(k256, tmp_path / "a.gguf", "q4_1")
    b = export_gguf(a, tmp_path / "b.gguf", "q4_1")
    assert a.read_bytes() == b.read_bytes()
    hf = gguf_to_hf(a, tmp_path / "hf", torch.float32)
    c = _tensors(export_gguf(hf, tmp_path / "c.gguf", "q4_1"))
    q41 = [n for n, t in _tensors(a).items() if t.tensor_type == Q.Q4_1]
    assert len(q41) == 7 * 8 + 1
    for n in q41:
        assert np.array_equal(np.asarray(c[n].data), np.asarray(_tensors(a)[n].data)), n


# ------------------------------------------------------------------------------------- dequantizing
class _Traits(ctypes.Structure):  # ggml.h: struct ggml_type_traits
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def _ggml_to_float(raw: np.ndarray, qt, n: int) -> np.ndarray:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    traits = lib.ggml_get_type_traits(int(qt)).contents
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)(traits.to_float)
    out = np.empty(n, np.float32)
    raw = np.ascontiguousarray(raw)
    fn(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
    return out


def test_every_dequantizable_type_gives_ggml_values(tmp_path):
    """Random blocks of every type lmstack lists as loadable, in a GGUF file: load_gguf's values equal
    ggml's own dequantizer's (libggml from llama-cpp-python), NaN where ggml has NaN."""
    rng = np.random.default_rng(0)
    names = [n for n in dequantizable_types() if n not in ("F32", "F16", "F64")]
    assert {"Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ4_XS", "IQ1_M"} <= set(names)
    path = tmp_path / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    raws = {}
    for name in names:
        qt = getattr(Q, name)
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raws[name] = rng.integers(0, 256, size=(3, 2 * size), dtype=np.uint8)  # 3 rows of 2 blocks
        w.add_tensor(f"t.{name}", raws[name], raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for t in gguf.GGUFReader(str(path)).tensors:
        name = t.name[2:]
        block = gguf.GGML_QUANT_SIZES[getattr(Q, name)][0]
        ours = dequantize(t, str(path))
        assert ours.shape == (3, 2 * block)
        if name == "Q8_K":  # no ggml dequantizer (llama.cpp uses it for activations): block_q8_K is
            # float d, int8 qs[256], int16 bsums[16]; value d * q
            b = raws[name].reshape(6, 292)
            ref = (b[:, :4].copy().view(np.float32) * b[:, 4:260].copy().view(np.int8)).reshape(3, 512)
        else:
            ref = _ggml_to_float(raws[name], getattr(Q, name), 6 * block).reshape(3, 2 * block)
        np.testing.assert_array_equal(ours.numpy(), ref, err_msg=name)


def test_llama_cpp_k_and_iq_quantized_file_loads_and_agrees(k256, tmp_path):
    """A file llama.cpp quantized to Q3_K_M (Q3_K, Q4_K, Q5_K, Q6_K tensors), and one to IQ4_XS: lmstack
    loads them and its logits follow llama.cpp's on the same file."""
    f32 = export_gguf(k256, tmp_path / "f32.gguf", "f32")
    ids = [5, 17, 123, 42, 250, 7]
    for ft in ("MOSTLY_Q3_K_M", "MOSTLY_IQ4_XS"):
        f = _llama_quantize(f32, tmp_path / f"{ft}.gguf", int(getattr(gguf.LlamaFileType, ft)))
        kinds = {t.tensor_type.name for t in _tensors(f).values()}
        assert kinds >= ({"Q3_K", "Q5_K"} if ft == "MOSTLY_Q3_K_M" else {"IQ4_XS"}), kinds
        model, _ = load_gguf_model(f, torch.float32)
        llm = llama_model(f, n_ctx=32, n_threads=1, logits_all=True)
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            ours = model.compute_logits(model(torch.tensor([ids]), torch.arange(len(ids))[None]))[0].float().numpy()
        # llama.cpp rounds activations to 8 bits for quantized dot products: close, not equal
        assert np.abs(ours - theirs).max() < 0.03 * np.abs(theirs).max() + 1e-3, ft
        cfg, sd, _ = load_gguf(f, with_tokenizer=False)
        assert cfg.num_layers == 8 and sd["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32

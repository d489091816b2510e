"""Weight-only quantization: error bounds derived per format, packing layouts, AWQ, model swap, folder I/O."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.model.quant import (
    NF4_CODEBOOK, Int4Linear, Int8Linear, NF4Linear, QuantError, QuantLinear, dequantize_int4, dequantize_int8,
    dequantize_nf4, int4_to_awq, nf4_absmax, pack_int4, quantize_int4, quantize_int8, quantize_nf4,
    quantize_model, save_quantized, set_kernel_activation_dtype, unpack_awq, unpack_int4,
)


def _w(n=64, k=256, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    w[3] += 5.0  # an all-positive-ish row: the asymmetric grid must still cover it
    w[5, :64] = 0.0  # an all-zero group
    return w


# ------------------------------------------------------------------------------------ formats
def test_int8_error_bound():
    w = _w()
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    err = (dequantize_int8(q, s) - w).abs()
    # round-to-nearest on a grid of step s that spans [-max|w|, max|w|]: error <= s / 2 per element
    assert (err <= s[:, None] / 2 + 1e-6).all()
    assert int(q.abs().max()) == 127


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_int4_error_bound_and_packing(scale_dtype):
    G = 64
    w = _w()
    q, s, z = quantize_int4(w, G, scale_dtype=scale_dtype)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == (256 // G, 64) and z.shape == s.shape
    step = s.float().t().repeat_interleave(G, dim=1)  # (N, K)
    err = (dequantize_int4(q, s, z, G) - w).abs()
    # grid (q - z) * s with q in [0, 15] covers [min(w, 0), max(w, 0)] of each group; a scale rounded
    # to fp16 can shorten the grid by 15 * (relative rounding 2^-11) steps at the ends.
    slack = 15 * 2.0 ** -11 if scale_dtype == torch.float16 else 1e-5
    assert (err <= step * (0.5 + slack) + 1e-6).all()
    assert (dequantize_int4(q, s, z, G)[5, :64] == 0).all()  # zero is exactly representable
    # nibble packing round trip, with the layout spelled out: low nibble = even element
    p = pack_int4(q)
    assert p.shape == (64, 128) and torch.equal(unpack_int4(p), q)
    assert int(p[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)


def test_group_size_must_divide_in_features():
    lin = nn.Linear(96, 32)
    model = nn.Sequential()
    model.add_module("proj", lin)
    with pytest.raises(QuantError, match=r"proj.*group size 64.*in_features 96"):
        quantize_model(model, "int4", group_size=64)
    assert type(model.proj) is nn.Linear  # nothing swapped after the error


def _autoawq_dequant(qweight, qzeros, scales, G):
    """AutoAWQ 'gemm' dequantization written from its documented layout: 8 nibbles per int32 along
    out_features, nibble i holds column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i]; W^T = (q - z) * s."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]

    def unpack(t):
        rows, cols = t.shape
        out = torch.empty(rows, cols * 8, dtype=torch.int64)
        v = t.to(torch.int64) & 0xFFFFFFFF
        for j in range(cols):
            for i in range(8):
                out[:, 8 * j + order[i]] = (v[:, j] >> (4 * i)) & 15
        return out

    q, z = unpack(qweight), unpack(qzeros)  # (K, N), (K/G, N)
    s = scales.float()
    return ((q - z.repeat_interleave(G, 0)) * s.repeat_interleave(G, 0)).t()  # (N, K)


def test_awq_layout_unpacks_to_quantizer_values():
    G = 32
    w = _w(64, 128)
    q, s, z = quantize_int4(w, G)
    d = int4_to_awq(q, s, z)
    assert d["qweight"].dtype == torch.int32 and d["qweight"].shape == (128, 64 // 8)
    assert d["qzeros"].shape == (128 // G, 64 // 8) and d["scales"].shape == (128 // G, 64)
    assert d["scales"].dtype == torch.float16
    assert torch.equal(_autoawq_dequant(d["qweight"], d["qzeros"], d["scales"], G), dequantize_int4(q, s, z, G))
    assert torch.equal(unpack_awq(d["qweight"]).t(), q)


def test_nf4_codebook_is_normal_quantiles():
    # QLoRA / bitsandbytes construction: 8 positive and 7 negative N(0,1) quantiles between
    # offset = 0.9677083 and 0.5, plus an exact zero, normalized to [-1, 1].
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    ref = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    ref = ref / ref.abs().max()
    assert NF4_CODEBOOK.shape == (16,)
    assert torch.allclose(NF4_CODEBOOK.double(), ref, atol=1e-6)
    assert NF4_CODEBOOK[7] == 0 and NF4_CODEBOOK[0] == -1 and NF4_CODEBOOK[15] == 1


def test_nf4_error_bound():
    torch.manual_seed(0)
    w = torch.randn(48, 100) * 0.02  # 4800 elements: 75 blocks of 64, padding in the last scale block
    t = quantize_nf4(w)
    assert t["absmax_q"].dtype == torch.int8 and t["absmax_q"].numel() == 75 and t["absmax_scale"].numel() == 1
    dq = dequantize_nf4(t, w.shape)
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(1)
    absmax_dq = nf4_absmax(t)
    # double-quantized absmax: int8 of (absmax - mean) -> error <= step / 2
    assert ((absmax_dq - absmax).abs() <= t["absmax_scale"][0] / 2 + 1e-9).all()
    # |w - c * a'| <= a * |w/a - c| + |c| * |a - a'| <= a * (largest codebook gap) / 2 + |a - a'|
    gap = (NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max()
    bound = absmax * gap / 2 + (absmax_dq - absmax).abs() + 1e-7
    err = (dq.reshape(-1, 64) - blocks).abs()
    assert (err <= bound[:, None]).all()
    # and NF4 is much better than the bound on Gaussian weights: mean error well under a quarter step
    assert err.mean() < 0.1 * absmax.mean()


@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
def test_quantlinear_equals_dequantized_matmul(method):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=True)
    x = torch.randn(2, 5, 128)
    if method == "int8":
        m = Int8Linear.from_linear(lin)
        q, s = quantize_int8(lin.weight)
        w = dequantize_int8(q, s)
    elif method == "int4":
        m = Int4Linear.from_linear(lin, 32)
        assert m.kernel  # aten's packed CPU kernel is used for this shape
        w = dequantize_int4(*quantize_int4(lin.weight, 32), 32)
        assert torch.equal(m.int_weight(), quantize_int4(lin.weight, 32)[0])  # kernel layout round trip
    else:
        m = NF4Linear.from_linear(lin)
        w = dequantize_nf4(quantize_nf4(lin.weight), lin.weight.shape)
    assert torch.equal(m.dequantize(), w)
    with torch.no_grad():
        if method != "nf4":
            # default: fp32 activations go through the kernels as bf16 / int8 (fast): close, not exact
            y_fast = m(x)
            ref = F.linear(x, w, lin.bias)
            assert y_fast.dtype == x.dtype and (y_fast - ref).abs().max() < 0.02 * ref.abs().max()
            m.act_dtype = None  # fp32 activations: exact w.r.t. the dequantized weights
        y = m(x)
        if method == "nf4":  # QLoRA computes in bf16
            ref = F.linear(x.bfloat16(), w.bfloat16(), lin.bias.bfloat16()).float()
        else:
            ref = F.linear(x, w, lin.bias)
    assert y.shape == (2, 5, 64) and y.dtype == x.dtype
    assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (y - ref).abs().max()
    if method != "nf4":  # bf16 activations through the same kernels
        yb = m(x.bfloat16()).float()
        assert torch.allclose(yb, ref, atol=0.1, rtol=0.05)


def test_int8_w8a8_quantizes_each_row_on_its_own():
    """Int8Linear's default CPU mode where oneDNN has it: W8A8. Each activation row is rounded to int8
    with its own scale max|x_i| / 127 and multiplied exactly with the int8 codes, so the result equals
    (the row's int8 rounding) @ (dequantized W)^T + b, and does not depend on the other rows."""
    from lmstack.model.quant import int8_activations_supported

    if not int8_activations_supported():
        pytest.skip("oneDNN's quantized linear is not in this PyTorch build")
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    m = Int8Linear.from_linear(lin)
    m.act_dtype = torch.int8  # the default on CPUs with VNNI / AMX
    x = torch.randn(7, 256) * torch.linspace(0.01, 30, 7)[:, None]  # rows of very different scales
    x[3, 5] = 200.0  # an outlier only affects its own row
    with torch.no_grad():
        y = m(x)
        s = x.abs().amax(-1, keepdim=True) / 127
        ref = F.linear(torch.round(x / s) * s, m.dequantize(), lin.bias)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max()), (y - ref).abs().max()
        for i in range(7):
            assert torch.equal(m(x[i:i + 1]), y[i:i + 1])
        yb = m(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and torch.allclose(yb.float(), ref, rtol=0.02, atol=0.02 * ref.abs().max())
    with pytest.raises(ValueError, match="float16"):
        set_kernel_activation_dtype(m, torch.float16)


def test_nf4_autograd_through_input_with_frozen_base():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    m = NF4Linear.from_linear(lin)
    assert not any(p.requires_grad for p in m.parameters())
    x = torch.randn(4, 64, requires_grad=True)
    g = torch.randn(4, 32)
    (m(x) * g).sum().backward()
    w = m.dequantize(torch.bfloat16).float()
    assert torch.allclose(x.grad, g.bfloat16().float() @ w, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_decode_kernel_is_bit_identical_to_the_pytorch_ops(dtype):
    """csrc/nf4_decode.cpp vs the PyTorch chain, on ranges that start and end inside 32- and
    64-weight groups, at odd elements, and on whole tensors (the AVX-512 path and the scalar edges)."""
    from lmstack import cpu_kernels
    from lmstack.model.quant import nf4_decode_flat

    if cpu_kernels.load() is None:
        pytest.skip("C++ kernels unavailable")
    torch.manual_seed(0)
    t = quantize_nf4(torch.randn(300, 70) * torch.logspace(-3, 1, 70))  # 21000 weights, varied block scales
    absmax = nf4_absmax(t)
    for start, n in [(0, 21000), (0, 1), (1, 2), (31, 33), (17, 100), (64, 64), (5, 20990), (20999, 1), (1000, 0)]:
        fast = nf4_decode_flat(t["codes"], absmax, start, n, dtype)
        ref = nf4_decode_flat(t["codes"], absmax, start, n, dtype, kernel=False)
        assert fast.dtype == dtype and fast.shape == (n,)
        assert torch.equal(fast.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), (start, n)
    with pytest.raises(RuntimeError, match="outside the codes"):
        cpu_kernels.nf4_decode(t["codes"], absmax, NF4_CODEBOOK.float(), 20990, 100, dtype)


@pytest.mark.parametrize("row_len", [128, 40])  # rows aligned with the 64-weight blocks, and straddling them
def test_nf4_row_ranges_and_embedding_lookup_match_full_dequantization(row_len):
    from lmstack.model.quant import NF4Embedding, dequantize_nf4_rows

    torch.manual_seed(0)
    emb = nn.Embedding(37, row_len)
    m = NF4Embedding.from_embedding(emb, compute_dtype=torch.float32)
    full = m.dequantize(torch.float32)  # (37, row_len)
    for a, b in [(0, 37), (0, 1), (5, 6), (3, 20), (36, 37)]:
        assert torch.equal(dequantize_nf4_rows(m._tensors(), row_len, a, b), full[a:b]), (a, b)
    ids = torch.tensor([[0, 36, 5, 5], [17, 2, 0, 30]])
    assert torch.equal(m(ids), F.embedding(ids, full))
    head = m.tied_head()  # the tied LM head reads the same codes, no copy
    assert head.weight_codes.data_ptr() == m.weight_codes.data_ptr()
    assert torch.equal(head.dequantize_rows(3, 20), full[3:20])
    with pytest.raises(IndexError, match=r"out of range"):  # straddling rows: F.embedding's own check
        m(torch.tensor([37]))


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # tied and untied embeddings
def test_quantize_embeddings_roundtrip(tmp_path, family):
    from lmstack.model.loading import load_model
    from lmstack.model.quant import NF4Embedding, dequantize_embeddings, quantize_embeddings_nf4
    from tests.fixtures import make_tiny_hf

    make_tiny_hf(family, tmp_path / family)
    model = load_model(tmp_path / family, dtype=torch.float32)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (family == "qwen2")
    toks, pos = torch.tensor([[1, 5, 9, 33]]), torch.arange(4)[None]
    with torch.no_grad():
        ref = model.compute_logits(model(toks, pos))
    w_emb = model.model.embed_tokens.weight.detach().clone()
    quantize_embeddings_nf4(model, compute_dtype=torch.float32)
    emb = model.model.embed_tokens
    assert isinstance(emb, NF4Embedding) and isinstance(model.lm_head, NF4Linear)
    assert (model.lm_head.weight_codes.data_ptr() == emb.weight_codes.data_ptr()) == tied
    with pytest.raises(QuantError, match="not an nn.Embedding: already quantized"):
        quantize_embeddings_nf4(model)
    assert model.dtype == torch.float32
    err = (emb.dequantize() - w_emb).abs().max() / w_emb.abs().max()
    assert 0 < err < 0.25  # NF4: a quantization error, within the codebook's widest half-step
    with torch.no_grad():
        q = model.compute_logits(model(toks, pos))
    assert not torch.equal(q, ref) and (q - ref).abs().max() < 0.2 * ref.abs().max()
    dequantize_embeddings(model, torch.float32)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert torch.equal(model.compute_logits(model(toks, pos)), q)  # the same decoded weights


# ------------------------------------------------------------------------------------- AWQ
def test_awq_beats_rtn_on_outlier_channels():
    from lmstack.model.awq import fake_quant_int4, search_scales

    torch.manual_seed(0)
    K, N, G = 256, 64, 128
    w = torch.randn(N, K) * 0.05

    def acts(n):
        x = torch.randn(n, K)
        x[:, :4] *= 40.0  # a few outlier input channels (the LLM.int8 / AWQ observation)
        return x

    s, alpha, err, rtn = search_scales(acts(512), [w], G)
    assert 0 < alpha <= 1 and err < rtn
    x_test = acts(512)  # held-out activations from the same distribution
    ref = x_test @ w.t()
    rtn_err = (x_test @ fake_quant_int4(w, G).t() - ref).pow(2).mean()
    awq_err = (x_test @ (fake_quant_int4(w * s, G) / s).t() - ref).pow(2).mean()
    assert awq_err < 0.7 * rtn_err, (awq_err, rtn_err)


def test_calib_too_short():
    from lmstack.model.awq import calibration_batches

    with pytest.raises(QuantError, match=r"too short: 10 tokens.*64"):
        calibration_batches(list(range(10)), n_samples=4, seq_len=64)
    assert calibration_batches(list(range(200)), n_samples=8, seq_len=64).shape == (3, 64)


# --------------------------------------------------------------------------- model level / I/O
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.fixtures import make_tiny_hf

    d = tmp_path_factory.mktemp("llama")
    make_tiny_hf("llama", d)
    return d


def _logits(model, tokens):
    with torch.no_grad():
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        return model.compute_logits(model(tokens, pos)).float()


@pytest.mark.parametrize("method", ["int8", "int4", "nf4", "awq"])
def test_quantized_folder_roundtrip(tiny_llama, tmp_path, method):
    from lmstack.model.loading import load_model

    torch.manual_seed(0)
    tokens = torch.randint(3, 320, (2, 12))
    fp = load_model(tiny_llama, dtype=torch.float32)
    ref = _logits(fp, tokens)
    model = load_model(tiny_llama, dtype=torch.float32)
    if method == "awq":
        from lmstack.model.awq import awq_quantize

        awq_quantize(model, torch.randint(3, 320, (4, 32)), group_size=32)
    else:
        quantize_model(model, method, group_size=32)
    set_kernel_activation_dtype(model, None)  # exact fp32 activations: compared with fp32 references below
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"int8": "Int8Linear", "int4": "Int4Linear", "awq": "Int4Linear", "nf4": "NF4Linear"}[method] in kinds
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)  # skipped by default
    out = _logits(model, tokens)
    # quantized, yet close to the float model (random tiny weights: loose, but catches garbage)
    assert (out - ref).abs().mean() < 0.25 * ref.abs().mean()
    save_quantized(model, tmp_path)
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    if method in ("int4", "awq"):
        assert qcfg["quant_method"] == "awq" and qcfg["version"] == "gemm" and qcfg["group_size"] == 32
    loaded = load_model(tmp_path, dtype=torch.float32)  # the common loader dispatches on quantization_config
    set_kernel_activation_dtype(loaded, None)
    assert torch.allclose(_logits(loaded, tokens), out, atol=1e-5)
    # the dequantized-weight model gives the same greedy continuation as the quantized one
    deq = load_model(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for n, p in loaded.named_parameters():  # norms carry AWQ's folded scales
            deq.get_parameter(n).copy_(p)
        for n, m in loaded.named_modules():
            if hasattr(m, "dequantize") and n:
                deq.get_submodule(n).weight.copy_(m.dequantize())
    if method != "nf4":  # nf4 matmuls run in bf16
        assert torch.allclose(_logits(deq, tokens), out, atol=1e-4)


def test_corrupted_scales_rejected(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from lmstack.model.loading import load_model

    model = quantize_model(load_model(tiny_llama, dtype=torch.float32), "int4", group_size=32)
    save_quantized(model, tmp_path)
    f = tmp_path / "model.safetensors"
    good = load_file(str(f))
    key = "model.layers.1.mlp.down_proj.scales"
    for bad_value, pattern in [(float("nan"), "non-finite"), (0.0, "<= 0"), (-1.0, "<= 0")]:
        sd = dict(good)
        sd[key] = sd[key].clone()
        sd[key][0, 3] = bad_value
        save_file(sd, str(f))
        with pytest.raises(QuantError, match=f"{key}.*{pattern}"):
            load_model(tmp_path, dtype=torch.float32)
    sd = dict(good)
    sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, str(f))
    with pytest.raises(QuantError, match=f"{key}.*shape"):
        load_model(tmp_path, dtype=torch.float32)
    # int8 and nf4 scales are checked the same way
    for method, key in [("int8", "model.layers.0.self_attn.q_proj.weight_scale"),
                        ("nf4", "model.layers.0.mlp.up_proj.weight_absmax_scale")]:
        d = tmp_path / method
        save_quantized(quantize_model(load_model(tiny_llama, dtype=torch.float32), method), d)
        sd = load_file(str(d / "model.safetensors"))
        sd[key] = torch.full_like(sd[key], float("inf"))
        save_file(sd, str(d / "model.safetensors"))
        with pytest.raises(QuantError, match=key):
            load_model(d, dtype=torch.float32)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_engine_greedy_on_quantized_equals_dequantized(tiny_llama, tmp_path, method):
    """LLM(quantized folder) decodes token-for-token like the reference generate on dequantized weights."""
    from lmstack.engine.llm import LLM
    from lmstack.engine.sampling_params import SamplingParams
    from lmstack.generate import generate
    from lmstack.model.loading import load_model

    save_quantized(quantize_model(load_model(tiny_llama, dtype=torch.float32), method, group_size=32), tmp_path)
    loaded = load_model(tmp_path, dtype=torch.float32)
    deq = load_model(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for n, m in loaded.named_modules():
            if hasattr(m, "dequantize") and n:
                deq.get_submodule(n).weight.copy_(m.dequantize())
    prompts = [[5, 17, 123, 42], [250, 7, 99, 3, 11, 64, 8]]
    ref = generate(deq, prompts, 10)
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=16, block_size=4)
    set_kernel_activation_dtype(llm.model, None)  # exact fp32 activations, as the dequantized reference
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in outs] == ref


def test_quantize_cli(tiny_llama, tmp_path, capsys):
    import shutil

    from lmstack.cli import main
    from lmstack.model.loading import load_model
    from tests.tok_fixtures import build_test_tokenizer

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    build_test_tokenizer(src, "chatml", vocab_size=300)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. 12 + 30 = 42.\n" * 40)
    rc = main(["quantize", "--model", str(src), "--method", "awq", "--out", str(tmp_path / "q"), "--group-size", "32",
               "--calib", str(calib), "--calib-samples", "2", "--calib-seq-len", "64"])
    assert rc == 0 and "quantized" in capsys.readouterr().out
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    m = load_model(tmp_path / "q", dtype=torch.float32)
    assert type(m.model.layers[0].mlp.down_proj).__name__ == "Int4Linear"
    # bad input: one clear line, exit code 2
    assert main(["quantize", "--model", str(src), "--method", "int4", "--out", str(tmp_path / "x"),
                 "--group-size", "48"]) == 2
    assert "group size 48 does not divide in_features 64" in capsys.readouterr().err
    calib.write_text("too short")
    assert main(["quantize", "--model", str(src), "--method", "awq", "--out", str(tmp_path / "y"),
                 "--calib", str(calib), "--group-size", "32"]) == 2
    assert "too short" in capsys.readouterr().err


def test_engine_fuses_int8_projections_exactly(tiny_llama, tmp_path):
    """The engine runs an int8 model's q/k/v and gate/up as one W8A8 product each (quant.FusedInt8).
    Integer sums are exact and each output keeps its own channel scale, so the fused engine's greedy
    tokens equal the reference generate's on the same (unfused) int8 model; the members' buffers become
    slices of the fused ones and the model still saves (safetensors refuses shared memory) and reloads."""
    from lmstack.engine.llm import LLM
    from lmstack.engine.sampling_params import SamplingParams
    from lmstack.generate import generate
    from lmstack.model.loading import load_model
    from lmstack.model.quant import FusedInt8, int8_activations_supported

    if not int8_activations_supported():
        pytest.skip("oneDNN's quantized linear is not in this PyTorch build")
    save_quantized(quantize_model(load_model(tiny_llama, dtype=torch.float32), "int8"), tmp_path / "q")
    prompts = [[5, 17, 123, 42], [250, 7, 99, 3, 11, 64, 8], [9]]
    def w8a8(d):
        return set_kernel_activation_dtype(load_model(d, dtype=torch.float32), torch.int8)

    ref = generate(w8a8(tmp_path / "q"), prompts, 10)
    llm = LLM(str(tmp_path / "q"), dtype="float32", num_kv_blocks=16, block_size=4)
    set_kernel_activation_dtype(llm.model, torch.int8)  # the default on CPUs with VNNI / AMX
    attn = llm.model.model.layers[0].self_attn
    assert isinstance(attn._fused_qkv, FusedInt8) and attn._fused_qkv.active()
    assert attn.q_proj.weight.data_ptr() == attn._fused_qkv.fused.weight.data_ptr()
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert [list(o.outputs[0].token_ids) for o in outs] == ref
    save_quantized(llm.model, tmp_path / "again")
    again = generate(w8a8(tmp_path / "again"), prompts, 10)
    assert again == ref
    set_kernel_activation_dtype(llm.model, torch.bfloat16)  # not W8A8: the separate modules again
    assert not attn._fused_qkv.active()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_tied_model_with_quantized_head_roundtrips(tmp_path, method):
    """skip=() on a tied model (what a GGUF with a quantized output matrix is): the head keeps its own
    codes through save / load instead of being re-tied to the float embedding."""
    from lmstack.model.loading import load_model
    from tests.fixtures import make_tiny_hf

    src = tmp_path / "qwen2"
    make_tiny_hf("qwen2", src)  # tie_word_embeddings
    torch.manual_seed(0)
    tokens = torch.randint(3, 320, (2, 12))
    model = load_model(src, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_model(model, method, group_size=32, skip=())
    assert isinstance(model.lm_head, QuantLinear)
    set_kernel_activation_dtype(model, None)
    out = _logits(model, tokens)
    save_quantized(model, tmp_path / "q", skip=())
    loaded = load_model(tmp_path / "q", dtype=torch.float32)
    set_kernel_activation_dtype(loaded, None)
    assert isinstance(loaded.lm_head, QuantLinear)
    assert torch.allclose(_logits(loaded, tokens), out, atol=1e-5)

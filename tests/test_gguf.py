"""GGUF: export -> import round trips, files written directly with the `gguf` package, llama.cpp parity."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmstack.checkpoint.gguf.errors import GGUFError  # noqa: E402
from lmstack.checkpoint.gguf.export import export_gguf  # noqa: E402
from lmstack.checkpoint.gguf.hparams import fit_llama3_scaling  # noqa: E402
from lmstack.checkpoint.gguf.load import load_gguf, load_gguf_model  # noqa: E402
from lmstack.checkpoint.gguf.names import permute_qk, unpermute_qk  # noqa: E402
from lmstack.model.rope import default_inv_freq, llama3_inv_freq  # noqa: E402
from lmstack.model.loading import load_model  # noqa: E402


def _make(tmp_path_factory, family: str, **over):
    from tests.fixtures import make_tiny_hf
    from tests.tok_fixtures import build_test_tokenizer

    d = tmp_path_factory.mktemp(family)
    # head_dim 32: llama.cpp's CPU kernels are happy, and q8_0/q4_0 need rows that are multiples of 32
    hf = make_tiny_hf(family, d, vocab_size=320, num_attention_heads=2, num_key_value_heads=1, **over)
    build_test_tokenizer(d, "chatml", vocab_size=300)
    # random-init logits are nearly flat; sharpen the head so greedy decoding has clear winners
    model = load_model(d)
    return d, hf, model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _make(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return _make(tmp_path_factory, "qwen2")


def _logits(model, ids):
    t = torch.tensor([ids])
    with torch.no_grad():
        return model.compute_logits(model(t, torch.arange(len(ids))[None]))[0].float()


def _rope(x, interleaved):
    """Rotary embedding on (T, H, D): HF/NEOX rotates (i, i + D/2) pairs, GPT-J/llama.cpp-NORM rotates (2i, 2i+1)."""
    T, H, D = x.shape
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(T).float()[:, None] * inv  # (T, D/2)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(T, H, D)
    a, b = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def test_llama_qk_permutation_turns_neox_rope_into_interleaved():
    torch.manual_seed(0)
    H, D, C, T = 3, 8, 16, 5
    w = torch.randn(H * D, C)
    x = torch.randn(T, C)
    q_hf = _rope((x @ w.t()).view(T, H, D), interleaved=False)
    q_cpp = _rope((x @ permute_qk(w, H).t()).view(T, H, D), interleaved=True)
    # the same attention scores: q.k is invariant to applying one permutation to both q and k
    perm = permute_qk(torch.arange(H * D).float()[:, None], H).long().view(-1)
    assert torch.allclose(q_cpp.reshape(T, -1), q_hf.reshape(T, -1)[:, perm], atol=1e-5)
    assert torch.equal(unpermute_qk(permute_qk(w, H), H), w)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_import_roundtrip(family, llama_dir, qwen2_dir, tmp_path):
    from lmstack.tokenizer import Tokenizer

    d, _, ref_model = llama_dir if family == "llama" else qwen2_dir
    ids = [5, 17, 123, 42, 250, 7, 99, 3]
    ref = _logits(ref_model, ids)
    tol = {"f32": 0.0, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 2e-2, "q4_0": 0.3}
    for ty, atol in tol.items():
        f = export_gguf(d, tmp_path / f"m-{ty}.gguf", ty)
        model, tok = load_gguf_model(f, torch.float32)
        out = _logits(model, ids)
        err = (out - ref).abs().max().item()
        assert err <= atol * ref.abs().max().item() + 1e-6, (ty, err)
    # file metadata as llama.cpp expects
    r = gguf.GGUFReader(str(tmp_path / "m-q8_0.gguf"))
    assert r.get_field("general.architecture").contents() == family
    assert r.get_field("tokenizer.ggml.model").contents() == "gpt2"
    assert r.get_field("tokenizer.ggml.pre").contents() == "gpt-2"
    assert r.get_field(f"{family}.block_count").contents() == 2
    names = {t.name: t for t in r.tensors}
    assert names["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert names["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert ("output.weight" in names) == (family == "llama")  # qwen2 fixture ties embeddings
    assert (family == "qwen2") == ("blk.0.attn_q.bias" in names)
    # the tokenizer rebuilt from GGUF encodes and decodes exactly like the original folder
    orig = Tokenizer.from_dir(d)
    text = "Hello world! 12 + 30 = 42\n<|im_start|>user"
    assert tok.encode(text) == orig.encode(text)
    assert tok.decode(orig.encode(text), skip_special_tokens=False) == text
    assert sorted(tok.eos_token_ids) == sorted(orig.eos_token_ids)
    assert tok.chat_template == orig.chat_template


def _fill_kquant(rows, cols, qtype, rng):
    """Random but valid K-quant blocks: random codes, finite small fp16 super-block scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d = np.full((rows, cols // block), 0.01, dtype=np.float16).view(np.uint8).reshape(rows, cols // block, 2)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin at the start
        raw[..., 0:2] = d
        raw[..., 2:4] = d
    else:  # Q6_K: d at the end
        raw[..., size - 2:] = d
    return raw.reshape(rows, -1)


def test_load_file_written_by_gguf_package(tmp_path):
    """A file made here with gguf.GGUFWriter (independent of lmstack's exporter), mixing tensor types."""
    from tests.fixtures import make_tiny_hf

    # hidden 256 so embeddings / lm_head can be K-quants (super-blocks of 256)
    hf = make_tiny_hf("llama", tmp_path / "hf", vocab_size=64, hidden_size=256, intermediate_size=256,
                      num_attention_heads=4, num_key_value_heads=2)
    Q = gguf.GGMLQuantizationType
    cfg = hf.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    sd = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    path = tmp_path / "hand.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(256)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_eos_token_id(2)

    def perm(a, n):  # llama.cpp's convert script: reshape(n, 2, r/n/2, c).swapaxes(1, 2)
        return a.reshape(n, 2, a.shape[0] // n // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    kinds = {"q_proj": Q.Q8_0, "k_proj": Q.F16, "v_proj": Q.BF16, "o_proj": Q.Q4_0, "gate_proj": Q.Q8_0,
             "up_proj": Q.F32, "down_proj": Q.Q8_0}
    gnames = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    qtypes = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for n, g in [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]:
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + n + ".weight"])
            qtypes[p + n + ".weight"] = Q.F32
        for n, qt in kinds.items():
            key = p + ("self_attn." if n in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp.") + n + ".weight"
            a = perm(sd[key], H) if n == "q_proj" else perm(sd[key], Hkv) if n == "k_proj" else sd[key]
            name = f"blk.{i}.{gnames[n]}.weight"
            if qt == Q.F32:
                w.add_tensor(name, a)
            elif qt == Q.F16:
                w.add_tensor(name, a.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
            qtypes[key] = qt
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    rng = np.random.default_rng(0)
    emb = _fill_kquant(cfg.vocab_size, 256, Q.Q6_K, rng)
    out = _fill_kquant(cfg.vocab_size, 256, Q.Q4_K, rng)
    w.add_tensor("token_embd.weight", emb, raw_dtype=Q.Q6_K)
    w.add_tensor("output.weight", out, raw_dtype=Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    cfg_l, sdl, _ = load_gguf(path, with_tokenizer=False)
    assert cfg_l.model_type == "llama" and cfg_l.num_kv_heads == Hkv and not cfg_l.tie_embeddings
    assert cfg_l.hidden_size == 256 and cfg_l.num_layers == cfg.num_hidden_layers
    # K-quants: same values as gguf's reference dequantizer, in (rows, cols) order
    assert torch.equal(sdl["model.embed_tokens.weight"], torch.from_numpy(gguf.quants.dequantize(emb, Q.Q6_K)))
    assert torch.equal(sdl["lm_head.weight"], torch.from_numpy(gguf.quants.dequantize(out, Q.Q4_K)))
    for key, qt in qtypes.items():
        got, ref = sdl[key].numpy(), sd[key]
        amax = np.abs(ref).reshape(-1, 32).max(1)[:, None]
        # per-type bounds: Q8_0 d = amax/127: error <= d/2 plus |code| * (fp16 rounding of d, done after
        # the codes) <= d/2 + 127 d 2^-11. Q4_0 d = -signed max/8, codes -8..7: a value opposite the max
        # clips at 7, so error <= d (+ 8 d 2^-11). F16/BF16: relative rounding.
        bound = {Q.F32: 0 * amax, Q.Q8_0: amax / 127 * (0.5 + 127 * 2.0 ** -11), Q.Q4_0: amax / 8 * 1.01,
                 Q.F16: amax * 2.0 ** -11, Q.BF16: amax * 2.0 ** -8}[qt] + 1e-7
        assert (np.abs(got - ref).reshape(-1, 32) <= bound).all(), key  # also proves the q/k un-permutation


def test_bad_inputs(llama_dir, tmp_path):
    d, _, _ = llama_dir
    with pytest.raises(GGUFError, match="q5_k"):
        export_gguf(d, tmp_path / "x.gguf", "q5_k")
    # unsupported architecture in the file
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="falcon"):
        load_gguf(tmp_path / "bad.gguf")
    # unsupported tensor type
    f = export_gguf(d, tmp_path / "ok.gguf", "f32")
    r = gguf.GGUFReader(str(f))
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    for field in r.fields.values():
        if field.name.startswith(("llama.", "tokenizer.")) and field.types:
            sub = field.types[-1] if len(field.types) > 1 else None
            w.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name == "blk.0.ffn_up.weight":
            # Q8_1 (llama.cpp's activation type): the gguf package has no dequantizer for it
            w.add_tensor(t.name, np.zeros((128, 64 // 32 * 40), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(t.name, np.asarray(t.data).reshape(tuple(reversed([int(x) for x in t.shape]))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="tensor 'blk.0.ffn_up.weight' has type Q8_1, which lmstack cannot dequantize"):
        load_gguf(tmp_path / "iq.gguf")


# ------------------------------------------------------------------------------------ llama.cpp
def _greedy_lmstack(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(_logits(model, ids)[-1].argmax()))
    return ids


def _llama_cpp_greedy(f, model, prompt, n_new):
    """llama.cpp's greedy continuation of `prompt` from GGUF file f; at every step its logits must be
    close to lmstack's (model) on the same tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(f), n_ctx=64, n_threads=2, logits_all=False, verbose=False, seed=0)
    theirs = list(prompt)
    llm.eval(theirs)
    for _ in range(n_new):
        # with logits_all=False llama.cpp keeps only the last position's logits (not in llm.scores)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()
        # llama.cpp computes with f16 activations in places; compare its logits with ours as well
        ref = _logits(model, theirs)[-1].numpy()
        assert np.abs(logits - ref).max() < 0.02 * np.abs(ref).max() + 1e-3
        nxt = int(logits.argmax())
        theirs.append(nxt)
        llm.eval([nxt])
    return theirs


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("ty", ["f32", "f16"])
def test_llama_cpp_same_greedy_tokens(family, ty, llama_dir, qwen2_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    d, _, _ = llama_dir if family == "llama" else qwen2_dir
    f = export_gguf(d, tmp_path / f"m-{ty}.gguf", ty)
    model, _ = load_gguf_model(f, torch.float32)
    prompt = [5, 17, 123, 42, 250, 7]
    assert _llama_cpp_greedy(f, model, prompt, 12) == _greedy_lmstack(model, prompt, 12)


def test_llama3_rope_scaling_round_trips_and_matches_llama_cpp(tmp_path_factory, tmp_path):
    """Llama 3.1 rope scaling is exported as llama.cpp's rope_freqs divisors and read back as the same
    HF rope_scaling; llama.cpp then agrees with lmstack. The scaling changes these logits by far more
    than the comparison's tolerance, so a missing or wrong rope_freqs would fail it."""
    pytest.importorskip("llama_cpp")
    d, _, ref_model = _make(tmp_path_factory, "llama3", initializer_range=0.3)  # position-sensitive attention
    f = export_gguf(d, tmp_path / "m.gguf", "f32")
    model, _ = load_gguf_model(f, torch.float32)
    want = ref_model.config.rope_scaling
    got = model.config.rope_scaling
    assert got["rope_type"] == "llama3" and got["factor"] == want["factor"]
    torch.testing.assert_close(model.rotary.inv_freq, ref_model.rotary.inv_freq, rtol=1e-5, atol=0)
    prompt = [5, 17, 123, 42, 250, 7, 99, 31, 64, 12]
    torch.testing.assert_close(_logits(model, prompt), _logits(ref_model, prompt), rtol=1e-4, atol=1e-4)
    unscaled = load_model(d)  # the same weights without the scaling
    unscaled.rotary.inv_freq = default_inv_freq(unscaled.config.head_dim, unscaled.config.rope_theta)
    diff = (_logits(unscaled, prompt) - _logits(model, prompt)).abs().max()
    assert diff > 0.05 * _logits(model, prompt).abs().max() + 1e-3
    assert _llama_cpp_greedy(f, model, prompt, 12) == _greedy_lmstack(model, prompt, 12)


def test_fit_llama3_scaling_recovers_meta_parameters():
    """Llama 3.1 8B's divisors (head_dim 128, theta 5e5, factor 8, low 1, high 4, 8192 tokens) give back
    its rope_scaling; divisors no Llama 3.1 setting produces are refused."""
    meta = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    inv = default_inv_freq(128, 500000.0)
    factors = inv / llama3_inv_freq(inv, meta)
    fit = fit_llama3_scaling(factors, 128, 500000.0, "test")
    assert fit["original_max_position_embeddings"] == 8192 and fit["factor"] == 8.0
    assert abs(fit["high_freq_factor"] - 4.0) < 1e-3 and fit["low_freq_factor"] == 1.0
    bad = factors.clone()
    bad[5] = 3.3  # a divisor in the "keep" region
    with pytest.raises(GGUFError, match="rope_freqs"):
        fit_llama3_scaling(bad, 128, 500000.0, "test")
    with pytest.raises(GGUFError, match="has 32 values, expected head_dim / 2 = 64"):
        fit_llama3_scaling(factors[:32], 128, 500000.0, "test")


def test_llm_and_cli_run_a_gguf_file(llama_dir, tmp_path):
    """`LLM("x.gguf")` and `lmstack generate --model x.gguf` need nothing but the file."""
    import subprocess
    import sys

    from lmstack import LLM, SamplingParams

    d, _, _ = llama_dir
    f = export_gguf(d, tmp_path / "m.gguf", "f32")
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ref = LLM(str(d), dtype="float32").generate(["Hello world"], params)[0].outputs[0]
    got = LLM(str(f), dtype="float32").generate(["Hello world"], params)[0].outputs[0]
    assert got.token_ids == ref.token_ids and got.text == ref.text
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "generate", "--model", str(f), "--prompt", "Hello world",
                        "--max-tokens", "4", "--dtype", "float32"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_cli_export_gguf(llama_dir, tmp_path):
    import subprocess
    import sys

    d, _, _ = llama_dir
    out = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "export", "gguf", "--model", str(d), "--out", str(out),
                        "--type", "q8_0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert "blk.1.ffn_down.weight" in names
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "export", "--model", str(d), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--adapter" in r.stderr and "Traceback" not in r.stderr


def test_export_refuses_rope_scaling_gguf_cannot_carry(tmp_path):
    """YaRN has no GGUF export here: one clear error naming the scaling, before anything is written."""
    from tests.fixtures import make_tiny_hf

    make_tiny_hf("llama", tmp_path / "m", rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                                        "original_max_position_embeddings": 128})
    with pytest.raises(GGUFError, match="rope_scaling .*yarn.* is not supported by the GGUF exporter"):
        export_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


# ------------------------------------------------------------------------- SentencePiece vocabularies
def _spm_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A Llama-2-style SentencePiece BPE vocabulary: <unk> <s> </s>, the 256 <0xNN> byte tokens, then
    pieces with U+2581 for spaces (from a BPE trained here on the test corpus) with scores, then
    unused padding up to n_vocab."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tests.tok_fixtures import CORPUS

    T = gguf.TokenType
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    budget = n_vocab - 3 - 256 - 8
    tok.train_from_iterator(CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=budget, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    merged = ["".join(m.split(" ")) for m in merges]
    chars = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if t not in set(merged)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [int(T.UNKNOWN), int(T.CONTROL), int(T.CONTROL)] + [int(T.BYTE)] * 256
    pieces = list(dict.fromkeys(chars + merged))
    # scores in a shuffled order, not the trainer's merge order: which pair is joined first then
    # changes the segmentation, so a wrong ranking cannot go unnoticed
    order = list(merged)
    np.random.default_rng(0).shuffle(order)
    rank = {t: r for r, t in enumerate(order)}
    for p in pieces:
        tokens.append(p)
        scores.append(-float(rank.get(p, len(merged) + pieces.index(p))))
        types.append(int(T.NORMAL))
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1e9)
        types.append(int(T.UNUSED))
    return tokens, scores, types


def _with_spm_tokenizer(src, dst, n_vocab: int, scores: bool = True, gemma: bool = False):
    """Copy GGUF file src to dst with its tokenizer replaced by a SentencePiece ('llama') one
    (scores=False: without tokenizer.ggml.scores, a broken file). gemma=True: as Gemma's GGUF files
    have it, no space prefix, and user-defined tokens (runs of U+2581, a turn marker) at score 0,
    above every normal piece."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), "llama")
    for field in r.fields.values():
        if field.name.startswith("llama.") and field.types:
            sub = field.types[-1] if len(field.types) > 1 else None
            w.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
    tokens, token_scores, types = _spm_vocab(n_vocab)
    if gemma:
        for i, t in enumerate(("\u2581\u2581", "\u2581\u2581\u2581\u2581", "<start_of_turn>")):
            j = n_vocab - 1 - i  # unused padding rows become the user-defined tokens
            tokens[j], token_scores[j], types[j] = t, 0.0, int(gguf.TokenType.USER_DEFINED)
        w.add_add_space_prefix(False)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    if scores:
        w.add_token_scores(token_scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data).reshape(tuple(reversed([int(x) for x in t.shape]))),
                     raw_dtype=gguf.GGMLQuantizationType(t.tensor_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


SPM_TEXTS = ["Hello world", "the quick brown fox jumps over the lazy dog", "  two leading spaces", "tab\tand\nnewline",
             "数字 123 + 456 = 579", "émoji 🙂 and ümlauts", "trailing space ", "a", "x  y   z", "The THE tHe thE"]


@pytest.mark.parametrize("gemma", [False, True])
def test_sentencepiece_gguf_tokenizer_matches_llama_cpp(gemma, tmp_path_factory, tmp_path):
    """A GGUF file with llama.cpp's 'llama' (SentencePiece BPE) tokenizer - the vocabulary of Llama 2,
    Mistral, TinyLlama GGUFs - tokenizes and detokenizes like llama.cpp itself, byte fallback included,
    and `LLM("x.gguf")` runs text prompts through it."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lmstack import LLM, SamplingParams
    from lmstack.tokenizer import Tokenizer
    from tests.fixtures import make_tiny_hf
    from tests.tok_fixtures import CORPUS, build_test_tokenizer

    d = tmp_path_factory.mktemp("spm")
    make_tiny_hf("llama", d, vocab_size=512, num_attention_heads=2, num_key_value_heads=1)
    build_test_tokenizer(d, "chatml", vocab_size=300)
    f = _with_spm_tokenizer(export_gguf(d, tmp_path / "bpe.gguf", "f32"), tmp_path / "spm.gguf", 512, gemma=gemma)
    _, _, tok_dir = load_gguf(f)
    ours = Tokenizer.from_dir(tok_dir)
    ref = llama_cpp.Llama(model_path=str(f), vocab_only=True, verbose=False)
    extra = ["<start_of_turn>user\nhi there", "x  y    z  ", "   three"] if gemma else []
    for text in SPM_TEXTS + CORPUS + extra:
        ids = ref.tokenize(text.encode(), add_bos=True, special=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids, skip_special_tokens=True) == text
        # llama.cpp prints user-defined tokens raw ("\u2581\u2581"), lmstack (as transformers) as spaces
        assert gemma or text == ref.detokenize(ids).decode()
    assert any(ours.backend.id_to_token(i).startswith("<0x") for i in ours.encode("数字 🙂"))  # byte fallback used
    assert any(len(ours.backend.id_to_token(i)) > 3 for i in ours.encode(" the quick brown fox"))  # merges used
    if gemma:  # the user-defined tokens are used: the turn marker whole, space runs as one token
        assert ours.backend.token_to_id("<start_of_turn>") in ours.encode(extra[0])
        assert ours.backend.token_to_id("\u2581\u2581\u2581\u2581") in ours.encode(extra[1])
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    out = LLM(str(f), dtype="float32").generate(["Hello world"], params)[0]
    bad = _with_spm_tokenizer(tmp_path / "bpe.gguf", tmp_path / "noscores.gguf", 512, scores=False)
    with pytest.raises(GGUFError, match="needs tokenizer.ggml.scores for each of its 512 tokens; found None"):
        load_gguf(bad)
    assert out.prompt_token_ids == ref.tokenize(b"Hello world", add_bos=True) and len(out.outputs[0].token_ids) == 4


def _hf_spm_tokenizer(out_dir, n_vocab: int) -> None:
    """A Llama-2-style HF tokenizer folder (tokenizer.json: BPE with byte fallback, merges made from a
    SentencePiece vocabulary the way transformers' converter makes them, Metaspace pre-tokenizer)."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, scores, types = _spm_vocab(n_vocab)
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = sorted((i for i, ty in enumerate(types) if ty == int(gguf.TokenType.NORMAL)), key=lambda i: -scores[i])
    merges = [(t[:k], t[k:]) for t in (tokens[i] for i in normal) for k in range(1, len(t))
              if t[:k] in vocab and t[k:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_sentencepiece_style_hf_tokenizer_exports_for_llama_cpp(tmp_path_factory, tmp_path):
    """Export of a Llama-2-style checkpoint: its tokenizer.json (BPE with byte fallback and U+2581
    spaces) is written as llama.cpp's 'llama' vocabulary with scores from the merge ranks; llama.cpp
    then tokenizes like transformers does, and lmstack reads the file back to the same tokenizer."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import transformers

    from lmstack.tokenizer import Tokenizer
    from tests.fixtures import make_tiny_hf
    from tests.tok_fixtures import CORPUS

    d = tmp_path_factory.mktemp("spm_hf")
    make_tiny_hf("llama", d, vocab_size=512, num_attention_heads=2, num_key_value_heads=1)
    _hf_spm_tokenizer(d, 512)
    f = export_gguf(d, tmp_path / "m.gguf", "f32")
    r = gguf.GGUFReader(str(f))
    assert r.get_field("tokenizer.ggml.model").contents() == "llama"
    hf = transformers.AutoTokenizer.from_pretrained(d)
    ref = llama_cpp.Llama(model_path=str(f), vocab_only=True, verbose=False)
    _, _, tok_dir = load_gguf(f)
    back = Tokenizer.from_dir(tok_dir)
    for text in SPM_TEXTS + CORPUS:
        ids = ref.tokenize(text.encode(), add_bos=True, special=False)
        assert back.encode(text) == ids, text
        assert back.decode(ids, skip_special_tokens=True) == text
        # transformers' Metaspace adds no prefix space to a text that starts with one, llama.cpp always
        # does: a known difference between the two on leading spaces, nothing to do with the vocabulary
        if not text.startswith(" "):
            assert hf(text)["input_ids"] == ids, text

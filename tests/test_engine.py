"""The engine against references: the dense reference generate (token for token, greedy, fp32) under
prefix caching, chunked prefill, preemption and n > 1; transformers' greedy generate; a sliding
window model; plus stop strings across token boundaries, streaming, logprobs, seeds, abort and
bad input."""
from __future__ import annotations

import pytest
import torch

from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams
from lmstack.generate import generate
from lmstack.model.loading import load_model
from tests.fixtures import make_tiny_hf
from tests.tok_fixtures import build_test_tokenizer

MAX_NEW = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: threads only add synchronisation cost (and the suite may share 2 cores)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2")
    # larger init than the default so greedy choices are not near-ties
    make_tiny_hf("qwen2", d, vocab_size=300, initializer_range=0.1)
    build_test_tokenizer(d, "chatml", vocab_size=300)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    lens = [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 47, 64, 80, 100, 130, 4]  # very different lengths
    shared = torch.randint(3, 300, (40,), generator=g).tolist()
    ps = [torch.randint(3, 300, (n,), generator=g).tolist() for n in lens]
    # a few prompts sharing a long prefix, so prefix caching has something to find
    ps += [shared + torch.randint(3, 300, (n,), generator=g).tolist() for n in (1, 6, 20)]
    return ps


@pytest.fixture(scope="module")
def reference(model, prompts):
    return generate(model, prompts, MAX_NEW)


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def check_equal(llm: LLM, prompts, reference, params=GREEDY):
    outs = llm.generate(prompts, params)
    for o, p, ref in zip(outs, prompts, reference):
        assert o.prompt_token_ids == p
        for c in o.outputs:
            assert c.token_ids == ref, f"prompt of {len(p)} tokens (sample {c.index})"
            assert c.finish_reason == "length"
    stats = llm.get_stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    llm.block_manager.check_invariants([])
    return outs, stats


@pytest.mark.parametrize("engine_args", [
    dict(),
    dict(enable_prefix_caching=False),
    dict(enable_chunked_prefill=True, max_num_batched_tokens=24),
    dict(enable_chunked_prefill=False, max_num_batched_tokens=200),
    dict(max_num_seqs=3, block_size=4, num_kv_blocks=512),
    dict(pytorch_attention=True),
], ids=["default", "no-prefix-cache", "chunked-24", "no-chunking", "few-seqs-bs4", "pytorch-decode-attention"])
def test_matches_reference_generate(model, prompts, reference, engine_args):
    engine_args = dict(engine_args)
    pytorch_attention = engine_args.pop("pytorch_attention", False)
    llm = LLM.from_model(model, **engine_args)
    if pytorch_attention:  # the gather + SDPA path used where the C++ kernel cannot be built
        llm.runner.use_kernel = False
    check_equal(llm, prompts, reference)
    # the second pass finds the prompts in the prefix cache (when on) and must not change a token
    _, stats = check_equal(llm, prompts, reference)
    if llm.block_manager.enable_prefix_caching:
        assert stats.prefix_cache_hit_rate > 0.3
    else:
        assert stats.prefix_cache_hit_rate == 0


def test_preemption_keeps_outputs(model, prompts, reference):
    # 40 blocks of 4 slots: the longest request alone needs 36 blocks, so the batch must preempt
    llm = LLM.from_model(model, block_size=4, num_kv_blocks=40, max_num_batched_tokens=64)
    _, stats = check_equal(llm, prompts, reference)
    assert stats.num_preemptions > 0


def test_n_samples_share_prompt_blocks(model, prompts, reference):
    llm = LLM.from_model(model, block_size=4)
    params = SamplingParams(n=3, temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs, _ = check_equal(llm, prompts, reference, params)
    assert all(len(o.outputs) == 3 and [c.index for c in o.outputs] == [0, 1, 2] for o in outs)
    # n > 1 with a tiny pool: copy-on-write and preemption together
    llm = LLM.from_model(model, block_size=4, num_kv_blocks=48, max_num_batched_tokens=32)
    _, stats = check_equal(llm, prompts[:10] + prompts[-3:], reference[:10] + reference[-3:], params)


def test_matches_transformers_greedy(tmp_path):
    import transformers as tf

    hf = make_tiny_hf("llama", tmp_path, vocab_size=256, initializer_range=0.1)
    llm = LLM(tmp_path, dtype="float32", block_size=8)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (1, 9, 23, 40, 70)]
    # min_tokens bans EOS (id 2) like transformers' min_new_tokens does
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, min_tokens=10))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), generation_config=tf.GenerationConfig(
                max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=2))
        assert o.outputs[0].token_ids == ref[0, len(p):].tolist()


def test_sliding_window_model(tmp_path):
    make_tiny_hf("mistral", tmp_path, vocab_size=256, initializer_range=0.1)  # window 8
    model = load_model(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 12, 30)]
    ref = generate(model, prompts, 10)
    llm = LLM.from_model(model, block_size=4, max_num_batched_tokens=16)  # chunks cross the window
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_bad_input_is_rejected_before_any_work(model, prompts, reference):
    llm = LLM.from_model(model, max_model_len=64, num_kv_blocks=3, block_size=16)
    with pytest.raises(ValueError, match=r"60 tokens.*max_tokens is 10.*max_model_len 64"):
        llm.add_request("a", list(range(3, 63)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match=r"3 blocks"):  # 40 + 10 tokens need 4 blocks, the pool has 3
        llm.add_request("b", list(range(3, 43)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="vocabulary"):
        llm.add_request("c", [5, 300], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        llm.add_request("d", [], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):  # from_model without a tokenizer: no text, no stop strings
        llm.add_request("e", [5, 6], SamplingParams(stop="x"))
    assert not llm.has_unfinished_requests()
    # a rejected request does not disturb good ones
    llm = LLM.from_model(model)
    llm.add_request("good", prompts[3], GREEDY)
    with pytest.raises(ValueError):
        llm.add_request("bad", prompts[3], SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request("good", prompts[3], GREEDY)
    outs = []
    while llm.has_unfinished_requests():
        outs += llm.step()
    assert outs[-1].request_id == "good" and outs[-1].outputs[0].token_ids == reference[3]


def test_abort_frees_blocks_and_others_finish(model, prompts, reference):
    llm = LLM.from_model(model, block_size=4, max_num_batched_tokens=32)
    for i in range(6):
        llm.add_request(str(i), prompts[10 + i], GREEDY)
    llm.step()
    llm.step()
    llm.abort("2")  # mid-run
    llm.abort("5")  # possibly still waiting
    final = {}
    while llm.has_unfinished_requests():
        for o in llm.step():
            if o.finished:
                final[o.request_id] = o
    assert final["2"].outputs[0].finish_reason == "abort" and final["5"].outputs[0].finish_reason == "abort"
    for i in (0, 1, 3, 4):
        assert final[str(i)].outputs[0].token_ids == reference[10 + i]
    assert llm.get_stats().kv_blocks_used == 0
    llm.block_manager.check_invariants([])


def test_stop_strings_across_token_boundaries_and_streaming(model_dir):
    llm = LLM(model_dir, dtype="float32")
    prompt = "Hello world! How are"
    base = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, skip_special_tokens=True)
    full = llm.generate(prompt, base)[0].outputs[0]
    assert full.text == llm.tokenizer.decode(full.token_ids)
    # find a boundary between two tokens that both produce text; the stop string straddles it
    pieces, text = [], ""
    for i in range(1, len(full.token_ids) + 1):
        t = llm.tokenizer.decode(full.token_ids[:i])
        pieces.append(t[len(text):])
        text = t
    k = next(i for i in range(5, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    before = "".join(pieces[:k + 1])
    stop = before[-1] + pieces[k + 1][0]
    cut = full.text.find(stop)
    out = llm.generate(prompt, base.clone(stop=["@@never@@", stop]))[0].outputs[0]
    assert out.text == full.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(prompt, base.clone(stop=stop, include_stop_str_in_output=True))[0].outputs[0]
    assert out.text == full.text[:cut + len(stop)]
    # streaming: deltas add up to the final text and never leak the stop string
    deltas = list(llm.stream(prompt, base.clone(stop=stop)))
    assert "".join(deltas) == full.text[:cut]
    assert "".join(llm.stream(prompt, base)) == full.text
    # stop_token_ids: the stop token ends the output, its text is not included
    tok = full.token_ids[6]
    out = llm.generate(prompt, base.clone(stop_token_ids=[tok]))[0].outputs[0]
    j = full.token_ids.index(tok)
    assert out.token_ids == full.token_ids[:j + 1] and out.stop_reason == tok
    assert out.text == llm.tokenizer.decode(full.token_ids[:j])


def test_chat_applies_template(model_dir):
    llm = LLM(model_dir, dtype="float32")
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    out = llm.chat(msgs, GREEDY)[0]
    want = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True),
                                add_special_tokens=False)
    assert out.prompt_token_ids == want
    assert out.outputs[0].token_ids == llm.generate([want], GREEDY)[0].outputs[0].token_ids
    assert len(llm.chat([msgs, msgs + [{"role": "assistant", "content": "4"}]], GREEDY)) == 2


def test_logprobs_match_a_dense_forward(model):
    llm = LLM.from_model(model)
    p = [5, 17, 99, 4, 250, 31]
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3))[0].outputs[0]
    seq = torch.tensor([p + o.token_ids])
    with torch.no_grad():
        lp = model.compute_logits(model(seq, torch.arange(seq.shape[1])[None]))[0].log_softmax(-1)
    total = 0.0
    for i, (t, d) in enumerate(zip(o.token_ids, o.logprobs)):
        row = lp[len(p) - 1 + i]
        assert d[t].rank == 1 and len(d) == 3
        assert abs(d[t].logprob - float(row[t])) < 1e-4
        assert sorted(d) == sorted(row.topk(3).indices.tolist())
        total += d[t].logprob
    assert abs(o.cumulative_logprob - total) < 1e-4


def test_seeded_sampling_reproducible_in_any_batch(model, prompts):
    llm = LLM.from_model(model)
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=42, ignore_eos=True)
    alone = llm.generate([prompts[5]], sp)[0].outputs[0].token_ids
    other = SamplingParams(temperature=0.7, max_tokens=7, ignore_eos=True)
    mixed = llm.generate(prompts[:5] + [prompts[5]] + prompts[6:9], [other] * 5 + [sp] + [other] * 3)
    assert mixed[5].outputs[0].token_ids == alone
    # n > 1: the samples differ from each other, and repeat exactly with the same seed
    a = llm.generate([prompts[5]], sp.clone(n=3))[0]
    b = llm.generate([prompts[5]], sp.clone(n=3))[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_min_tokens_and_eos(model, prompts):
    llm = LLM.from_model(model)
    eos = 7
    llm.eos_token_ids = {eos}
    biased = SamplingParams(temperature=0, max_tokens=8, min_tokens=3)
    with torch.no_grad():  # make EOS the argmax everywhere
        old = model.lm_head.weight[eos].clone()
        model.lm_head.weight[eos] = model.model.norm.weight.sign() * 10
    try:
        o = llm.generate([prompts[4]], biased)[0].outputs[0]
    finally:
        with torch.no_grad():
            model.lm_head.weight[eos] = old
    assert len(o.token_ids) == 4 and o.token_ids[-1] == eos and eos not in o.token_ids[:3]
    assert o.finish_reason == "stop"


def test_metrics_and_reset_cache(model, prompts, reference):
    llm = LLM.from_model(model)
    outs = llm.generate(prompts[:4], GREEDY)
    m = outs[0].metrics
    assert m.time_to_first_token is not None and m.time_to_first_token >= 0
    assert m.time_per_output_token is not None and m.num_output_tokens == MAX_NEW
    assert llm.get_stats().num_generated_tokens == 4 * MAX_NEW
    llm.reset_cache()
    assert not llm.block_manager.hash_to_block and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    check_equal(llm, prompts[:4], reference[:4])


@pytest.mark.parametrize("family", ["llama3", "qwen3", "gpt2"])
def test_other_families_match_reference(tmp_path, family):
    make_tiny_hf(family, tmp_path, vocab_size=256, initializer_range=0.1)
    model = load_model(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (2, 19, 45)]
    ref = generate(model, prompts, 8)
    llm = LLM.from_model(model, block_size=8, max_num_batched_tokens=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_seeded_sampling_survives_preemption(model, prompts):
    sp = [SamplingParams(temperature=1.0, top_k=50, max_tokens=MAX_NEW, seed=i, ignore_eos=True, n=1 + i % 2)
          for i in range(len(prompts))]
    big = LLM.from_model(model).generate(prompts, sp)
    small = LLM.from_model(model, block_size=4, num_kv_blocks=40, max_num_batched_tokens=64)
    got = small.generate(prompts, sp)
    assert small.get_stats().num_preemptions > 0
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in big]


def test_bf16_engine_with_packed_weights_matches_plain_engine(model_dir, prompts, monkeypatch):
    """bf16 on CPU: the engine fuses q/k/v and gate/up and gives every linear a oneDNN-packed copy of
    its weight. An engine with both disabled (plain F.linear on the separate weights, same scheduling)
    must produce the same greedy tokens, also after an in-place weight update (a live policy's
    optimizer step), which the packed copies must notice by themselves."""
    import lmstack.engine.model_runner as runner_mod
    from lmstack.model.layers import bf16_packing_supported

    if not bf16_packing_supported():
        pytest.skip("oneDNN bf16 is not supported on this CPU")

    def update(m):
        with torch.no_grad():
            for layer in m.model.layers:
                layer.mlp.up_proj.weight.mul_(-1)
                layer.self_attn.v_proj.weight.mul_(2)

    fast_model = load_model(model_dir, dtype=torch.bfloat16)
    fast = LLM.from_model(fast_model)
    assert fast_model.model.layers[0].self_attn._fused_qkv.packed is not None
    monkeypatch.setattr(runner_mod, "fuse_projections", lambda m: 0)
    monkeypatch.setattr(runner_mod, "pack_weights", lambda m: 0)
    plain_model = load_model(model_dir, dtype=torch.bfloat16)
    plain = LLM.from_model(plain_model)
    assert plain_model.model.layers[0].self_attn._fused_qkv is None

    def tokens(llm, ps):
        return [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)]

    before = tokens(plain, prompts)
    assert tokens(fast, prompts) == before
    update(fast_model)
    update(plain_model)
    for llm in (fast, plain):
        llm.block_manager.reset_prefix_cache()  # not reset_cache(): packed copies must notice by themselves
    after = tokens(plain, prompts)
    assert after != before
    assert tokens(fast, prompts) == after


def test_bf16_linears_over_an_fp32_policy(model_dir, prompts, monkeypatch):
    """LLM.from_model(fp32 module, dtype="bfloat16"): fast rollouts from an fp32 policy. The linears run
    on packed bf16 roundings of the live fp32 weights (fp32 bias added after), K/V and attention in
    bf16, everything else in fp32. Reference: an engine (same bf16 K/V) whose linears round x and W to
    bf16 through aten's F.linear instead of the fused, packed oneDNN path. The weights
    themselves stay fp32, and an in-place update (an optimizer step) is followed."""
    import torch.nn.functional as F

    import lmstack.engine.model_runner as runner_mod
    import lmstack.model.layers as layers
    from lmstack.model.layers import bf16_packing_supported

    if not bf16_packing_supported():
        pytest.skip("oneDNN bf16 is not supported on this CPU")
    def with_biases(m):  # the checkpoint's q/k/v biases are zeros: make the fp32 bias path matter
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))
        return m

    fast_model = with_biases(load_model(model_dir, dtype=torch.float32))
    fast = LLM.from_model(fast_model, dtype="bfloat16")
    with pytest.raises(ValueError, match="float16.*never converts the weights"):
        LLM.from_model(load_model(model_dir, dtype=torch.float32), dtype="float16")
    with monkeypatch.context() as m:  # a CPU without native bf16: a clear error, not emulated bf16
        m.setattr(runner_mod, "bf16_packing_supported", lambda: False)
        with pytest.raises(ValueError, match="native bf16 path"):
            LLM.from_model(load_model(model_dir, dtype=torch.float32), dtype="bfloat16")

    monkeypatch.setattr(runner_mod, "fuse_projections", lambda m: 0)
    monkeypatch.setattr(runner_mod, "pack_weights", lambda m, from_fp32=False: 0)
    monkeypatch.setattr(layers, "linear", lambda x, w, b: F.linear(x.bfloat16(), w.bfloat16()).float()
                        + (0 if b is None else b))
    ref_model = with_biases(load_model(model_dir, dtype=torch.float32))
    ref = LLM.from_model(ref_model, dtype="bfloat16")

    def tokens(llm, ps):
        return [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)]

    before = tokens(ref, prompts)
    assert tokens(fast, prompts) == before
    qkv = fast_model.model.layers[0].self_attn._fused_qkv
    assert qkv.packed.from_fp32 and qkv.packed._packed.dtype == torch.bfloat16
    assert fast_model.dtype == torch.float32 and fast.runner.k_cache[0].dtype == torch.bfloat16
    for m in (fast_model, ref_model):
        with torch.no_grad():
            for layer in m.model.layers:
                layer.mlp.up_proj.weight.mul_(-1)
                layer.self_attn.q_proj.bias.mul_(3)
    for llm in (fast, ref):
        llm.block_manager.reset_prefix_cache()
    after = tokens(ref, prompts)
    assert after != before
    assert tokens(fast, prompts) == after


def test_decode_groups_partition_by_length():
    """Decodes attend in groups whose lengths are within 2x of the group's longest; tiny groups merge."""
    from lmstack.engine.model_runner import group_by_length

    lens = [800, 700, 390, 380, 300, 200, 100, 90, 50, 40, 35, 33]
    assert group_by_length(lens, min_group=2) == [[0, 1], [2, 3, 4, 5], [6, 7], [8, 9, 10, 11]]
    assert group_by_length(lens, min_group=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert group_by_length([5, 500, 6], min_group=4) == [[1, 2, 0]]  # too few for a second call
    import random

    rng = random.Random(0)
    for _ in range(50):
        ls = [rng.randint(1, 2000) for _ in range(rng.randint(1, 64))]
        groups = group_by_length(ls)
        assert sorted(i for g in groups for i in g) == list(range(len(ls)))  # a partition

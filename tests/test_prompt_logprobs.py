"""Prompt log-probs (vLLM's SamplingParams.prompt_logprobs; OpenAI's echo + logprobs + max_tokens=0)
against transformers' full-sequence log-softmax, through chunked prefill, the row chunking of the
LM head, prefix caching (a cached prefix must not leave holes), preemption and n > 1."""
from __future__ import annotations

import pytest
import torch

import lmstack.engine.prompt_logprobs as plp
from lmstack.engine.llm import LLM
from lmstack.engine.sampling_params import SamplingParams, SamplingParamsError
from lmstack.model.loading import load_model
from tests.fixtures import make_tiny_hf

TOP = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama3_plp")
    make_tiny_hf("llama3", d, vocab_size=300, initializer_range=0.1)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_logprobs(model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
    return run


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def check(out, ids: list[int], ref: torch.Tensor) -> None:
    lps = out.prompt_logprobs
    assert lps is not None and len(lps) == len(ids) and lps[0] is None
    for j in range(1, len(ids)):
        d, row, t = lps[j], ref[j - 1], ids[j]
        assert abs(d[t].logprob - float(row[t])) < 1e-4, f"prompt token {j}"
        assert d[t].rank == int((row > row[t]).sum()) + 1
        top = set(row.topk(TOP).indices.tolist())
        assert top <= set(d) and set(d) <= top | {t}


@pytest.mark.parametrize("engine_args", [
    dict(),
    dict(enable_chunked_prefill=True, max_num_batched_tokens=16),  # a 70-token prompt in 5 chunks
    dict(block_size=4, num_kv_blocks=24, max_num_batched_tokens=64),  # preemption: recomputed prompts
])
def test_prompt_logprobs_match_transformers(model, hf_logprobs, engine_args, monkeypatch):
    monkeypatch.setattr(plp, "CHUNK", 5)  # LM-head rows in chunks that do not divide the prompt
    llm = LLM.from_model(model, **engine_args)
    ps = [prompt(n, s) for s, n in enumerate((70, 2, 33, 17, 1, 40, 25))]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, prompt_logprobs=TOP)
    for o, ids in zip(llm.generate(ps, params), ps):
        check(o, ids, hf_logprobs(ids))
        assert len(o.outputs[0].token_ids) == 20
    stats = llm.get_stats()
    assert stats.kv_blocks_used == 0
    assert stats.num_preemptions > 0 or "num_kv_blocks" not in engine_args


def test_cached_prefix_is_still_scored(model, hf_logprobs):
    llm = LLM.from_model(model, block_size=4)
    shared = prompt(40, 7)
    llm.generate([shared + [5]], SamplingParams(temperature=0, max_tokens=2))  # fills the prefix cache
    ids = shared + [9, 11]
    o = llm.generate([ids], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0))[0]
    assert o.num_cached_tokens == 0  # skipped the lookup rather than leave 40 tokens unscored
    check_top0 = o.prompt_logprobs
    ref = hf_logprobs(ids)
    for j in range(1, len(ids)):
        assert set(check_top0[j]) == {ids[j]}  # prompt_logprobs=0: the actual token only
        assert abs(check_top0[j][ids[j]].logprob - float(ref[j - 1, ids[j]])) < 1e-4
    # a request without prompt log-probs still hits the cache those blocks went into
    o2 = llm.generate([ids], SamplingParams(temperature=0, max_tokens=2))[0]
    assert o2.num_cached_tokens == 40 and o2.prompt_logprobs is None
    assert o2.outputs[0].token_ids == o.outputs[0].token_ids


def test_max_tokens_zero_scores_the_prompt_only(model, hf_logprobs):
    llm = LLM.from_model(model)
    ids = prompt(20, 3)
    outs = llm.generate([ids, prompt(9, 4)], [SamplingParams(max_tokens=0, prompt_logprobs=1, n=2),
                                              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)])
    o = outs[0]
    check_ids = [c.token_ids for c in o.outputs]
    assert check_ids == [[], []] and all(c.finish_reason == "length" for c in o.outputs)
    ref = hf_logprobs(ids)
    assert all(abs(o.prompt_logprobs[j][ids[j]].logprob - float(ref[j - 1, ids[j]])) < 1e-4
               for j in range(1, len(ids)))
    assert len(outs[1].outputs[0].token_ids) == 3  # the neighbour in the batch is unaffected
    assert llm.get_stats().kv_blocks_used == 0 and not llm.has_unfinished_requests()


def test_bad_values_name_the_field():
    with pytest.raises(SamplingParamsError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(SamplingParamsError, match="max_tokens"):
        SamplingParams(max_tokens=-1)

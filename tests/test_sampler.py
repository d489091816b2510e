"""Sampler: filters exclude exactly the right tokens, penalties hit the right logits, seeds reproduce
regardless of batch composition, logprobs, min_tokens; SamplingParams validation."""
from __future__ import annotations

import math

import pytest
import torch

from lmstack.engine.sampler import Sampler, SampleRow, apply_penalties, filter_logits
from lmstack.engine.sampling_params import SamplingParams


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kept(row: torch.Tensor) -> set[int]:
    return {i for i, x in enumerate(row.tolist()) if x != float("-inf")}


def naive_keep(logits: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """The documented rules written out with plain Python: min-p, then top-k, then top-p."""
    idx = list(range(len(logits)))

    def probs(ids):
        m = max(logits[i] for i in ids)
        e = {i: math.exp(logits[i] - m) for i in ids}
        z = sum(e.values())
        return {i: e[i] / z for i in ids}

    if min_p > 0:
        p = probs(idx)
        pmax = max(p.values())
        idx = [i for i in idx if p[i] >= min_p * pmax]
    if top_k > 0:
        kth = sorted((logits[i] for i in idx), reverse=True)[min(top_k, len(idx)) - 1]
        idx = [i for i in idx if logits[i] >= kth]
    if top_p < 1:
        p = probs(idx)
        order = sorted(idx, key=lambda i: -logits[i])
        keep, mass = [], 0.0
        for i in order:
            if mass >= top_p:
                break
            keep.append(i)
            mass += p[i]
        idx = keep
    return set(idx)


@pytest.mark.parametrize("top_k,top_p,min_p", [(3, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.3), (4, 0.7, 0.0),
                                               (0, 0.9, 0.1), (5, 0.95, 0.05), (1, 1.0, 0.0)])
def test_filters_keep_exactly_the_documented_set(top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 12) * 2
    out = filter_logits(logits.clone(), torch.full((6,), top_k), torch.full((6,), top_p), torch.full((6,), min_p))
    for r in range(6):
        assert kept(out[r]) == naive_keep(logits[r].tolist(), top_k, top_p, min_p)
        # kept logits are unchanged
        for i in kept(out[r]):
            assert out[r, i] == logits[r, i]


def test_filters_per_row_parameters_and_off_rows():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 1.0, 0.5]), torch.tensor([0.0, 0.0, 0.0]))
    assert kept(out[0]) == {0, 1}
    assert kept(out[1]) == {0, 1, 2, 3}  # row with everything off is untouched
    assert kept(out[2]) == {0}  # p(0) = 0.64 >= 0.5


def test_penalties_change_exactly_the_right_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    prompt, output = [[0, 1]], [[2, 2, 1]]
    out = apply_penalties(logits.clone(), prompt, output, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # hand computed: repetition on seen {0,1,2}: 2/2=1, -1*2=-2, 0.5/2=0.25;
    # frequency+presence on output counts {2: 2, 1: 1}: token 2: 0.25 - 2*0.25 - 0.5; token 1: -2 - 0.25 - 0.5
    want = torch.tensor([[1.0, -2.75, -0.75, 3.0, -2.0, 1.0]])
    torch.testing.assert_close(out, want)


def test_greedy_uses_penalized_logits_and_min_tokens_bans():
    s = Sampler()
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]] * 3)
    rows = [
        SampleRow(SamplingParams(temperature=0)),
        SampleRow(SamplingParams(temperature=0, repetition_penalty=3.0), None, [0], [0]),  # 5/3 < 4
        SampleRow(SamplingParams(temperature=0), banned_ids=[0, 1]),
    ]
    assert s(logits, rows).token_ids == [0, 1, 2]


def test_seeded_sampling_is_independent_of_batch_composition():
    torch.manual_seed(0)
    target = torch.randn(1, 50)
    p = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=7)
    s = Sampler()
    alone = []
    g = gen(123)
    for _ in range(20):
        alone.append(s(target, [SampleRow(p, g)]).token_ids[0])
    # the same row in varying batches, mixed with other temperatures, greedy rows and filters
    g = gen(123)
    others = [SampleRow(SamplingParams(temperature=0)), SampleRow(SamplingParams(temperature=1.5, min_p=0.2), gen(1)),
              SampleRow(SamplingParams(temperature=0.3, top_p=0.5), gen(2))]
    mixed = []
    for step in range(20):
        k = step % 4
        batch = torch.cat([torch.randn(k, 50), target, torch.randn(3 - k if k < 3 else 0, 50)])
        rows = others[:k] + [SampleRow(p, g)] + others[:3 - k if k < 3 else 0]
        mixed.append(s(batch, rows).token_ids[k])
    assert mixed == alone
    assert len(set(alone)) > 1  # it really samples


def test_sampling_follows_the_filtered_distribution():
    # 4000 independent rows of the same logits: empirical frequencies match softmax(logits / T)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = SamplingParams(temperature=0.8, top_k=4)
    rows = [SampleRow(p, gen(i)) for i in range(4000)]
    toks = Sampler()(logits.expand(4000, 5), rows).token_ids
    freq = torch.bincount(torch.tensor(toks), minlength=5).float() / 4000
    want = torch.softmax(logits[:4] / 0.8, -1)
    assert freq[4] == 0
    torch.testing.assert_close(freq[:4], want, atol=0.03, rtol=0)


def test_sampling_over_several_cdf_blocks():
    # a vocabulary of 2.4 CDF blocks (padded): the allowed tokens sit at block edges, inside the
    # padded last block and far apart; every other token is -inf and must never be drawn
    from lmstack.engine.sampler import _CDF_BLOCK

    V = int(2.4 * _CDF_BLOCK)
    allowed = torch.tensor([0, _CDF_BLOCK - 1, _CDF_BLOCK, 2 * _CDF_BLOCK + 5, V - 1])
    logits = torch.full((V,), float("-inf"))
    logits[allowed] = torch.tensor([0.5, -1.0, 1.5, 0.0, 1.0])
    rows = [SampleRow(SamplingParams(temperature=1.0), gen(i)) for i in range(4000)]
    toks = torch.tensor(Sampler()(logits.expand(4000, V).clone(), rows).token_ids)
    assert set(toks.tolist()) <= set(allowed.tolist())
    freq = torch.stack([(toks == a).float().mean() for a in allowed])
    torch.testing.assert_close(freq, torch.softmax(logits[allowed], -1), atol=0.03, rtol=0)
    # a single allowed token in the middle of the vocabulary is always the one drawn
    one = torch.full((3, V), float("-inf"))
    one[:, 1500] = 0.0
    assert Sampler()(one, [SampleRow(SamplingParams(temperature=0.7), gen(i)) for i in range(3)]).token_ids == [1500] * 3


def test_logprobs_top_n_and_rank():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    res = Sampler()(logits, [SampleRow(SamplingParams(temperature=0, logprobs=2))])
    lp = torch.log_softmax(logits[0], -1)
    d = res.logprobs[0]
    assert res.token_ids == [1] and set(d) == {1, 2}
    assert d[1].rank == 1 and d[2].rank == 2
    assert math.isclose(d[2].logprob, float(lp[2]), rel_tol=1e-6)
    # the sampled token is always included, with its true rank, even outside the top N
    res = Sampler()(logits, [SampleRow(SamplingParams(temperature=0, logprobs=1), banned_ids=[1, 2])])
    d = res.logprobs[0]
    assert res.token_ids == [0] and set(d) == {0, 1} and d[0].rank == 3  # logits 3 > 2 > 1


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("n", 0),
                                         ("top_k", -2), ("min_p", 1.5), ("max_tokens", 0), ("logprobs", -1),
                                         ("presence_penalty", 3.0), ("repetition_penalty", 0.0), ("stop", [""])])
def test_sampling_params_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_normalisation():
    p = SamplingParams(top_k=-1, stop="x")
    assert p.top_k == 0 and p.stop_strs == ["x"] and p.stop_token_ids == []
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=2)

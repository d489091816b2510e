"""The sampler is total: parameters that pass validation, however extreme, yield a token id inside the
vocabulary for every row and leave the other rows of the batch exactly as they would be alone. These are
the request shapes that used to produce a NaN CDF and an out-of-vocabulary id (and kill the engine)."""
from __future__ import annotations

import pytest
import torch

from lmstack.engine.sampler import Sampler, SampleRow
from lmstack.engine.sampling_params import SamplingParams

V = 3000  # more than one CDF block, not a multiple of it

HOSTILE = [
    dict(temperature=1e-308),
    dict(temperature=1e-308, logprobs=5),
    dict(temperature=1e-50),
    dict(temperature=2e-5),  # above the greedy cut-off: logits / 2e-5 overflow float32 for big logits
    dict(top_p=1e-300),
    dict(top_p=1e-300, top_k=3),
    dict(repetition_penalty=1e-300),
    dict(repetition_penalty=1e-300, temperature=0.0),
    dict(repetition_penalty=1e300, temperature=0.5),
    dict(min_p=1.0, temperature=1.0),
]


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, V, generator=g) * 4
    x[:, 7] = 1e6  # one huge logit, and exact zeros (0 / 0 under a zero penalty)
    x[:, 11] = 0.0
    return x


@pytest.mark.parametrize("kw", HOSTILE, ids=[",".join(f"{k}={v}" for k, v in d.items()) for d in HOSTILE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hostile_row_yields_a_vocab_token_and_leaves_neighbours_alone(kw, dtype):
    logits = _logits(3).to(dtype)
    seen = list(range(0, V, 3))  # prompt/output tokens for the penalties, including 7 and 11
    normal = SamplingParams(temperature=0.8, top_p=0.9, seed=5)

    def rows(params_mid):
        gens = [torch.Generator().manual_seed(k) for k in (1, 2, 3)]
        return [SampleRow(normal, gens[0]), SampleRow(params_mid, gens[1], seen, seen),
                SampleRow(normal, gens[2])]

    out = Sampler()(logits.clone(), rows(SamplingParams(**kw)))
    assert all(0 <= t < V for t in out.token_ids), out.token_ids
    ref = Sampler()(logits.clone(), rows(normal))
    assert (out.token_ids[0], out.token_ids[2]) == (ref.token_ids[0], ref.token_ids[2])
    if kw.get("logprobs"):
        assert all(v.logprob == v.logprob for v in out.logprobs[1].values())  # no NaN


def test_tiny_temperature_is_greedy():
    logits = _logits(2, seed=3)
    logits[:, 7] = 0.0  # no single overwhelming logit: the argmax must come from the data
    out = Sampler()(logits.clone(), [SampleRow(SamplingParams(temperature=1e-50), torch.Generator()),
                                     SampleRow(SamplingParams(temperature=1e-308), torch.Generator())])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_every_token_banned_falls_back_to_the_raw_distribution():
    """stop_token_ids naming every id with min_tokens > 0 bans the whole row: it samples from the raw
    logits instead of from nothing (the engine then ends the sequence on that stop token)."""
    logits = _logits(1, seed=4)
    p = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=list(range(V)))
    out = Sampler()(logits.clone(), [SampleRow(p, None, banned_ids=list(range(V)))])
    assert out.token_ids == [int(logits.argmax())]
    p = SamplingParams(temperature=1.0, min_tokens=3, stop_token_ids=list(range(V)), seed=1)
    out = Sampler()(logits.clone(), [SampleRow(p, torch.Generator().manual_seed(1), banned_ids=list(range(V)))])
    assert 0 <= out.token_ids[0] < V


def test_top_p_tiny_keeps_exactly_the_most_likely_token():
    logits = _logits(4, seed=6)
    logits[:, 7] = 0.0
    rows = [SampleRow(SamplingParams(top_p=1e-300, seed=i), torch.Generator().manual_seed(i)) for i in range(4)]
    assert Sampler()(logits.clone(), rows).token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameters_are_refused_by_name(name, value):
    from lmstack.engine.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError, match=f"SamplingParams.{name} must be a finite number"):
        SamplingParams(**{name: value})

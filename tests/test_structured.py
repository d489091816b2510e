"""Structured output: the constraint's validation, the grammar engine (random walks through the masks,
validated by jsonschema / re as independent references), the bitmask application against a naive
reference, and constrained decoding through LLM.generate with a tiny random model: strict JSON
schemas always parse and validate, regex / choice / grammar outputs match, n > 1, seeds, preemption,
prefix caching, streaming, mixed batches, raw logprobs, and clear errors for unsupported features."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import numpy as np
import pytest
import torch

pytest.importorskip("llguidance")

from lmstack.engine.llm import LLM  # noqa: E402
from lmstack.engine.sampling_params import SamplingParams, SamplingParamsError  # noqa: E402
from lmstack.engine.structured import StructuredOutputError, StructuredOutputsParams as SO  # noqa: E402
from lmstack.engine.structured.grammar import GrammarCompiler, close_objects  # noqa: E402
from lmstack.engine.structured.mask import apply_token_bitmask_, token_bitmask  # noqa: E402
from lmstack.model.loading import load_model  # noqa: E402
from lmstack.tokenizer import Tokenizer  # noqa: E402
from tests.fixtures import make_tiny_hf  # noqa: E402
from tests.tok_fixtures import build_test_tokenizer  # noqa: E402

V = 320  # model vocabulary (the tokenizer has 300 ids: the mask must never allow the other 20)

# bounded: every valid output has < 200 bytes without whitespace, so max_tokens=256 always completes
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
        "cents": {"type": "integer", "minimum": 0, "maximum": 99999},  # a number's fraction is unbounded
        "status": {"enum": ["new", "paid", "sent"]},
        "gift": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 4},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "ship": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                 "required": ["zip"]},
    },
    "required": ["id", "qty", "cents", "status", "gift", "note", "tags", "ship"],
    "additionalProperties": False,
}
STRICT = SO(json=ORDER, disable_any_whitespace=True, disable_additional_properties=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2_so")
    make_tiny_hf("qwen2", d, vocab_size=V, initializer_range=0.1, max_position_embeddings=512)
    build_test_tokenizer(d, "chatml", vocab_size=300)
    return d


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32")


@pytest.fixture(scope="module")
def compiler(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    return GrammarCompiler.from_tokenizer(tok, V, tok.eos_token_ids), tok


def _texts(outs):
    return [c for o in outs for c in o.outputs]


# ------------------------------------------------------------------------------------------ params
def test_params_validation_names_the_field():
    with pytest.raises(StructuredOutputError, match="exactly one of"):
        SO()
    with pytest.raises(StructuredOutputError, match="got 2: json, regex"):
        SO(json={"type": "object"}, regex="a")
    with pytest.raises(StructuredOutputError, match="structured_outputs.json is not valid JSON"):
        SO(json="{not json")
    assert SO(json='{"type": "integer"}').schema == {"type": "integer"}
    with pytest.raises(StructuredOutputError, match="choice must be a non-empty list of strings"):
        SO(choice=["a", 3])
    with pytest.raises(StructuredOutputError, match="json_object must be true"):
        SO(json_object=False)
    with pytest.raises(StructuredOutputError, match="structural_tag is not supported"):
        SO(structural_tag="{}")
    with pytest.raises(StructuredOutputError, match="unknown field.*bogus"):
        SamplingParams(structured_outputs={"json": {}, "bogus": 1})
    sp = SamplingParams(structured_outputs={"regex": "[ab]+"})
    assert sp.structured_outputs.regex == "[ab]+" and sp.clone(n=2).structured_outputs.regex == "[ab]+"
    with pytest.raises(SamplingParamsError, match="structured_outputs"):
        SamplingParams(structured_outputs="json")


def test_from_response_format():
    assert SO.from_response_format(None) is None and SO.from_response_format({"type": "text"}) is None
    assert SO.from_response_format({"type": "json_object"}).json_object is True
    p = SO.from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": ORDER, "strict": True}})
    assert p.schema == ORDER and p.disable_additional_properties
    assert not SO.from_response_format({"type": "json_schema", "json_schema": {"schema": ORDER}}).disable_additional_properties
    with pytest.raises(StructuredOutputError, match="response_format.type .* got 'bogus'"):
        SO.from_response_format({"type": "bogus"})
    with pytest.raises(StructuredOutputError, match="response_format.json_schema is required"):
        SO.from_response_format({"type": "json_schema"})


def test_close_objects_only_adds_where_unsaid():
    s = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                          "c": {"type": "object", "properties": {}, "additionalProperties": True}},
         "$defs": {"d": {"properties": {"e": {}}}}, "anyOf": [{"properties": {"f": {}}}]}
    out = close_objects(s)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["additionalProperties"] is True
    assert out["$defs"]["d"]["additionalProperties"] is False and out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in s  # the request's schema is not modified


# ------------------------------------------------------------------------------------------ grammar engine
def _walk(compiler, tok, params, rng, max_steps=400):
    """Sample uniformly among the allowed ids until the grammar completes; returns (ids, finished)."""
    comp, _ = compiler
    m = comp.matcher(params)
    ids: list[int] = []
    for _ in range(max_steps):
        bits = np.unpackbits(token_bitmask([m], V).numpy().view(np.uint8), bitorder="little")[:V]
        allowed = np.flatnonzero(bits).tolist()
        assert allowed and max(allowed) < 300, "an id the tokenizer does not have was allowed"
        short = [t for t in allowed if t < 259]  # the byte tokens (3 specials + 256 bytes): walks end sooner
        t = rng.choice(short if short and rng.random() < 0.7 else allowed)
        if t in tok.eos_token_ids:
            return ids, True
        ids.append(t)
        m.advance(ids)
        assert m.error is None
        if m.is_finished:
            return ids, True
    return ids, False


@pytest.mark.parametrize("schema", [
    ORDER,
    {"type": "array", "items": {"anyOf": [{"type": "number", "minimum": -5, "maximum": 5}, {"const": "x"}]},
     "minItems": 1, "maxItems": 3},
    {"$defs": {"n": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                                                       "kids": {"type": "array", "items": {"$ref": "#/$defs/n"},
                                                                "maxItems": 1}},
                     "required": ["v", "kids"]}}, "$ref": "#/$defs/n"},
    {"type": "string", "enum": ["a\"b", "é\n", "日本"]},
])
def test_random_walks_validate(compiler, schema):
    """Whatever allowed tokens are picked, a completed output parses and validates (jsonschema is the reference)."""
    comp, tok = compiler
    rng = random.Random(0)
    done = 0
    for ws in (True, False):
        p = SO(json=schema, disable_any_whitespace=ws)
        for _ in range(8):
            ids, finished = _walk(compiler, tok, p, rng)
            if finished:
                done += 1
                jsonschema.validate(json.loads(tok.decode(ids)), schema)
    assert done >= 4


def test_random_walks_regex_choice_grammar(compiler):
    comp, tok = compiler
    rng = random.Random(1)
    rx = r"(\+[0-9]{1,2} )?[a-z]{2,5}@[a-z]+\.(com|org)"
    gbnf = 'root ::= "SELECT " col (", " col)* " FROM t" ";"\ncol ::= [a-z] [a-z0-9]{0,3}\n'
    lark = 'start: "(" expr ")"\nexpr: NUM | NUM "+" expr\nNUM: /[0-9]{1,2}/\n'
    cases = [(SO(regex=rx), rx), (SO(choice=["yes", "no", 'say "hi"', "日本語"]), r'yes|no|say "hi"|日本語'),
             (SO(grammar=gbnf), r"SELECT [a-z][a-z0-9]{0,3}(, [a-z][a-z0-9]{0,3})* FROM t;"),
             (SO(grammar=lark), r"\([0-9]{1,2}(\+[0-9]{1,2})*\)")]
    for params, ref in cases:
        for _ in range(6):
            ids, finished = _walk(compiler, tok, params, rng)
            if finished:
                assert re.fullmatch(ref, tok.decode(ids)), (params.kind, tok.decode(ids))


@pytest.mark.parametrize("schema,feature", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if, then"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
])
def test_unsupported_schema_feature_is_named(compiler, schema, feature):
    with pytest.raises(StructuredOutputError, match=f"unsupported JSON schema feature\\(s\\): {feature}$"):
        compiler[0].compile(SO(json=schema))


def test_invalid_constraints_are_clear(compiler):
    comp = compiler[0]
    with pytest.raises(StructuredOutputError, match="structured_outputs.json: .*strin"):
        comp.compile(SO(json={"type": "strin"}))
    with pytest.raises(StructuredOutputError, match="structured_outputs.json: .*weird"):
        comp.compile(SO(json={"type": "string", "format": "weird"}))
    with pytest.raises(StructuredOutputError, match="structured_outputs.regex: invalid regex"):
        comp.compile(SO(regex="(a"))
    with pytest.raises(StructuredOutputError, match="structured_outputs.grammar"):
        comp.compile(SO(grammar="start: undefined_rule"))


def test_special_token_text_is_refused(compiler):
    """llguidance cannot force a special token's text as text: refused at compile, naming the token."""
    comp = compiler[0]
    for p in (SO(choice=["ok", "<|im_end|>"]), SO(grammar='start: "a<|im_start|>"'), SO(regex=r"x<\|im_end\|>"),
              SO(json={"enum": ["<|endoftext|>"]})):
        with pytest.raises(StructuredOutputError, match=f"structured_outputs.{p.kind}: forces the text of special"):
            comp.compile(p)
    comp.compile(SO(grammar='start: "a" <|im_end|>'))  # the token itself is fine


def test_compile_cache(compiler):
    comp = compiler[0]
    a = comp.compile(SO(json={"type": "object", "properties": {"x": {}, "y": {}}}))
    assert comp.compile(SO(json='{"type": "object", "properties": {"x": {}, "y": {}}}')) is a
    assert comp.compile(SO(json={"type": "object", "properties": {"y": {}, "x": {}}})) is not a  # order is output
    assert comp.compile(SO(json={"type": "object", "properties": {"x": {}, "y": {}}},
                           disable_any_whitespace=True)) is not a


# ------------------------------------------------------------------------------------------ bitmask
def test_apply_token_bitmask_matches_reference():
    g = torch.Generator().manual_seed(0)
    for N, Vx, rows in ((3, 70, [0, 2]), (4, 64, None), (2, 1000, [1])):
        k = N if rows is None else len(rows)
        bm = torch.randint(-2**31, 2**31 - 1, (k, (Vx + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
        logits = torch.randn(N, Vx, generator=g)
        want = logits.clone()
        for i, r in enumerate(rows if rows is not None else range(N)):
            for t in range(Vx):
                if not (int(bm[i, t // 32]) >> (t % 32)) & 1:
                    want[r, t] = float("-inf")
        apply_token_bitmask_(logits, bm, rows)
        assert torch.equal(logits, want)


# ------------------------------------------------------------------------------------------ engine
def test_strict_schema_always_validates(llm):
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=256, structured_outputs=STRICT)
    outs = llm.generate(["Order:", "Give me JSON", "x"], sp)
    comps = _texts(outs)
    assert len(comps) == 9
    for c in comps:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), ORDER)
        assert not set(c.token_ids) & llm.eos_token_ids  # ended by the grammar, no EOS step
    assert len({c.text for c in comps}) > 3  # the samples differ
    greedy = llm.generate(["Order:"], SamplingParams(temperature=0, max_tokens=256, structured_outputs=STRICT))
    jsonschema.validate(json.loads(greedy[0].outputs[0].text), ORDER)


def test_regex_choice_grammar_json_object(llm):
    rx = r"[0-9]{3}-[a-z]{2,4}"
    sp = SamplingParams(n=4, seed=1, max_tokens=64, structured_outputs=SO(regex=rx))
    assert all(re.fullmatch(rx, c.text) and c.finish_reason == "stop" for c in _texts(llm.generate(["a"], sp)))
    choices = ["positive", "negative", "neutral 😐"]
    sp = SamplingParams(n=6, seed=2, max_tokens=32, structured_outputs=SO(choice=choices))
    assert all(c.text in choices for c in _texts(llm.generate(["b"], sp)))
    sp = SamplingParams(n=2, seed=3, max_tokens=64, structured_outputs=SO(grammar='root ::= "ab" [0-9]{2,4} ("!" | "?")'))
    assert all(re.fullmatch(r"ab[0-9]{2,4}[!?]", c.text) for c in _texts(llm.generate(["c"], sp)))
    sp = SamplingParams(seed=4, max_tokens=256, structured_outputs=SO(json_object=True, disable_any_whitespace=True))
    out = llm.generate(["d"], sp)[0].outputs[0]
    if out.finish_reason == "stop":  # a random model may write one long string: only complete ones can parse
        assert isinstance(json.loads(out.text), dict)
    else:
        assert out.text.startswith("{")


def test_seeded_and_mixed_batches(llm):
    """A seeded constrained request gives the same output alone and in a batch; unconstrained rows of a
    mixed batch are untouched by the masks (same tokens as alone)."""
    sp = SamplingParams(seed=11, max_tokens=256, structured_outputs=STRICT)
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = llm.generate(["Order:"], sp)[0].outputs[0].token_ids
    plain_alone = llm.generate(["hello"], plain)[0].outputs[0].token_ids
    mixed = llm.generate(["hello", "Order:", "zzz"], [plain, sp, SamplingParams(seed=5, max_tokens=256,
                                                                                structured_outputs=STRICT)])
    assert mixed[1].outputs[0].token_ids == alone
    assert mixed[0].outputs[0].token_ids == plain_alone


def test_preemption_and_prefix_cache_keep_outputs(llm, model_dir):
    """Recompute after preemption must not advance a matcher twice; a prefix-cache hit changes nothing."""
    prompts = [list(range(10, 10 + n)) for n in (30, 31, 33, 35)]  # + up to 256 tokens: 72 blocks of 4
    sps = [SamplingParams(seed=20 + i, max_tokens=256, structured_outputs=STRICT) for i in range(4)]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, sps)]
    small = LLM.from_model(load_model(model_dir, dtype=torch.float32), tokenizer=llm.tokenizer, block_size=4,
                           num_kv_blocks=100, max_num_batched_tokens=64)
    got = small.generate(prompts, sps)
    assert small.get_stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == want
    again = small.generate(prompts, sps)  # the prompts' blocks are in the prefix cache now
    assert again[0].num_cached_tokens > 0
    assert [o.outputs[0].token_ids for o in again] == want


def test_streaming_and_n(llm):
    sp = SamplingParams(seed=3, max_tokens=256, structured_outputs=STRICT)
    text = "".join(llm.stream("Order:", sp))
    assert text == llm.generate(["Order:"], sp)[0].outputs[0].text
    jsonschema.validate(json.loads(text), ORDER)
    outs = llm.generate(["Order:"], sp.clone(n=4))[0].outputs  # one matcher per sample
    assert [c.index for c in outs] == [0, 1, 2, 3] and len({c.text for c in outs}) > 1
    for c in outs:
        jsonschema.validate(json.loads(c.text), ORDER)


def test_logprobs_are_of_the_raw_distribution(llm):
    """The mask restricts sampling only: logprobs stay those of the model (as in vLLM), so a constrained
    greedy step reports the same top-5 as the unconstrained one."""
    so = SamplingParams(temperature=0, max_tokens=1, logprobs=5, structured_outputs=SO(regex="[0-9]+"))
    free = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    a = llm.generate(["q"], so)[0].outputs[0]
    b = llm.generate(["q"], free)[0].outputs[0]
    assert re.fullmatch("[0-9]+", a.text)
    top = lambda c: {t: round(l.logprob, 5) for t, l in c.logprobs[0].items() if l.rank <= 5}  # noqa: E731
    assert top(a) == top(b)


def test_errors_through_the_engine(llm, model):
    with pytest.raises(StructuredOutputError, match="unsupported JSON schema feature\\(s\\): uniqueItems"):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams(structured_outputs=SO(
            json={"type": "array", "uniqueItems": True}))])
    assert not llm.has_unfinished_requests()  # nothing was queued
    assert llm.generate(["a"], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    bare = LLM.from_model(model)  # no tokenizer
    with pytest.raises(ValueError, match="structured_outputs needs a tokenizer"):
        bare.generate([[5, 6]], SamplingParams(structured_outputs=SO(regex="a")))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, dtype=torch.float32)


def test_grammar_end_with_ignore_eos_and_min_tokens(llm):
    sp = SamplingParams(seed=1, max_tokens=50, ignore_eos=True, structured_outputs=SO(choice=["ok", "fine"]))
    c = llm.generate(["e"], sp)[0].outputs[0]
    assert c.text in ("ok", "fine") and c.finish_reason == "stop"

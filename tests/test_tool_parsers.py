"""Tool-call parsing on fixed model outputs (hermes / llama3_json / mistral), complete and streamed in
random chunkings, against the expected OpenAI tool_calls; the parser chosen from chat templates; and
tool_choice "required" / named enforced by constrained decoding on a tiny random model, whose replies
the same parsers must turn into calls whose arguments validate against the tool's schema."""
from __future__ import annotations

import itertools
import json
import random

import jsonschema
import pytest

from lmstack.engine.tool_choice import ToolChoiceError, chosen_tools, tool_choice_constraint
from lmstack.engine.tool_parsers import ToolCall, get_tool_parser, parser_name_for_template
from tests.tok_fixtures import LLAMA3_TEMPLATE, QWEN25_TEMPLATE

W = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TRICKY = '{"name": "note", "arguments": {"text": "a } b { \\"q\\" ]", "tags": ["x", {"y": [1, 2.5e3, null]}], "u": "日本 😀"}}'

# (parser, model output, expected content, expected [(name, arguments text)])
CASES = [
    ("hermes", f"<tool_call>\n{W}\n</tool_call>", None, [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    ("hermes", f"Let me check.\n\n<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{TRICKY}\n</tool_call>",
     "Let me check.", [("get_weather", '{"city": "Paris", "unit": "celsius"}'),
                       ("note", TRICKY[TRICKY.index('{"text"'):-1])]),  # the model's own text, not re-dumped
    ("hermes", '<tool_call>\n{"arguments": {"a": 1}, "name": "late_name"}\n</tool_call>', None, [("late_name", '{"a": 1}')]),
    ("hermes", '<tool_call>\n{"name": "no_args"}\n</tool_call>', None, [("no_args", "{}")]),
    ("hermes", '<tool_call>\n{"name": "stringified", "arguments": "{\\"k\\": 2}"}\n</tool_call>', None,
     [("stringified", '{"k": 2}')]),
    ("hermes", f"<tool_call>\n{W}", None, [("get_weather", '{"city": "Paris", "unit": "celsius"}')]),  # cut before </tool_call>
    ("hermes", "The weather is <b>nice</b> and a < b; <tool is not a call>.\n", "The weather is <b>nice</b> and a < b; "
     "<tool is not a call>.\n", []),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": }\n</tool_call>', None, "malformed"),
    ("hermes", "<tool_call>\n", None, "malformed"),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", '{"city": "Paris"}')]),
    ("llama3_json", '<|python_tag|>{"name": "f", "arguments": {"x": [1, 2]}}', None, [("f", '{"x": [1, 2]}')]),
    ("llama3_json", ' \n{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"q": "x;y"}}', None,
     [("a", "{}"), ("b", '{"q": "x;y"}')]),
    ("llama3_json", "Hello there, {name}!", "Hello there, {name}!", []),
    ("llama3_json", '{"answer": 42}', None, "malformed"),
    ("llama3_json", "<|python_tag|>brave_search.call(query=\"x\")", None, "malformed"),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": '
     '{"a": 1, "b": 2}}]', None, [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2}')]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[ARGS]{"a": {"b": "}"}}', "Sure.",
     [("get_weather", '{"city": "Paris"}'), ("add", '{"a": {"b": "}"}}')]),
    ("mistral", '[TOOL_CALLS]get_weather{"city": "Paris"}', None, [("get_weather", '{"city": "Paris"}')]),
    ("mistral", "No tools needed [TOOL", "No tools needed [TOOL", []),
    ("mistral", '[TOOL_CALLS] [{"name": 3, "arguments": {}}]', None, "malformed"),
]


def _counter_ids():
    c = itertools.count()
    return lambda: f"call_{next(c)}"


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_complete(parser, text, content, calls):
    p = get_tool_parser(parser, id_factory=_counter_ids())
    got_content, got = p.parse(text)
    if calls == "malformed":  # as vLLM: no tool calls, the whole reply as content
        assert (got_content, got) == (text, [])
        return
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert [c.id for c in got] == [f"call_{i}" for i in range(len(calls))]
    for c in got:
        json.loads(c.arguments)
        assert c.to_openai() == {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def _replay(parser, chunks):
    """Feed chunks; rebuild content and calls from the OpenAI deltas, checking their shape."""
    st = get_tool_parser(parser, id_factory=_counter_ids()).stream()
    deltas = [d for ch in chunks for d in st.feed(ch)] + st.finish()
    content, calls = "", []
    for d in deltas:
        assert len(d) == 1
        if "content" in d:
            assert not calls, "content after a tool call"
            content += d["content"]
            continue
        (tc,) = d["tool_calls"]
        if "id" in tc:  # header: a new call, in order, name complete, arguments ""
            assert tc["index"] == len(calls) and tc["type"] == "function" and tc["function"]["arguments"] == ""
            calls.append([tc["id"], tc["function"]["name"], ""])
        else:
            assert tc["index"] == len(calls) - 1 and set(tc["function"]) == {"arguments"}
            calls[-1][2] += tc["function"]["arguments"]
    return content, calls, st


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_streamed_in_random_chunks(parser, text, content, calls):
    rng = random.Random(hash(text) & 0xFFFF)
    splits = [[1] * len(text)] + [sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12))))
                                  for _ in range(15)]
    for cuts in splits:
        if cuts == [1] * len(text):
            chunks = list(text)  # one character at a time
        else:
            chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        got_content, got_calls, st = _replay(parser, chunks)
        if calls == "malformed":
            if not got_calls:  # no call was streamed before the JSON went wrong: all of it is content
                assert got_content == text
            continue
        assert got_content == (content or "")
        assert [(n, a) for _, n, a in got_calls] == calls
        assert [(c.name, c.arguments) for c in st.tool_calls] == calls  # what the stream says it sent


def test_parser_choice_from_template():
    assert parser_name_for_template(QWEN25_TEMPLATE) == "hermes"
    llama31 = ("{%- if tools %}Given the following functions, please respond with a JSON for a function call with its "
               'proper arguments... {"name": function name, "parameters": dictionary of argument name and its value}'
               "{%- endif %}<|start_header_id|>ipython<|end_header_id|>{{- '<|python_tag|>' }}")
    assert parser_name_for_template(llama31) == "llama3_json"
    assert parser_name_for_template("{%- if message.tool_calls %}[TOOL_CALLS][{{ tool_calls | tojson }}]") == "mistral"
    assert parser_name_for_template(LLAMA3_TEMPLATE) is None and get_tool_parser(chat_template=None) is None
    assert get_tool_parser("mistral", chat_template=QWEN25_TEMPLATE).name == "mistral"  # the flag wins
    assert get_tool_parser("llama4_json").name == "llama3_json"
    with pytest.raises(ValueError, match="unknown tool call parser 'pythonic'.*hermes, llama3_json"):
        get_tool_parser("pythonic")
    mid = get_tool_parser("mistral").parse('[TOOL_CALLS]f{"a": 1}')[1][0].id
    assert len(mid) == 9 and mid.isalnum()  # Mistral's tool call id format
    assert get_tool_parser("hermes").parse(f"<tool_call>{W}</tool_call>")[1][0].id.startswith("chatcmpl-tool-")


# ------------------------------------------------------------------------------------------ tool_choice
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def test_marker_that_is_a_special_token_must_be_given_as_one(engine):
    """[TOOL_CALLS] is a special token of this tokenizer: a grammar spelling it as text is refused up
    front (llguidance would offer the token, then reject it) with a message naming it."""
    from lmstack.engine.sampling_params import SamplingParams
    from lmstack.engine.structured import StructuredOutputError

    so = tool_choice_constraint("mistral", TOOLS, "required")
    with pytest.raises(StructuredOutputError, match="special token\\(s\\) \\[TOOL_CALLS\\]"):
        engine[0].generate(["x"], SamplingParams(structured_outputs=so))


def test_tool_choice_validation():
    assert tool_choice_constraint("hermes", TOOLS, "auto") is None
    assert tool_choice_constraint("hermes", TOOLS, "none") is None and chosen_tools(TOOLS, None) is None
    with pytest.raises(ToolChoiceError, match="names function 'nope', which is not in tools \\(get_weather, add\\)"):
        tool_choice_constraint("hermes", TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ToolChoiceError, match="'required' but no tools"):
        tool_choice_constraint("hermes", [], "required")
    with pytest.raises(ToolChoiceError, match="tools\\[1\\].function.name"):
        tool_choice_constraint("hermes", [TOOLS[0], {"type": "function", "function": {}}], "required")
    with pytest.raises(ToolChoiceError, match="tool_choice must be"):
        tool_choice_constraint("hermes", TOOLS, "always")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    pytest.importorskip("llguidance")
    from tokenizers import AddedToken

    from lmstack.engine.llm import LLM
    from lmstack.tokenizer import Tokenizer
    from tests.fixtures import make_tiny_hf
    from tests.tok_fixtures import build_test_tokenizer

    d = tmp_path_factory.mktemp("tiny_tools")
    make_tiny_hf("qwen2", d, vocab_size=320, initializer_range=0.1, max_position_embeddings=512)
    build_test_tokenizer(d, "chatml", vocab_size=300)
    tok = Tokenizer.from_dir(d)
    # Mistral v11's markers as special tokens (ids 300, 301), for the special-token path of the grammar
    tok.backend.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True), AddedToken("[ARGS]", special=True)])
    specials = {"[TOOL_CALLS]": tok.token_to_id("[TOOL_CALLS]"), "[ARGS]": tok.token_to_id("[ARGS]")}
    return LLM(d, dtype="float32", tokenizer=tok), specials


@pytest.mark.parametrize("parser,choice,parallel,special", [
    ("hermes", "required", True, ()), ("hermes", {"type": "function", "function": {"name": "add"}}, False, ()),
    ("llama3_json", "required", True, ()), ("mistral", "required", True, ("[TOOL_CALLS]",)),  # before v11
    ("mistral", {"type": "function", "function": {"name": "get_weather"}}, True, ("[TOOL_CALLS]", "[ARGS]")),  # v11
])
def test_tool_choice_is_enforced(engine, parser, choice, parallel, special):
    from lmstack.engine.sampling_params import SamplingParams

    llm, specials = engine
    so = tool_choice_constraint(parser, TOOLS, choice, parallel, {k: specials[k] for k in special},
                                any_whitespace=False)
    sp = SamplingParams(n=4, seed=5, max_tokens=300, structured_outputs=so, skip_special_tokens=False)
    outs = llm.generate(["What is the weather?"], sp)[0].outputs
    names = [c["function"]["name"] for c in (choice,) if isinstance(c, dict)] or list(SCHEMAS)
    p = get_tool_parser(parser)
    n_calls = []
    for out in outs:
        assert out.finish_reason == "stop", out.text
        content, calls = p.parse(out.text)
        assert content is None and calls, out.text
        if not parallel:
            assert len(calls) == 1
        n_calls.append(len(calls))
        for c in calls:
            assert isinstance(c, ToolCall) and c.name in names
            jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
        if special:  # the markers were generated as the special tokens, not spelled out
            assert out.token_ids.count(specials["[TOOL_CALLS]"]) == len(calls)

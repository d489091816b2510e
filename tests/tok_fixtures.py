"""Tiny HF tokenizer folders for tests: `build_test_tokenizer(out_dir, style)`.

A byte-level BPE (a few hundred ids, trained in milliseconds with `tokenizers`) on a small built-in
multilingual corpus, plus special tokens and a chat template in the style of a real model family:
- "chatml":  Qwen2.5 (<|im_start|>/<|im_end|>, default system message, tool calls)
- "llama3":  Llama-3 Instruct (<|begin_of_text|> put on by tokenizer.json's post-processor,
             <|start_header_id|>role<|end_header_id|>, <|eot_id|>; generation_config lists two EOS ids)
- "mistral": Mistral Instruct ([INST] ... [/INST], <s> via add_bos_token, </s> after replies)
The templates are written here as equivalents of those families' public templates. The folder
loads with transformers.AutoTokenizer, which the tests use as the reference.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today?",
    "Tokenizers split text into pieces; the model reads ids, not letters.",
    "In 2024 there were 365 + 1 = 366 days, and 12 * 34 = 408.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1234 56789 3.14159",
    "你好世界！今天天气很好，我们去公园散步吧。",
    "7 个苹果加 5 个苹果是多少？答案是 12 个苹果。",
    "机器学习和语言模型很有意思。中文文本需要被正确地切分。",
    "Emoji time 😀 🎉 👍 🚀 ❤️ 🤖 — the party 🎉 starts at 8!",
    "Ünïcödé façade naïve café — Ωmega ñ ß; русский текст; 日本語のテキスト。",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "User: what is 17 + 25?\nAssistant: 17 + 25 = 42.",
]

# Qwen2.5-style ChatML: a default system message when none is given, tools in the system turn,
# tool calls as <tool_call> JSON, consecutive tool results grouped in one user turn.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Llama-3 Instruct: bos_token written by the template, header tokens around the role, content
# trimmed, <|eot_id|> ends every turn.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Mistral Instruct: the system prompt is folded into the first user turn, roles must alternate
# (raise_exception otherwise), every reply ends with eos.
MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

STYLES = {
    "chatml": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        config=dict(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None),
        template=QWEN25_TEMPLATE, eos_ids=["<|im_end|>", "<|endoftext|>"]),
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"],
        config=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None),
        template=LLAMA3_TEMPLATE, eos_ids=["<|end_of_text|>", "<|eot_id|>"]),
    "mistral": dict(
        specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        config=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token=None,
                    add_bos_token=True, add_eos_token=False),
        template=MISTRAL_TEMPLATE, eos_ids=["</s>"]),
}


def build_test_tokenizer(out_dir: str | Path, style: str = "chatml", vocab_size: int = 300) -> str:
    """Write a tiny byte-level BPE tokenizer folder in the given chat style; returns the path."""
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not one of {sorted(STYLES)}")
    spec = STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["specials"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    if style in ("llama3", "mistral"):
        # HF Llama-3 / Mistral folders prepend bos in tokenizer.json's post-processor (Mistral's
        # tokenizer_config also says add_bos_token=true; transformers reads tokenizer.json).
        bos = spec["config"]["bos_token"]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
              "clean_up_tokenization_spaces": False, **spec["config"], "chat_template": spec["template"]}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    gen = {"eos_token_id": [tok.token_to_id(t) for t in spec["eos_ids"]]}
    if style == "llama3":
        gen["bos_token_id"] = tok.token_to_id("<|begin_of_text|>")
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return str(out)

"""Tokenizer: a Hugging Face tokenizer folder through the `tokenizers` library, chat templates
through jinja2, and an incremental detokenizer for streaming.

The folder layout is HF's: `tokenizer.json` (the fast tokenizer: normalizer, pre-tokenizer, model,
post-processor, decoder, added tokens), `tokenizer_config.json` (named special tokens,
`add_bos_token`/`add_eos_token`, `chat_template`), optionally `chat_template.jinja`,
`special_tokens_map.json` (legacy) and `generation_config.json` (extra EOS ids).

Everything that decides ids or rendered text mirrors transformers' `PreTrainedTokenizerFast`
(v5 `TokenizersBackend`) so encode/decode and `apply_chat_template` give identical results; the
comments say which transformers behaviour each step reproduces.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from lmstack.config import ConfigError, read_json_object

# The named special tokens transformers passes to every chat template (SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may arrive under; transformers copies it to `thinking` and
# `reasoning_content` before rendering, so templates reading either see it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerError(ConfigError):
    """A tokenizer folder or chat template lmstack cannot use; the message names the file or field."""


class ChatTemplateError(TokenizerError):
    """The chat template failed to compile or raised while rendering (e.g. `raise_exception`)."""


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores a special token as a string or an AddedToken dict {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"special token value {value!r} is neither a string nor an AddedToken dict")


def _read_json(path: Path) -> dict:
    return read_json_object(path, TokenizerError)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text ({e})") from None


# ----------------------------------------------------------------------------------------------
# Chat templates: the same jinja environment transformers builds (chat_template_utils.py), so a
# template renders byte-identically: trim_blocks + lstrip_blocks, loop controls, a tojson that does
# not HTML-escape, raise_exception, strftime_now, and a sandbox that forbids mutating objects.
# ----------------------------------------------------------------------------------------------

def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's built-in tojson escapes <, >, & and ' for HTML; chat templates want plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` inside templates, without exposing the dict type itself to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's own signature trick: self is args[0]
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text in some templates (for loss
    masks in transformers); rendering just emits the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (template line {e.lineno})") from e


def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """What transformers does to a conversation before rendering: drop keys whose value is None
    (OpenAI clients send content=None / tool_calls=None; templates handle a missing key, not None)
    and alias reasoning fields."""
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise TokenizerError("cannot apply the chat template to an empty conversation")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TokenizerError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

class Tokenizer:
    """A HF tokenizer folder: `Tokenizer.from_dir(path)`."""

    def __init__(self, backend: HFTokenizer, config: dict | None = None,
                 generation_config: dict | None = None, chat_template: str | dict[str, str] | None = None,
                 path: str | None = None) -> None:
        self._tok = backend
        self.config: dict = dict(config or {})
        self.generation_config: dict = dict(generation_config or {})
        self.chat_template = chat_template
        self.path = path
        # Named special tokens as strings (what templates receive as bos_token, eos_token, ...).
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(self.config.get(name))
            if content is not None:
                self.special_tokens[name] = content
        self._register_special_tokens()
        self._apply_bos_eos_flags()
        # Ids that `decode(skip_special_tokens=True)` drops: every added token flagged special.
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self._is_bpe = type(self._tok.model).__name__ == "BPE"

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        d = Path(path)
        if not d.is_dir():
            raise TokenizerError(f"tokenizer folder {d} does not exist")
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(
                f"{tj} not found: lmstack needs the fast-tokenizer file tokenizer.json in the model folder")
        try:
            backend = HFTokenizer.from_file(str(tj))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise TokenizerError(f"{tj}: cannot be loaded by the tokenizers library ({e})") from e
        config: dict = {}
        if (d / "special_tokens_map.json").is_file():
            # Legacy file: named tokens live here in older folders; tokenizer_config wins.
            config.update(_read_json(d / "special_tokens_map.json"))
        if (d / "tokenizer_config.json").is_file():
            config.update(_read_json(d / "tokenizer_config.json"))
        gen: dict = {}
        if (d / "generation_config.json").is_file():
            gen = _read_json(d / "generation_config.json")
        elif (d / "config.json").is_file():
            # transformers derives the generation config from config.json when the file is absent.
            cfg = _read_json(d / "config.json")
            if cfg.get("eos_token_id") is not None:
                gen = {"eos_token_id": cfg["eos_token_id"]}
        return cls(backend, config, gen, cls._load_chat_template(d, config), str(d))

    @staticmethod
    def _load_chat_template(d: Path, config: dict) -> str | dict[str, str] | None:
        templates: dict[str, str] = {}
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            for i, item in enumerate(raw):
                if not (isinstance(item, Mapping) and isinstance(item.get("name"), str)
                        and isinstance(item.get("template"), str)):
                    raise TokenizerError(
                        f"{d / 'tokenizer_config.json'}: chat_template[{i}] must be {{'name': str, 'template': str}}")
                templates[item["name"]] = item["template"]
        elif raw is not None:
            raise TokenizerError(f"{d / 'tokenizer_config.json'}: chat_template must be a string or a list, "
                                 f"got {type(raw).__name__}")
        # transformers >= 4.43 saves templates as files; they take precedence over the config entry.
        if (d / "chat_template.jinja").is_file():
            templates["default"] = _read_text(d / "chat_template.jinja")
        if (d / "additional_chat_templates").is_dir():
            for f in sorted((d / "additional_chat_templates").glob("*.jinja")):
                templates[f.stem] = _read_text(f)
        if not templates:
            return None
        if list(templates) == ["default"]:
            return templates["default"]
        return templates

    def _register_special_tokens(self) -> None:
        """Make every token the config calls special an added special token of the backend, as
        transformers does at load time (it adds named tokens missing from the vocab, too)."""
        present = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        to_add: list[AddedToken] = []
        decoder_cfg = self.config.get("added_tokens_decoder") or {}
        for idx, t in sorted(decoder_cfg.items(), key=lambda kv: int(kv[0])):
            if isinstance(t, Mapping) and t.get("content") not in present:
                to_add.append(AddedToken(t["content"], single_word=t.get("single_word", False),
                                         lstrip=t.get("lstrip", False), rstrip=t.get("rstrip", False),
                                         normalized=t.get("normalized", False), special=t.get("special", False)))
                present.add(t["content"])
        extra = self.config.get("extra_special_tokens") or self.config.get("additional_special_tokens") or []
        if isinstance(extra, Mapping):
            extra = list(extra.values())
        for tok in [*self.special_tokens.values(), *(_token_content(x) for x in extra)]:
            if tok is not None and tok not in present:
                to_add.append(AddedToken(tok, special=True, normalized=False))
                present.add(tok)
        if to_add:
            self._tok.add_special_tokens(to_add)

    def _apply_bos_eos_flags(self) -> None:
        """`add_bos_token`/`add_eos_token` from tokenizer_config, applied only when tokenizer.json has
        no post-processor. A post-processor in tokenizer.json is authoritative: HF Llama/Mistral
        folders put bos there (consistent with the flags) and transformers v5 ignores the flags
        whenever tokenizer.json exists. A folder with the flags but no post-processor gets
        `[bos] $A [eos]` built from them (transformers' update_post_processor), as the flags intend."""
        if self._tok.post_processor is not None:
            return
        if not self.config.get("add_bos_token") and not self.config.get("add_eos_token"):
            return
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        add_bos = bool(self.config.get("add_bos_token")) and bos is not None
        add_eos = bool(self.config.get("add_eos_token")) and eos is not None
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = []
        if add_bos:
            special.append((bos, self._tok.token_to_id(bos)))
        if add_eos:
            special.append((eos, self._tok.token_to_id(eos)))
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # -- vocabulary ----------------------------------------------------------------------------
    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def _special_id(self, name: str) -> int | None:
        tok = self.special_tokens.get(name)
        return None if tok is None else self._tok.token_to_id(tok)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._special_id("unk_token")

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends generation: tokenizer_config's eos_token plus generation_config's
        eos_token_id (an int or a list; chat models list end-of-turn and end-of-text there)."""
        ids: list[int] = []
        if self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        gen = self.generation_config.get("eos_token_id")
        for i in ([gen] if isinstance(gen, int) else list(gen or [])):
            if int(i) not in ids:
                ids.append(int(i))
        return ids

    # -- encode / decode -----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        # transformers applies this space clean-up only when the folder asks and never to BPE.
        if self.config.get("clean_up_tokenization_spaces") and not self._is_bpe:
            text = (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
                    .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
                    .replace(" 've", "'ve").replace(" 're", "'re"))
        return text

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # -- chat ----------------------------------------------------------------------------------
    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to use, chosen as transformers does: an explicit template (or the name of
        one of the folder's templates) > "tool_use" when tools are given > "default"."""
        if isinstance(self.chat_template, dict):
            if chat_template is not None and chat_template in self.chat_template:
                return self.chat_template[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in self.chat_template:
                    return self.chat_template["tool_use"]
                if "default" in self.chat_template:
                    return self.chat_template["default"]
                raise TokenizerError(f"tokenizer at {self.path} has several chat templates "
                                     f"{sorted(self.chat_template)} and none is named 'default'")
        if chat_template is not None:
            return chat_template
        if self.chat_template is None:
            raise TokenizerError(f"tokenizer at {self.path} has no chat_template (tokenizer_config.json "
                                 "or chat_template.jinja); pass chat_template= or use a chat model")
        return self.chat_template

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            max_chars: int | None = None, **template_kwargs: Any) -> str | list[int]:
        """Render `messages` ([{"role", "content", ...}]) with the folder's jinja chat template,
        byte-identical to transformers' apply_chat_template. `tokenize=True` returns ids, encoded
        without adding special tokens (the template writes bos itself where the model wants it).
        `max_chars`: a rendering that grows past it stops there with a ChatTemplateError (a server's
        bound on what one request's template may produce)."""
        template = compile_chat_template(self.get_chat_template(chat_template, tools))
        if tools is not None:
            for i, t in enumerate(tools):
                if not isinstance(t, Mapping):
                    raise TokenizerError(f"tools[{i}] must be a JSON-schema dict, got {type(t).__name__}")
        chat = _normalize_messages(messages)
        # Template kwargs override the special tokens, which are passed as plain strings.
        variables = {**self.special_tokens, **template_kwargs}
        try:
            pieces = template.generate(messages=chat, tools=tools, documents=documents,
                                       add_generation_prompt=add_generation_prompt, **variables)
            if max_chars is None:
                text = "".join(pieces)
            else:
                out, n = [], 0
                for piece in pieces:  # jinja yields the output as it is produced: stop early
                    n += len(piece)
                    if n > max_chars:
                        raise ChatTemplateError(f"the chat template's output exceeds {max_chars} characters")
                    out.append(piece)
                text = "".join(out)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template error: {e}") from e
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    # -- saving --------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and
        special_tokens_map.json: a folder both lmstack and transformers load."""
        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        cfg = dict(self.config)
        cfg.pop("chat_template", None)
        if isinstance(self.chat_template, str):
            cfg["chat_template"] = self.chat_template
        elif isinstance(self.chat_template, dict):
            cfg["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        cfg.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        with open(d / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(cfg, f, ensure_ascii=False, indent=2)
        with open(d / "special_tokens_map.json", "w", encoding="utf-8") as f:
            json.dump(self.special_tokens, f, ensure_ascii=False, indent=2)

    def __repr__(self) -> str:
        return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, "
                f"model={type(self._tok.model).__name__}, special={self.special_tokens})")


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------

class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals `decode(all_ids)`.

    Decoding token by token is wrong twice over: a byte-level BPE token may hold half of a UTF-8
    character (the decoded tail is then U+FFFD until the rest arrives), and SentencePiece-style
    decoders drop the leading space of the *first* token they see. So, as in vLLM, each step decodes
    a short window `ids[prefix_offset:]` and emits only what it adds beyond `ids[prefix_offset:read_offset]`
    (text already emitted, decoded with the same left context); the step is held back while the
    window's text ends in U+FFFD. The window restarts at the last emitted boundary, so each step
    costs O(window), not O(sequence).

    `prompt_ids` (optional) gives left context: the deltas are then the continuation's text as it
    reads after the prompt (e.g. with a leading space), and `.text` is their concatenation.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 prompt_ids: Sequence[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip = tokenizer.special_ids if skip_special_tokens else frozenset()
        # Ids kept for decoding; skipped special tokens never enter (decode() drops them too).
        self._ids: list[int] = [int(i) for i in (prompt_ids or []) if int(i) not in self._skip]
        # Start the window a few tokens back so the first delta sees the prompt's tail as context.
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - 6, 0)
        self.token_ids: list[int] = []  # every id added, special or not
        self._pieces: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def add(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text ("" while a character is partial)."""
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if token_id in self._skip:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            # Either an incomplete UTF-8 sequence or a token that adds no text yet.
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._pieces.append(delta)
        return delta

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: emit whatever is held back (a genuinely invalid byte tail decodes to U+FFFD,
        exactly as `decode` renders it)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

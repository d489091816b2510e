"""`lmstack chat`: a terminal chat that streams replies, locally or against a running server.

    lmstack chat --model DIR|X.gguf               # loads the model with the engine
    lmstack chat --url http://127.0.0.1:8000      # talks to `lmstack serve` (/v1/chat/completions)

Lines are read from stdin (a terminal or a pipe). Commands: `/system TEXT` sets the system message,
`/reset` clears the conversation (keeping the system message), `/exit` quits. Replies go to stdout,
one per turn followed by a newline; notices and errors go to stderr, so piped output is just the replies.
The server client uses urllib from the standard library, so the library needs no HTTP client package.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any, Iterator

HELP = "commands: /system TEXT (set the system message), /reset (clear history), /exit"


# ---------------------------------------------------------------------------------------- backends
class LocalChat:
    """Replies from an in-process engine, through the tokenizer's chat template."""

    def __init__(self, args: argparse.Namespace) -> None:
        import os

        import torch

        from lmstack.engine.llm import LLM
        from lmstack.engine.server import engine_kwargs

        torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.llm = LLM(args.model, **engine_kwargs(args))
        if self.llm.tokenizer is None:
            raise ValueError(f"{args.model} has no tokenizer.json; `lmstack chat` needs a tokenizer with a "
                             "chat template")
        self.args = args

    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    def fit(self, messages: list[dict]) -> list[dict]:
        """Drop the oldest turns (never the system message or the last user turn) until the prompt
        leaves room for a reply inside max_model_len."""
        msgs = list(messages)
        limit = self.llm.max_model_len
        while len(self._prompt_ids(msgs)) >= limit - 1:
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(msgs) - first <= 1:
                raise ValueError(f"this message alone is {len(self._prompt_ids(msgs))} tokens; the model's "
                                 f"context is {limit} tokens")
            del msgs[first:first + 2]  # one user + assistant exchange
        return msgs

    def reply(self, messages: list[dict]) -> Iterator[str]:
        from lmstack.engine.sampling_params import SamplingParams

        ids = self._prompt_ids(messages)
        a = self.args
        max_tokens = min(a.max_tokens, self.llm.max_model_len - len(ids))
        params = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                                max_tokens=max_tokens)
        yield from self.llm.stream(ids, params)


class RemoteChat:
    """Replies from `lmstack serve` (or any OpenAI-compatible server), streamed over SSE."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.base = args.url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.args = args
        self.headers = {"Content-Type": "application/json"}
        if args.api_key:
            self.headers["Authorization"] = f"Bearer {args.api_key}"
        self.model = args.model or self._first_model()

    def _open(self, path: str, body: dict | None = None, timeout: float = 600.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, headers=self.headers,
                                     method="POST" if body is not None else "GET")
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read().decode())["error"]["message"]
            except Exception:
                msg = e.reason
            raise ValueError(f"server answered {e.code}: {msg}") from None
        except urllib.error.URLError as e:
            raise ConnectionError(f"cannot reach {self.base}: {e.reason}") from None

    def _first_model(self) -> str:
        with self._open("/models", timeout=30.0) as r:
            data = json.loads(r.read().decode())["data"]
        if not data:
            raise ValueError(f"{self.base}/models lists no model")
        return data[0]["id"]

    def fit(self, messages: list[dict]) -> list[dict]:
        return messages  # the server checks the context length and answers 400 with the numbers

    def reply(self, messages: list[dict]) -> Iterator[str]:
        a = self.args
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "max_tokens": a.max_tokens, "temperature": a.temperature, "top_p": a.top_p}
        if a.top_k:
            body["top_k"] = a.top_k
        if a.seed is not None:
            body["seed"] = a.seed
        with self._open("/chat/completions", body) as r:
            for raw in r:  # server-sent events: "data: {...}" lines separated by blank lines
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    raise ValueError(f"server error: {event['error'].get('message')}")
                for choice in event.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text


# ---------------------------------------------------------------------------------------- the loop
def chat_loop(backend: Any, stdin: Any, stdout: Any, stderr: Any, system: str | None = None) -> int:
    history: list[dict] = []
    interactive = hasattr(stdin, "isatty") and stdin.isatty()

    def note(msg: str) -> None:
        stderr.write(msg + "\n")
        stderr.flush()

    if interactive:
        note(f"lmstack chat: {HELP}")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, rest = line.partition(" ")
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                history = []
                note("(conversation cleared)")
            elif cmd == "/system":
                system = rest.strip() or None
                note(f"(system message {'set' if system else 'cleared'})")
            else:
                note(f"unknown command {cmd!r}; {HELP}")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line})
        try:
            messages = backend.fit(messages)
            pieces = []
            for delta in backend.reply(messages):
                pieces.append(delta)
                stdout.write(delta)
                stdout.flush()
        except (ValueError, ConnectionError) as e:
            note(f"error: {e}")
            continue
        stdout.write("\n")
        stdout.flush()
        first = 1 if system else 0
        history = messages[first:] + [{"role": "assistant", "content": "".join(pieces)}]
    return 0


# ---------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> None:
    from lmstack.engine.server import add_engine_args

    p = subparsers.add_parser("chat", help="chat with a model in the terminal (streams replies)")
    p.add_argument("--model", default=None, help="HF model folder or .gguf file (local), or the model name to ask a "
                   "server for")
    p.add_argument("--url", default=None, help="talk to a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="bearer key for --url")
    p.add_argument("--system", default=None, help="initial system message")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, stdin: Any = None, stdout: Any = None, stderr: Any = None) -> int:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.url is None and args.model is None:
        raise ValueError("give --model DIR (local engine) or --url http://host:port (a running server)")
    backend: Any = RemoteChat(args) if args.url else LocalChat(args)
    return chat_loop(backend, stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr, system=args.system)

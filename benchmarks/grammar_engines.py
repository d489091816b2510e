"""Grammar engines for structured output, measured on this CPU: xgrammar vs llguidance vs outlines-core.

Vocabulary: a 150,000-token byte-level BPE (Qwen2.5-like: 256 byte tokens, GPT-2 split regex, ChatML
specials) trained here with `tokenizers` on generated text (benchmarks/_bpe_vocab.py; no download).
Constraints (the four kinds a request can carry): a realistic nested JSON schema (an order: nested
objects, an array of objects with min/max items, integer bounds, enum, nullable, string patterns),
json_object (any JSON object), a regex (an e-mail address) and a CFG (a small SQL SELECT grammar in
GBNF, the `grammar` form vLLM accepts).

Measured per engine and constraint:
  - compile: from the constraint text to what a request's matcher is created from (xgrammar
    GrammarCompiler.compile_*, cache off; llguidance LLMatcher construction; outlines-core Index),
    median of --reps cold runs;
  - first mask: filling the first token mask of a fresh matcher (llguidance builds lexer states
    lazily, so part of its work lands here): compile + first mask is what delays a request's first token;
  - mask at batch 32: 32 matchers, each step fills all 32 rows of a (32, V/32) int32 bitmask with
    the engine's batch API (xgrammar BatchGrammarMatcher, llguidance LLExecutor; outlines-core has
    none: one write_mask_into per row), then advances every matcher with a token drawn from its own
    mask (seeded; half the draws from the allowed ids < 2000, the short, frequent BPE tokens, so
    outputs move through the structure instead of staying in one long string); a matcher that
    finishes (EOS drawn, or nothing but EOS allowed) restarts. Reported: fill and advance, ms per step
    of 32 rows, over --steps steps.
The one-time per-tokenizer setup (xgrammar TokenizerInfo, llguidance LLTokenizer, outlines-core
Vocabulary) is printed too.

Result (2 cores of a Sapphire-Rapids-class Xeon with AMX, shared with other jobs; xgrammar 0.2.9,
llguidance 1.9.1, outlines-core 0.2.14; one run, 128 steps, medians of 3):
                                 xgrammar   llguidance   outlines-core
  compile + first mask (ms)
    json_schema                      68.9          2.4          5930
    json_object                       8.1          0.4          7424
    regex                           567.5          1.9           453
    grammar (CFG)                    36.1          1.3           n/a (regular languages only)
  mask fill + advance, batch 32, 1 thread (ms/step)
    json_schema                      0.18         1.51          3.78
    json_object                      0.19         0.33          5.90
    regex                           38.6         20.4           4.33
    grammar                          0.23         0.62           n/a
  (2 threads: json_schema 0.35 / 1.48 / 3.81, regex 21.5 / 20.8 / 3.9)
Mask speed: xgrammar won on JSON (8.6x llguidance on the schema with 1 thread, 4.3x with 2) and on the
CFG (2.7x); llguidance beat xgrammar on the regex (1.9x), outlines-core (a precomputed DFA index) was
fastest there. Compile: llguidance won by 19-290x (it builds lexer states lazily); outlines-core
needs seconds per schema at 150k tokens. Choice: llguidance. Its extra per-token cost is ~1.3 ms per
step of 32 sequences (about 1-2% of a decode step; the whole engine cost is measured by
benchmarks/structured.py), while xgrammar's 8-570 ms compile lands on the first token of every
request with a new schema or regex. Two findings beyond timing decided it too: xgrammar compiles
schemas with keywords it does not enforce and drops them silently (checked: it accepts [1,1] under
uniqueItems, "x" under {"not": {"type": "string"}}, {"a":1} under dependentRequired a -> b), so a
`strict` output could violate its schema, where llguidance refuses them by name; and xgrammar requires transformers and triton (~1 GB) at runtime, llguidance
has no dependencies.

    python benchmarks/grammar_engines.py [--vocab 150000] [--batch 32] [--steps 64] [--threads N]
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

from _bpe_vocab import SPECIALS, bpe_tokenizer

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 64},
                "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9]+\\.[a-z]{2,4}$"},
                "vip": {"type": "boolean"},
            },
            "required": ["name", "email", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array", "minItems": 1, "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 16},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "notes": {"type": ["string", "null"]},
        "shipping": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["order_id", "customer", "items", "status", "notes", "shipping"],
    "additionalProperties": False,
}
EMAIL_REGEX = r"[a-z0-9._%+-]{1,32}@[a-z0-9-]{1,24}\.(com|org|net|io)"
SQL_GBNF = r"""root ::= "SELECT " cols " FROM " ident where? ";"
cols ::= "*" | ident (", " ident)*
where ::= " WHERE " cond (" AND " cond)*
cond ::= ident " " op " " value
op ::= "=" | "<" | ">" | "<=" | ">=" | "!="
value ::= [0-9]+ | "'" [a-zA-Z0-9 ]* "'"
ident ::= [a-z_] [a-z0-9_]*
"""
KINDS = ("json_schema", "json_object", "regex", "grammar")


class Unsupported(Exception):
    pass


# ------------------------------------------------------------------------------------------ engines
class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, eos: int, threads: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        V = tok.get_vocab_size()
        enc = [""] * V
        for t, i in tok.get_vocab().items():
            enc[i] = t
        self.info = xgr.TokenizerInfo(enc, xgr.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=[eos])
        self.set_threads(threads)

    def set_threads(self, n: int) -> None:
        self.threads = n
        self.batch = self.xgr.BatchGrammarMatcher(max_threads=n)

    def compile(self, kind: str) -> Any:
        c = self.xgr.GrammarCompiler(self.info, max_threads=self.threads, cache_enabled=False)
        if kind == "json_schema":
            return c.compile_json_schema(json.dumps(ORDER_SCHEMA), any_whitespace=True)
        if kind == "json_object":
            return c.compile_builtin_json_grammar()
        if kind == "regex":
            return c.compile_regex(EMAIL_REGEX)
        return c.compile_grammar(SQL_GBNF)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list, bitmask: np.ndarray, tbitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, tbitmask)

    def accept(self, matchers: list, tokens: list[int]) -> None:
        ok = self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens)
        assert all(ok), "xgrammar rejected a token from its own mask"

    def finished(self, m: Any) -> bool:
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, eos: int, threads: int) -> None:
        import llguidance as ll
        import llguidance.numpy as lnp

        self.ll, self.lnp = ll, lnp
        self.tok = ll.LLTokenizer(tok.to_str(), n_vocab=tok.get_vocab_size(), eos_token=eos)
        self.set_threads(threads)

    def set_threads(self, n: int) -> None:
        self.executor = self.ll.LLExecutor(num_threads=n)

    def compile(self, kind: str) -> Any:
        ll = self.ll
        if kind == "json_schema":
            g = ll.LLMatcher.grammar_from_json_schema(ORDER_SCHEMA, defaults={"whitespace_flexible": True})
        elif kind == "json_object":
            g = ll.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults={"whitespace_flexible": True})
        elif kind == "regex":
            g = ll.LLMatcher.grammar_from_regex(EMAIL_REGEX)
        else:
            g = ll.grammar_from("grammar", SQL_GBNF)
        m = ll.LLMatcher(self.tok, g, log_level=0)
        if m.is_error():
            raise Unsupported(m.get_error())
        return m  # the compiled grammar; request matchers are deep copies

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matchers: list, bitmask: np.ndarray, tbitmask) -> None:
        self.lnp.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matchers: list, tokens: list[int]) -> None:
        for m, t in zip(matchers, tokens):
            if not m.consume_token(t):
                raise AssertionError(f"llguidance rejected a token from its own mask: {m.get_error()}")

    def finished(self, m: Any) -> bool:
        return m.is_stopped()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok, eos: int, threads: int) -> None:
        import outlines_core as oc

        self.oc = oc
        # byte-level BPE: each token string is its bytes through GPT-2's byte -> unicode table
        bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        cs, n = bs[:], 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        unbyte = {chr(c): b for b, c in zip(bs, cs)}
        vocab: dict[bytes, list[int]] = {}
        for t, i in tok.get_vocab().items():
            if t not in SPECIALS:
                vocab.setdefault(bytes(unbyte[ch] for ch in t), []).append(i)
        self.vocab = oc.Vocabulary(eos, vocab)
        self.eos = eos

    def set_threads(self, n: int) -> None:
        pass  # no batch API: one row at a time

    def compile(self, kind: str) -> Any:
        from outlines_core.json_schema import build_regex_from_schema

        if kind == "json_schema":
            rx = build_regex_from_schema(json.dumps(ORDER_SCHEMA))
        elif kind == "json_object":  # not regular: the library's bounded-depth approximation
            rx = build_regex_from_schema(json.dumps({"type": "object"}))
        elif kind == "regex":
            rx = EMAIL_REGEX
        else:
            raise Unsupported("no context-free grammars (regular languages only)")
        return self.oc.Index(rx, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, matchers: list, bitmask: np.ndarray, tbitmask) -> None:
        W = bitmask.shape[1]
        base = bitmask.ctypes.data
        for i, g in enumerate(matchers):
            g.write_mask_into(base + i * W * 4, W, 4)

    def accept(self, matchers: list, tokens: list[int]) -> None:
        for g, t in zip(matchers, tokens):
            if t != self.eos:
                g.advance(t, return_tokens=False)

    def finished(self, m: Any) -> bool:
        return m.is_finished() and m.get_tokens() == [self.eos]


ENGINES: dict[str, Callable] = {"xgrammar": XGrammar, "llguidance": LLGuidance, "outlines-core": OutlinesCore}
PACKAGES = {"xgrammar": "xgrammar", "llguidance": "llguidance", "outlines-core": "outlines_core"}


# ------------------------------------------------------------------------------------------ timing
def _ms(f: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    r = f()
    return (time.perf_counter() - t) * 1e3, r


def walk(engine, compiled, V: int, eos: int, batch: int, steps: int, seed: int) -> tuple[float, float]:
    """One seeded walk of `batch` matchers for `steps` steps: (fill, advance) ms per step."""
    import torch

    tb = torch.full((batch, (V + 31) // 32), -1, dtype=torch.int32)
    bm = tb.numpy()  # shares memory with tb
    rng = np.random.default_rng(seed)
    matchers = [engine.matcher(compiled) for _ in range(batch)]
    fill_t = acc_t = 0.0
    for _ in range(steps):
        ms, _ = _ms(lambda: engine.fill(matchers, bm, tb))
        fill_t += ms
        bits = np.unpackbits(bm.view(np.uint8), axis=1, bitorder="little")[:, :V]
        toks = []
        for i in range(batch):
            allowed = np.flatnonzero(bits[i])
            short = allowed[allowed < 2000]
            pool = short if len(short) and rng.random() < 0.5 else allowed
            toks.append(int(pool[rng.integers(len(pool))]))
        ms, _ = _ms(lambda: engine.accept(matchers, toks))
        acc_t += ms
        for i, t in enumerate(toks):
            if t == eos or engine.finished(matchers[i]):
                matchers[i] = engine.matcher(compiled)
    return fill_t / steps, acc_t / steps


def measure(engine, kind: str, V: int, eos: int, batch: int, steps: int, reps: int, rounds: int,
            threads: list[int], seed: int) -> dict:
    import torch

    times, compiled = [], None
    for _ in range(reps):
        ms, compiled = _ms(lambda: engine.compile(kind))
        times.append(ms)
        if ms > 5000:  # one cold run is enough for a slow compile
            break
    out: dict[str, Any] = {"compile": statistics.median(times)}
    tb = torch.full((1, (V + 31) // 32), -1, dtype=torch.int32)
    m0 = engine.matcher(compiled)
    out["first_mask"], _ = _ms(lambda: engine.fill([m0], tb.numpy(), tb))
    for n in threads:
        engine.set_threads(n)
        runs = [walk(engine, compiled, V, eos, batch, steps, seed) for _ in range(rounds)]  # same walk each round
        out[f"fill@{n}"] = statistics.median(r[0] for r in runs)
        out[f"accept@{n}"] = statistics.median(r[1] for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="cold compiles per constraint (median)")
    ap.add_argument("--rounds", type=int, default=3, help="repeats of each mask walk (median)")
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(f"building / loading a {args.vocab}-token byte-level BPE ...", flush=True)
    tok = bpe_tokenizer(args.vocab)
    V = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>")
    res: dict[str, dict[str, Any]] = {}
    for name in args.engines:
        print(f"{name}: tokenizer setup ...", flush=True)
        setup_ms, eng = _ms(lambda: ENGINES[name](tok, eos, max(args.threads)))
        res[name] = {"setup": setup_ms}
        for kind in KINDS:
            print(f"{name}: {kind} ...", flush=True)
            try:
                res[name][kind] = measure(eng, kind, V, eos, args.batch, args.steps, args.reps, args.rounds,
                                          args.threads, args.seed)
            except Unsupported as e:
                res[name][kind] = str(e)
            except Exception as e:  # an engine that fails on a constraint: shown in the table
                res[name][kind] = f"error: {type(e).__name__}: {str(e)[:60]}"

    names = args.engines
    versions = {n: importlib.metadata.version(PACKAGES[n]) for n in names}
    print(f"\nvocabulary {V} tokens, batch {args.batch}, {args.steps} steps (median of {args.rounds}), "
          f"compile median of {args.reps}, CPU threads {args.threads}")
    print(f"{'':36s}" + "".join(f"{n + ' ' + versions[n]:>22s}" for n in names))
    print(f"{'tokenizer setup, once (ms)':36s}" + "".join(f"{res[n]['setup']:22.1f}" for n in names))
    rows = [("compile", "compile (ms)"), ("first_mask", "first mask (ms)")]
    for t in args.threads:
        rows += [(f"fill@{t}", f"fill x{args.batch}, {t} thr (ms/step)"), (f"accept@{t}", f"advance x{args.batch} (ms/step)")]
    for field, label in rows:
        for kind in KINDS:
            cells = [f"{res[n][kind][field]:22.3f}" if isinstance(res[n][kind], dict) else f"{'n/a':>22s}"
                     for n in names]
            print(f"{label + ' ' + kind:36s}"[:36] + "".join(cells))
    for n in names:
        for kind in KINDS:
            if not isinstance(res[n][kind], dict):
                print(f"  n/a: {n} {kind}: {res[n][kind]}")
    # ratios to the fastest engine per row: per-token cost = fill + advance of the whole batch
    for t in args.threads:
        print(f"\nper-token cost at batch {args.batch}, {t} thread(s) (fill + advance, ms/step; x = ratio to the fastest):")
        for kind in KINDS:
            costs = {n: res[n][kind][f"fill@{t}"] + res[n][kind][f"accept@{t}"] for n in names
                     if isinstance(res[n][kind], dict)}
            best = min(costs.values())
            print(f"  {kind:12s} " + "  ".join(f"{n} {c:.3f} ({c / best:.1f}x)" for n, c in costs.items()))
    print("\ncompile + first mask (ms; x = ratio to the fastest):")
    for kind in KINDS:
        costs = {n: res[n][kind]["compile"] + res[n][kind]["first_mask"] for n in names
                 if isinstance(res[n][kind], dict)}
        best = min(costs.values())
        print(f"  {kind:12s} " + "  ".join(f"{n} {c:.1f} ({c / best:.1f}x)" for n, c in costs.items()))


if __name__ == "__main__":
    main()

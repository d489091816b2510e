"""LLM: the offline, streaming and engine-level API (names follow vLLM's).

    llm = LLM("path/to/hf_model")  # or a .gguf file; dtype="auto": lmstack.precision's rule (bf16 where the CPU multiplies bf16 natively, else fp32)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text

Engine level (what the HTTP server drives): `add_request(request_id, prompt, params)`, then call
`step()` repeatedly; each call runs one scheduler iteration + one forward + sampling and returns a
RequestOutput for every request that produced tokens or finished in it (cumulative text/ids plus
`delta_*` fields for streaming). `abort(request_id)` frees the request's KV blocks at once.
"""
from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import Any, Iterator, Sequence as Seq

import torch

from lmstack.engine.block_manager import BlockManager
from lmstack.engine.model_runner import ModelRunner, kv_bytes_per_block
from lmstack.malloc import keep_freed_memory
from lmstack.model.layers import drop_packed_weights
from lmstack.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from lmstack.engine.prompt_logprobs import record
from lmstack.engine.sampler import Sampler, SampleRow
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.scheduler import Scheduler
from lmstack.engine.sequence import Logprob, Request, RequestMetrics, Sequence
from lmstack.log import logger, progress

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineStats", "RequestMetrics", "Logprob"]

DEFAULT_KV_CACHE_MEMORY = 1 << 30  # bytes, when neither kv_cache_memory nor num_kv_blocks is given

PromptType = str | list[int]


def _module_compute(model: torch.nn.Module, dtype: str) -> bool:
    """How an engine over a live module computes: in the module's own dtype ("auto" or that dtype), or,
    for an fp32 module and dtype "bfloat16", with bf16 linears over packed bf16 roundings of the fp32
    weights (fast rollouts from an fp32 policy, as vLLM serves bf16 weights next to fp32 training).
    Returns whether the linears run in bf16."""
    if dtype == "auto":
        return False
    from lmstack.model.loading import resolve_dtype

    want = resolve_dtype(dtype)
    if want == model.dtype:
        return False
    if want == torch.bfloat16 and model.dtype == torch.float32:
        return True
    raise ValueError(f"dtype={dtype!r}: an engine over a live module runs in the module's dtype ({model.dtype}), "
                     "or with bfloat16 linears over a float32 module; it never converts the weights")


class LLM:
    def __init__(self, model: str | Path | torch.nn.Module, dtype: str = "auto", tokenizer: Any = None,
                 block_size: int = 16, kv_cache_memory: int | None = None, num_kv_blocks: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, max_model_len: int | None = None, seed: int = 0) -> None:
        keep_freed_memory()  # reuse freed heap across steps instead of page-faulting every large tensor anew
        extra_eos: list[int] = []
        bf16_linears = False
        if isinstance(model, (str, Path)):
            from lmstack.model.loading import load_model
            from lmstack.precision import compute_dtype

            model_dir = Path(model)
            dt = compute_dtype(dtype, what=str(model_dir))  # the one rule for "auto" (lmstack.precision)
            if model_dir.suffix == ".gguf":  # weights and tokenizer both live in the one file
                from lmstack.checkpoint.gguf.load import load_gguf_model

                self.model, gguf_tok = load_gguf_model(model_dir, dt)
                tokenizer = tokenizer or gguf_tok
            else:
                self.model = load_model(model_dir, dtype=dt)
            if tokenizer is None and (model_dir / "tokenizer.json").is_file():
                tokenizer = str(model_dir)
            gen_cfg = model_dir / "generation_config.json"
            if gen_cfg.is_file():
                eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
                extra_eos = [eos] if isinstance(eos, int) else list(eos or [])
        elif isinstance(model, torch.nn.Module):
            self.model = model  # live weights (RL rollouts): no copy, no dtype change
            bf16_linears = _module_compute(model, dtype)
        else:
            raise TypeError(f"model must be a model directory or a Transformer module, got {type(model).__name__}")
        if isinstance(tokenizer, (str, Path)):
            from lmstack.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_dir(tokenizer)
        self.tokenizer = tokenizer
        cfg = self.model.config
        self.eos_token_ids: set[int] = set(cfg.eos_token_ids) | set(extra_eos)
        if tokenizer is not None:
            self.eos_token_ids |= set(tokenizer.eos_token_ids)

        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        # bf16 linears over an fp32 module keep K/V in bf16 too: decode attention is bound by K/V bytes
        kv_dtype = torch.bfloat16 if bf16_linears else self.model.dtype
        per_block = kv_bytes_per_block(self.model, block_size, kv_dtype)
        if num_kv_blocks is None:
            mem = kv_cache_memory if kv_cache_memory is not None else DEFAULT_KV_CACHE_MEMORY
            num_kv_blocks = mem // per_block
            if kv_cache_memory is None:  # never more than every slot filled to max length
                num_kv_blocks = min(num_kv_blocks, max_num_seqs * -(-self.max_model_len // block_size))
            if num_kv_blocks < 1:
                raise ValueError(f"kv_cache_memory {mem} bytes is smaller than one KV block ({per_block} bytes)")
        self.block_size = block_size
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill)
        self.runner = ModelRunner(self.model, num_kv_blocks, block_size, kv_dtype, bf16_linears)
        self.sampler = Sampler()
        self._rng = random.Random(seed)
        self._requests: dict[str, Request] = {}
        self._generators: dict[int, torch.Generator] = {}
        self._pending: list[RequestOutput] = []  # aborted requests, reported by the next step()
        self._ids = itertools.count()
        self._num_prompt_tokens = 0
        self._num_generated = 0
        self._num_finished = 0
        self._grammars: Any = None  # structured.grammar.GrammarCompiler, built on the first constrained request
        logger.debug("engine: %d KV blocks x %d tokens (%.1f MiB)", num_kv_blocks, block_size,
                     num_kv_blocks * per_block / 2**20)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer: Any = None, **engine_args: Any) -> "LLM":
        """An engine over an already-built model (e.g. the policy being trained): shares its weights.
        The engine fuses q/k/v and gate/up (the Parameters become slices of one weight each; use
        lmstack's save_model, as safetensors' own save refuses tensors that share memory) and, for
        bf16 on CPU, keeps packed weight copies that follow in-place updates (layers.PackedWeight).
        dtype="bfloat16" over an fp32 module runs the linears on such copies in bf16 and keeps K/V in
        bf16 (fast rollouts; the module's own weights stay fp32)."""
        return cls(model, tokenizer=tokenizer, **engine_args)

    def reset_cache(self) -> None:
        """Forget the prefix cache and packed weight copies (call after the weights changed, e.g. between
        RL iterations; packed copies also notice in-place updates by themselves, but not `.data` writes)."""
        self.block_manager.reset_prefix_cache()
        drop_packed_weights(self.model)
        if self.runner.cpp_decode is not None:
            self.runner.cpp_decode.reset()  # its plan holds the packed copies too

    # ------------------------------------------------------------------ requests
    def _encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or LLM(..., tokenizer=...)")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _make_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if params.stop_strs and self.tokenizer is None:
            raise ValueError("SamplingParams.stop (stop strings) needs a tokenizer; use stop_token_ids instead")
        if params.structured_outputs is not None:
            self._grammar_compiler().compile(params.structured_outputs)  # a bad constraint fails here, alone
        text, ids = self._encode(prompt)
        n = len(ids)
        if n == 0:
            raise ValueError("the prompt is empty (0 tokens)")
        V = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens, which leaves no room to generate within "
                             f"max_model_len {self.max_model_len}")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n
        if n + max_tokens > self.max_model_len:
            raise ValueError(f"prompt has {n} tokens and max_tokens is {max_tokens}: {n + max_tokens} tokens "
                             f"exceed max_model_len {self.max_model_len}")
        blocks = self.block_manager.blocks_needed(n + max_tokens)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) needs {blocks} KV blocks but the whole pool has "
                f"{self.block_manager.num_blocks} blocks of {self.block_size} tokens; raise num_kv_blocks / "
                "kv_cache_memory or lower max_tokens")
        if params.max_tokens is None:
            params = params.clone(max_tokens=max_tokens)
        base_seed = params.seed if params.seed is not None else self._rng.randrange(2**62)
        req = Request(request_id, text, ids, params, base_seed=base_seed)
        req.seqs.append(self._new_seq(req, 0, ids))
        return req

    def _new_seq(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        # sample i of a request gets its own stream, derived from the request seed
        seed = (req.base_seed + index * 0x9E3779B97F4A7C15) % 2**63
        seq = Sequence(req, index, token_ids, seed)
        if req.params.structured_outputs is not None:  # one matcher per sample (compiled in _make_request)
            seq.grammar = self._grammar_compiler().matcher(req.params.structured_outputs)
        if self.tokenizer is not None:
            from lmstack.tokenizer import IncrementalDetokenizer

            seq.detok = IncrementalDetokenizer(self.tokenizer, req.params.skip_special_tokens,
                                               prompt_ids=req.prompt_token_ids)
        return seq

    def _grammar_compiler(self) -> Any:
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("SamplingParams.structured_outputs needs a tokenizer; pass LLM(..., tokenizer=...)")
            from lmstack.engine.structured.grammar import GrammarCompiler

            self._grammars = GrammarCompiler.from_tokenizer(self.tokenizer, self.model.config.vocab_size,
                                                            sorted(self.eos_token_ids))
        return self._grammars

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> None:
        """Queue one request. Raises ValueError (nothing queued) if it can never be served."""
        req = self._make_request(str(request_id), prompt, params or SamplingParams())
        self._add(req)

    def _add(self, req: Request) -> None:
        self._requests[req.request_id] = req
        self.scheduler.add(req.seqs[0])

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; the next step() reports it with finish_reason 'abort'."""
        req = self._requests.pop(str(request_id), None)
        if req is None:
            return
        req.aborted = True
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                self._generators.pop(seq.seq_id, None)
        req.metrics.finished_time = time.perf_counter()
        self._pending.append(self._request_output(req))

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------ one iteration
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.scheduler.has_unfinished():
                raise RuntimeError("scheduler made no progress with requests pending (KV pool too small?)")
            return outputs
        now = time.perf_counter()
        # decodes first (the runner batches them), then prefill chunks
        order = sorted(range(len(sched.seqs)), key=lambda i: sched.num_new_tokens[i] != 1)
        seqs = [sched.seqs[i] for i in order]
        nums = [sched.num_new_tokens[i] for i in order]
        starts = [s.num_computed_tokens for s in seqs]
        token_ids = [s.token_ids[c:c + k] for s, c, k in zip(seqs, starts, nums)]
        sample_mask = [c + k == s.num_tokens for s, c, k in zip(seqs, starts, nums)]
        for s in seqs:
            if s.request.metrics.first_scheduled_time is None:
                s.request.metrics.first_scheduled_time = now
        for s, c, k in zip(seqs, starts, nums):
            self._num_prompt_tokens += max(0, min(c + k, s.num_prompt_tokens) - c)

        self.runner.copy_blocks(sched.blocks_to_copy)
        capture: dict[int, torch.Tensor | None] = {
            i: None for i, (s, c) in enumerate(zip(seqs, starts))
            if s.request.prompt_logprobs is not None and c < s.num_prompt_tokens - 1}
        tables = [s.block_table for s in seqs]
        logits = (self.runner.execute(token_ids, starts, tables, sample_mask, capture=capture) if capture
                  else self.runner.execute(token_ids, starts, tables, sample_mask))
        for i, hidden in capture.items():
            self._record_prompt_logprobs(seqs[i], starts[i], hidden)
        self.scheduler.update_after_step(sched)

        # rows to sample: one per finished-pending sequence; n > 1 forks share the prompt's row
        row_seqs: list[Sequence] = []
        row_index: list[int] = []
        r = 0
        for s, m in zip(seqs, sample_mask):
            if not m:
                continue
            row_seqs.append(s)
            row_index.append(r)
            req = s.request
            if req.params.n > 1 and not req.forked and s.index == 0:
                req.forked = True
                for i in range(1, req.params.n):
                    child = self._new_seq(req, i, s.token_ids)
                    req.seqs.append(child)
                    self.scheduler.fork(s, child)
                    row_seqs.append(child)
                    row_index.append(r)
            r += 1
        if not row_seqs:
            return outputs
        if len(row_index) != logits.shape[0] or row_index != list(range(len(row_index))):
            logits = logits[torch.tensor(row_index)]
        now = time.perf_counter()
        touched: dict[str, Request] = {}
        scored_only = [i for i, s in enumerate(row_seqs) if s.params.max_tokens == 0]
        for i in scored_only:  # max_tokens=0: the prompt was scored; nothing is sampled
            row_seqs[i].finish_reason = "length"
        if scored_only:
            keep = [i for i in range(len(row_seqs)) if i not in set(scored_only)]
            done = [row_seqs[i] for i in scored_only]
            row_seqs, logits = [row_seqs[i] for i in keep], logits[torch.tensor(keep, dtype=torch.long)]
        else:
            done = []
        rows, ok = [], []
        for i, s in enumerate(row_seqs):
            try:
                rows.append(self._sample_row(s))
                ok.append(i)
            except Exception as e:  # e.g. a grammar that fails: this request stops, the batch goes on
                self._fail(s.request, e)
                touched[s.request.request_id] = s.request
        if len(ok) < len(row_seqs):
            row_seqs, logits = [row_seqs[i] for i in ok], logits[torch.tensor(ok, dtype=torch.long)]
        result = self.sampler(logits, rows) if rows else None
        pairs = list(zip(row_seqs, result.token_ids, result.logprobs)) if result is not None else []
        for s in done:
            self.scheduler.finish(s)
            self._generators.pop(s.seq_id, None)
            touched[s.request.request_id] = s.request
        for s, tok, lp in pairs:
            req = s.request
            touched[req.request_id] = req
            if req.error is not None:  # another sample of the request failed this step
                continue
            try:
                self._append_token(s, tok, lp)
            except Exception as e:  # detokenizing, stop strings, grammar: one request's problem
                self._fail(req, e)
                continue
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            if s.finish_reason is not None:
                self.scheduler.finish(s)
                self._generators.pop(s.seq_id, None)
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = now
                self._requests.pop(req.request_id, None)
                self._num_finished += 1
            outputs.append(self._request_output(req))
        return outputs

    def _fail(self, req: Request, e: Exception) -> None:
        """Processing `req` raised: stop it alone (KV blocks freed, finish_reason "abort", the error kept
        for its RequestOutput), as a client abort would; the rest of the batch is unaffected."""
        logger.exception("request %s failed and was stopped", req.request_id)
        req.error = f"{type(e).__name__}: {e}"
        req.aborted = True  # finished even before an n > 1 request forked
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                self._generators.pop(seq.seq_id, None)

    def _record_prompt_logprobs(self, seq: Sequence, start: int, hidden: torch.Tensor | None) -> None:
        if hidden is None:
            return
        tok = self.tokenizer
        decode = (lambda t: tok.decode([t], skip_special_tokens=False)) if tok is not None else None
        record(seq, start, hidden, self.model.compute_logits, decode)

    def _sample_row(self, seq: Sequence) -> SampleRow:
        p = seq.params
        gen = None
        if not p.greedy:
            gen = self._generators.get(seq.seq_id)
            if gen is None:
                gen = torch.Generator()
                gen.manual_seed(seq.sampling_seed)
                self._generators[seq.seq_id] = gen
        banned = None
        if seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids or []) + ([] if p.ignore_eos else sorted(self.eos_token_ids))
        if seq.grammar is not None:
            seq.grammar.advance(seq.output_token_ids)  # a no-op unless it is behind (keyed by token count)
        if p.needs_penalties:
            return SampleRow(p, gen, seq.token_ids[:seq.num_prompt_tokens], seq.output_token_ids, banned, seq.grammar)
        return SampleRow(p, gen, None, None, banned, seq.grammar)

    def _append_token(self, seq: Sequence, tok: int, lp: dict[int, Logprob] | None) -> None:
        p = seq.params
        seq.token_ids.append(tok)
        self._num_generated += 1
        if seq.logprobs is not None and lp is not None:
            if self.tokenizer is not None:
                for t, l in lp.items():
                    l.decoded_token = self.tokenizer.decode([t], skip_special_tokens=False)
            seq.logprobs.append(lp)
            seq.cumulative_logprob += lp[tok].logprob
        finish, reason = None, None
        if not p.ignore_eos and tok in self.eos_token_ids and seq.num_output_tokens > p.min_tokens - 1:
            finish = "stop"
        elif tok in (p.stop_token_ids or ()):
            finish, reason = "stop", tok
        complete = False
        if seq.grammar is not None:
            if finish is None:
                seq.grammar.advance(seq.output_token_ids)
            if seq.grammar.error is not None:  # this token, or the mask before it, hit a grammar error
                logger.warning("request %s: structured output failed: %s", seq.request.request_id, seq.grammar.error)
                finish, reason = "abort", None
            complete = seq.grammar.is_finished
        if seq.detok is not None:
            old_len = len(seq.text)
            if finish is None or p.include_stop_str_in_output and reason is not None:
                seq.text += seq.detok.add(tok)
            if finish is None and p.stop_strs:
                hit = _find_stop(seq.text, p.stop_strs, len(seq.text) - old_len)
                if hit is not None:
                    pos, s = hit
                    seq.text = seq.text[: pos + (len(s) if p.include_stop_str_in_output else 0)]
                    finish, reason = "stop", s
        if finish is None and complete:  # the grammar allows nothing but EOS now: done, no EOS step
            finish = "stop"
        if finish is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            finish = "length"
        if finish is not None:
            if seq.detok is not None and (finish == "length" or reason is None):
                seq.text += seq.detok.flush()  # a held-back partial character, rendered as decode() would
            seq.finish_reason, seq.stop_reason = finish, reason  # step() then calls scheduler.finish()

    def _request_output(self, req: Request) -> RequestOutput:
        comps = []
        hold = max((len(s) for s in req.params.stop_strs), default=1) - 1
        for seq in req.seqs:
            done = seq.finish_reason is not None
            # a streamed delta never shows text that may turn out to be the start of a stop string
            visible = len(seq.text) if done or not hold else max(seq.sent_text_len, len(seq.text) - hold)
            out_ids = seq.output_token_ids
            lps = seq.logprobs
            comps.append(CompletionOutput(
                index=seq.index, text=seq.text[:visible], token_ids=list(out_ids),
                logprobs=list(lps) if lps is not None else None,
                cumulative_logprob=seq.cumulative_logprob if lps is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                delta_text=seq.text[seq.sent_text_len:visible], delta_token_ids=out_ids[seq.sent_tokens:],
                delta_logprobs=lps[seq.sent_tokens:] if lps is not None else None,
            ))
            seq.sent_text_len, seq.sent_tokens = visible, len(out_ids)
        m = req.metrics
        m.num_output_tokens = max((s.num_output_tokens for s in req.seqs), default=0)
        m.num_cached_tokens = req.seqs[0].num_cached_tokens if req.seqs else 0
        m.num_preemptions = sum(s.num_preemptions for s in req.seqs)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, comps, req.finished or req.aborted,
                             m, m.num_cached_tokens, req.prompt_logprobs, req.error)

    # ------------------------------------------------------------------ offline API
    def generate(self, prompts: PromptType | Seq[PromptType], params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs are in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                         and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None:
            params = SamplingParams()
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        # validate everything before queueing anything
        reqs = [self._make_request(f"gen-{next(self._ids)}", p, sp) for p, sp in zip(prompts, plist)]
        ids = [r.request_id for r in reqs]
        id_set = set(ids)
        for r in reqs:
            self._add(r)
        final: dict[str, RequestOutput] = {}
        bar = progress(total=len(reqs), desc="generate", disable=None if use_tqdm else True)
        try:
            while len(final) < len(reqs):
                for o in self.step():
                    if o.finished and o.request_id in id_set:
                        final[o.request_id] = o
                        bar.update(1)
        except BaseException:
            for i in ids:
                self.abort(i)
            self._pending = [o for o in self._pending if o.request_id not in id_set]
            raise
        finally:
            bar.close()
        return [final[i] for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | Seq[SamplingParams] | None = None,
             use_tqdm: bool = False, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer with a chat template")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self._chat_prompt(c, add_generation_prompt) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, params, use_tqdm=use_tqdm)

    def _chat_prompt(self, conversation: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template already has BOS

    def stream(self, prompt: PromptType, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one completion as they are produced (n must be 1)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream() supports n=1, got n={params.n}")
        rid = f"stream-{next(self._ids)}"
        self.add_request(rid, prompt, params)
        finished = False
        try:
            while not finished:
                for o in self.step():
                    if o.request_id != rid:
                        continue
                    if o.outputs[0].delta_text:
                        yield o.outputs[0].delta_text
                    finished = o.finished
        finally:
            if not finished:
                self.abort(rid)
                self._pending = [o for o in self._pending if o.request_id != rid]

    # ------------------------------------------------------------------ metrics
    def get_stats(self) -> EngineStats:
        bm, sch = self.block_manager, self.scheduler
        live = sum(s.num_computed_tokens for s in sch.running)
        return EngineStats(
            num_running=len(sch.running), num_waiting=len(sch.waiting),
            num_unfinished_requests=len(self._requests),
            kv_blocks_total=bm.num_blocks, kv_blocks_used=bm.num_used_blocks, kv_blocks_free=bm.num_free_blocks,
            kv_cache_usage=bm.num_used_blocks / bm.num_blocks, kv_live_tokens=live,
            prefix_cache_hit_rate=bm.prefix_cache_hit_rate, num_preemptions=sch.num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens, num_generated_tokens=self._num_generated,
            num_finished_requests=self._num_finished,
        )


def _find_stop(text: str, stops: list[str], new_chars: int) -> tuple[int, str] | None:
    """Earliest stop string that ends inside the last `new_chars` characters (it may start before them,
    i.e. span earlier tokens). Returns (start index, stop string) or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        lo = max(0, len(text) - new_chars - len(s) + 1)
        i = text.find(s, lo)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    return best

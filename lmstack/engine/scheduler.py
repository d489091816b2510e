"""Iteration-level continuous batching (plain Python, no torch).

Every step the scheduler picks, under `max_num_seqs` sequences and `max_num_batched_tokens` new
tokens, how many tokens of which sequences to compute:
  1. running sequences first, in arrival order: decodes take 1 token, a partly prefilled prompt
     takes the next chunk (chunked prefill: long prompts are split across steps, mixed with
     decodes). If the KV pool is out of blocks, the newest running sequence is preempted by
     recompute (its blocks are freed, it goes back to the front of the waiting queue with all its
     tokens, and it will be prefilled again later; its sampled tokens are kept, so the output is
     unchanged).
  2. then waiting sequences, first come first served, while budget, sequence slots and blocks last;
     their leading full blocks are taken from the prefix cache when possible.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lmstack.engine.block_manager import BlockManager
from lmstack.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # tokens to compute per sequence
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_chunked_prefill: bool = True) -> None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue management
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from whichever queue holds it and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start `child` as a running copy of `parent` sharing all its blocks (n > 1 sampling)."""
        self.bm.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.insert(self.running.index(parent) + 1 + (child.index - 1), child)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _may_split(self, n: int) -> bool:
        # Without chunked prefill a prompt is computed in one step; one that could never fit in a
        # step's budget (e.g. a long sequence recomputed after preemption) is split anyway rather
        # than waiting forever.
        return self.enable_chunked_prefill or n > self.max_num_batched_tokens

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = seq.num_tokens - seq.num_computed_tokens
            if n > budget:
                if not self._may_split(n):
                    i += 1
                    continue
                n = budget
            copies = self.bm.allocate_slots(seq, n)
            while copies is None:
                victim = self.running.pop()  # the newest running sequence
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
                copies = self.bm.allocate_slots(seq, n)
            if copies is None:
                break  # `seq` itself was preempted, and so was everything after it
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            out.blocks_to_copy.extend(copies)
            budget -= n
            i += 1

        # admit waiting sequences only when nobody had to be preempted this step
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.bm.match_prefix(seq)
            num_cached = len(prefix) * self.bm.block_size
            n = seq.num_tokens - num_cached
            if n > budget:
                if not self._may_split(n):
                    break
                n = budget
            copies = self.bm.allocate_slots(seq, n, prefix_blocks=prefix)
            if copies is None:
                break
            self.waiting.popleft()
            self.bm.note_admission(seq)
            seq.num_computed_tokens = num_cached
            seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            out.blocks_to_copy.extend(copies)
            budget -= n
        return out

    def update_after_step(self, out: SchedulerOutput) -> None:
        """The forward ran: advance computed counts and publish newly full blocks to the prefix cache."""
        for seq, n in zip(out.seqs, out.num_new_tokens):
            seq.num_computed_tokens += n
            self.bm.cache_full_blocks(seq)

"""Paged KV block bookkeeping (plain Python, no torch): free list, ref counts, copy-on-write, prefix cache.

The KV pool holds `num_blocks` blocks of `block_size` token slots. A sequence's `block_table` maps
its logical block i (tokens [i*bs, (i+1)*bs)) to a physical block id.

Prefix caching (vLLM's automatic prefix caching): a *full* block is named by
hash((hash of the previous block, tuple(its tokens))), so the name depends on every token before it
and two sequences with the same prefix map to the same physical blocks. When the last user of a
cached block frees it, the block keeps its KV and its hash and goes into an LRU list; it is
reused on a hash hit, or evicted (hash forgotten) only when a fresh block is needed and no
never-cached free block remains. Blocks are only written while partly filled, so a full block
(cached or shared by forked samples) is immutable; a *partial* block shared after a fork is
copied before the first write (copy-on-write), reported to the runner as (src, dst) pairs.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from lmstack.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set only while this block is the registered holder of `hash`
        self.token_ids: tuple[int, ...] | None = None  # the tokens behind `hash` (guards collisions)


def chain_hash(parent_hash: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent_hash, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # free, holding no cached KV
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but cached; oldest first
        self.hash_to_block: dict[int, int] = {}
        # prefix-cache statistics, in tokens
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ------------------------------------------------------------------ stats
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ internals
    def _take_free(self) -> int:
        if self.free_ids:
            bid = self.free_ids.popleft()
        else:  # evict the least recently freed cached block
            bid, _ = self.evictable.popitem(last=False)
            blk = self.blocks[bid]
            del self.hash_to_block[blk.hash]
            blk.hash = blk.token_ids = None
        self.blocks[bid].ref_count = 1
        return bid

    def _release(self, bid: int) -> None:
        blk = self.blocks[bid]
        assert blk.ref_count > 0, f"block {bid} freed twice"
        blk.ref_count -= 1
        if blk.ref_count == 0:
            if blk.hash is not None:
                self.evictable[bid] = None  # most recently used end
            else:
                self.free_ids.append(bid)

    def _seq_block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """Extend seq.block_hashes to cover its first `num_full_blocks` full blocks."""
        bs = self.block_size
        hashes = seq.block_hashes
        for i in range(len(hashes), num_full_blocks):
            parent = hashes[i - 1] if i else None
            hashes.append(chain_hash(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
        return hashes

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Physical blocks already holding this sequence's leading full blocks (no refs taken).

        At most (num_tokens - 1) tokens can come from the cache: the last token must be computed
        to get the logits for the next one. A request that asks for prompt log-probs takes nothing
        from the cache (as in vLLM): a cached block's tokens were never run through the LM head."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        hashes = self._seq_block_hashes(seq, max_blocks)
        hits: list[int] = []
        for i in range(max_blocks):
            bid = self.hash_to_block.get(hashes[i])
            if bid is None or self.blocks[bid].token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break
            hits.append(bid)
        return hits

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full (all tokens computed) under their chained hash."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        hashes = self._seq_block_hashes(seq, num_full)
        for i in range(num_full):
            blk = self.blocks[seq.block_table[i]]
            if blk.hash is not None or hashes[i] in self.hash_to_block:
                continue  # already registered (by us or an identical block elsewhere)
            blk.hash = hashes[i]
            blk.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            self.hash_to_block[blk.hash] = blk.block_id

    def reset_prefix_cache(self) -> None:
        """Forget all cached KV (e.g. after the model weights changed). Blocks in use stay valid
        for their owners but are no longer shared with new requests."""
        for blk in self.blocks:
            blk.hash = blk.token_ids = None
        self.hash_to_block.clear()
        self.free_ids.extend(self.evictable.keys())
        self.evictable.clear()

    # ------------------------------------------------------------------ allocation
    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       prefix_blocks: list[int] | None = None) -> list[tuple[int, int]] | None:
        """Make room for tokens [num_computed, num_computed + num_new_tokens) of `seq`.

        `prefix_blocks` (admission only): cached blocks to adopt as the sequence's first blocks.
        Returns the copy-on-write (src, dst) block pairs the runner must copy before the forward,
        or None (nothing changed) if the pool lacks free blocks."""
        prefix_blocks = prefix_blocks or []
        bs = self.block_size
        start = len(prefix_blocks) * bs if prefix_blocks else seq.num_computed_tokens
        have = len(prefix_blocks) if prefix_blocks else len(seq.block_table)
        need_new = max(0, self.blocks_needed(start + num_new_tokens) - have)
        cow_index = None
        if not prefix_blocks and start % bs and start // bs < len(seq.block_table):
            if self.blocks[seq.block_table[start // bs]].ref_count > 1:
                cow_index = start // bs
                need_new += 1
        # adopting an evictable cached block takes it out of the free pool too
        reclaimed = sum(1 for b in prefix_blocks if self.blocks[b].ref_count == 0)
        if need_new + reclaimed > self.num_free_blocks:
            return None
        for b in prefix_blocks:
            blk = self.blocks[b]
            if blk.ref_count == 0:
                del self.evictable[b]
            blk.ref_count += 1
        if prefix_blocks:
            seq.block_table = list(prefix_blocks)
            self.num_hit_tokens += len(prefix_blocks) * bs
        copies: list[tuple[int, int]] = []
        if cow_index is not None:
            src = seq.block_table[cow_index]
            dst = self._take_free()
            self._release(src)
            seq.block_table[cow_index] = dst
            copies.append((src, dst))
            need_new -= 1
        for _ in range(need_new):
            seq.block_table.append(self._take_free())
        return copies

    def note_admission(self, seq: Sequence) -> None:
        """Count a prompt lookup for the hit-rate statistic."""
        if self.enable_prefix_caching:
            self.num_queried_tokens += seq.num_tokens

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        for b in child.block_table:
            self.blocks[b].ref_count += 1

    def free(self, seq: Sequence) -> None:
        # tail first, so a sequence's later blocks are evicted before its (more shareable) prefix
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table = []

    def check_invariants(self, live: list[Sequence]) -> None:
        """Debug/test helper: ref counts equal the number of live block-table entries."""
        counts = [0] * self.num_blocks
        for s in live:
            for b in s.block_table:
                counts[b] += 1
        for blk in self.blocks:
            assert blk.ref_count == counts[blk.block_id], (blk.block_id, blk.ref_count, counts[blk.block_id])
        free = set(self.free_ids) | set(self.evictable)
        assert len(free) == len(self.free_ids) + len(self.evictable)
        assert free == {b.block_id for b in self.blocks if b.ref_count == 0}
        for h, bid in self.hash_to_block.items():
            assert self.blocks[bid].hash == h

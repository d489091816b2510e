"""Block manager: ref counts, copy-on-write, prefix hits by chained hash, LRU eviction, no leaks."""
from __future__ import annotations

import random

from lmstack.engine.block_manager import BlockManager
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.scheduler import Scheduler
from lmstack.engine.sequence import Request, Sequence


def make_seq(tokens: list[int], n: int = 1, rid: str = "r") -> Sequence:
    req = Request(rid, None, list(tokens), SamplingParams(n=n, max_tokens=8))
    seq = Sequence(req, 0, tokens, 0)
    req.seqs.append(seq)
    return seq


def compute(bm: BlockManager, seq: Sequence, upto: int | None = None) -> None:
    """Pretend the runner computed every allocated token up to `upto` (default: all)."""
    seq.num_computed_tokens = seq.num_tokens if upto is None else upto
    bm.cache_full_blocks(seq)


def test_allocate_and_free_ref_counts():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = make_seq(list(range(10)))
    assert bm.allocate_slots(s, 10) == []
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in s.block_table)
    compute(bm, s)
    bm.free(s)
    assert bm.num_free_blocks == 8 and all(b.ref_count == 0 for b in bm.blocks)
    # not enough room -> None and nothing changes
    big = make_seq(list(range(40)))
    assert bm.allocate_slots(big, 40) is None
    assert big.block_table == [] and bm.num_free_blocks == 8


def test_fork_shares_blocks_and_copy_on_write_of_last_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(list(range(10)), n=3)  # blocks: [0-3] [4-7] [8,9 + 2 free slots]
    bm.allocate_slots(parent, 10)
    compute(bm, parent)
    kids = [Sequence(parent.request, i, parent.token_ids, 0) for i in (1, 2)]
    for k in kids:
        bm.fork(parent, k)
        k.num_computed_tokens = parent.num_computed_tokens
    assert [bm.blocks[b].ref_count for b in parent.block_table] == [3, 3, 3]
    last = parent.block_table[2]
    for s, t in zip([kids[0], kids[1], parent], [100, 101, 102]):
        s.token_ids.append(t)
    # first child writes token 10 into the shared partial block -> copy it first
    cp = bm.allocate_slots(kids[0], 1)
    assert cp == [(last, kids[0].block_table[2])] and kids[0].block_table[2] != last
    assert kids[0].block_table[:2] == parent.block_table[:2]  # full blocks stay shared
    cp = bm.allocate_slots(kids[1], 1)
    assert len(cp) == 1 and cp[0][0] == last
    # the parent is now the only user: it writes in place
    assert bm.allocate_slots(parent, 1) == []
    assert parent.block_table[2] == last and bm.blocks[last].ref_count == 1
    assert [bm.blocks[b].ref_count for b in parent.block_table[:2]] == [3, 3]
    bm.check_invariants([parent] + kids)
    for s in [parent] + kids:
        bm.free(s)
    assert bm.num_free_blocks == 8


def test_prefix_hit_after_finish_and_chained_hash():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(list(range(13)))
    bm.allocate_slots(a, 13)
    compute(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)  # finished: cached blocks stay reusable
    same = make_seq(list(range(13)))
    assert bm.match_prefix(same) == a_blocks[:3]  # 3 full blocks (the last token is always computed)
    longer = make_seq(list(range(12)) + [99] * 6)
    assert bm.match_prefix(longer) == a_blocks[:3]
    # same second block content but a different first block: the chained hash must miss block 2 too
    other = make_seq([50, 51, 52, 53] + list(range(4, 13)))
    assert bm.match_prefix(other) == []
    first_only = make_seq([0, 1, 2, 3] + [77] * 9)
    assert bm.match_prefix(first_only) == a_blocks[:1]
    # exactly block-aligned prompt: at most len-1 tokens come from the cache
    aligned = make_seq(list(range(12)))
    assert bm.match_prefix(aligned) == a_blocks[:2]
    # adopting the hit blocks takes them out of the free pool
    free_before = bm.num_free_blocks
    assert bm.allocate_slots(same, 1, prefix_blocks=a_blocks[:3]) == []
    assert same.block_table[:3] == a_blocks[:3] and len(same.block_table) == 4
    assert bm.num_free_blocks == free_before - 4
    assert bm.num_hit_tokens == 12
    bm.check_invariants([same])


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    a = make_seq(list(range(13)))
    bm.allocate_slots(a, 13)
    compute(bm, a)
    bm.free(a)
    assert bm.match_prefix(make_seq(list(range(13)))) == []


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(list(range(8)))
    bm.allocate_slots(a, 8)
    compute(bm, a)
    a0, a1 = a.block_table
    bm.free(a)  # freed first -> evicted first; a sequence's tail goes before its head
    c = make_seq(list(range(100, 108)))
    bm.allocate_slots(c, 8)
    compute(bm, c)
    c0, c1 = c.block_table
    bm.free(c)
    assert list(bm.evictable) == [a1, a0, c1, c0]
    d = make_seq([7] * 4)
    bm.allocate_slots(d, 4)
    assert d.block_table == [a1] and a1 not in bm.hash_to_block.values()
    # a's head block is still cached, and a hit on it removes it from the LRU list
    probe = make_seq(list(range(8)) + [1])
    assert bm.match_prefix(probe) == [a0]
    e = make_seq([9] * 8)
    bm.allocate_slots(e, 8)
    assert e.block_table == [a0, c1]
    bm.check_invariants([d, e])


def test_random_request_streams_leak_no_blocks():
    """Property test: random arrivals (with shared prefixes and n > 1), chunked scheduling, random
    aborts and finishes, through the real scheduler; invariants hold every step and every block is
    free at the end."""
    for trial in range(6):
        rng = random.Random(trial)
        bm = BlockManager(num_blocks=rng.choice([12, 24, 48]), block_size=rng.choice([2, 4, 8]),
                          enable_prefix_caching=trial % 3 != 2)
        sch = Scheduler(bm, max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=rng.choice([8, 16, 64]))
        prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
        live: dict[str, Request] = {}
        all_seqs: list[Sequence] = []
        cap = bm.num_blocks * bm.block_size
        for step in range(300):
            if step < 200 and rng.random() < 0.3:
                toks = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randrange(0, 10))]
                max_new = rng.randrange(1, 12)
                if len(toks) + max_new > cap:
                    continue
                req = Request(f"r{step}", None, toks, SamplingParams(n=rng.choice([1, 1, 2, 3]), max_tokens=max_new))
                seq = Sequence(req, 0, toks, 0)
                req.seqs.append(seq)
                live[req.request_id] = req
                all_seqs.append(seq)
                sch.add(seq)
            out = sch.schedule()
            assert out.num_batched_tokens <= sch.max_num_batched_tokens
            sch.update_after_step(out)
            for seq, _ in zip(out.seqs, out.num_new_tokens):
                if seq.num_computed_tokens != seq.num_tokens or seq.is_finished:
                    continue
                req = seq.request
                group = [seq]
                if req.params.n > 1 and not req.forked:
                    req.forked = True
                    for i in range(1, req.params.n):
                        kid = Sequence(req, i, seq.token_ids, 0)
                        req.seqs.append(kid)
                        all_seqs.append(kid)
                        sch.fork(seq, kid)
                        group.append(kid)
                for s in group:
                    s.token_ids.append(rng.randrange(5))
                    if s.num_output_tokens >= req.params.max_tokens or rng.random() < 0.05:
                        sch.finish(s)
            if live and rng.random() < 0.05:  # abort a random request, in any state
                rid = rng.choice(sorted(live))
                for s in live[rid].seqs:
                    if not s.is_finished:
                        sch.finish(s)
            for rid in [r for r, q in live.items() if all(s.is_finished for s in q.seqs) and (q.forked or q.params.n == 1 or q.seqs[0].is_finished)]:
                del live[rid]
            bm.check_invariants([s for s in all_seqs if not s.is_finished])
            if step >= 200 and not sch.has_unfinished():
                break
        assert not sch.has_unfinished(), "requests left unfinished"
        assert bm.num_free_blocks == bm.num_blocks
        assert all(b.ref_count == 0 for b in bm.blocks)

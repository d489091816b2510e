"""Scheduler (no model): token budget, chunked prefill mixed with decodes, FCFS, preemption, abort."""
from __future__ import annotations

from lmstack.engine.block_manager import BlockManager
from lmstack.engine.sampling_params import SamplingParams
from lmstack.engine.scheduler import Scheduler
from lmstack.engine.sequence import Request, Sequence, SequenceStatus


def new_seq(rid: str, n_tokens: int, max_tokens: int = 4, base: int = 0) -> Sequence:
    toks = [(base + i) % 97 for i in range(n_tokens)]
    req = Request(rid, None, toks, SamplingParams(max_tokens=max_tokens))
    seq = Sequence(req, 0, toks, 0)
    req.seqs.append(seq)
    return seq


def run_step(sch: Scheduler, token: int = 1):
    """One engine iteration without a model: schedule, 'compute', append a token where due, finish."""
    out = sch.schedule()
    sch.update_after_step(out)
    for seq in out.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(token)
            if seq.num_output_tokens >= seq.params.max_tokens:
                sch.finish(seq)
    return out


def test_budget_and_chunked_prefill_mixed_with_decodes():
    bm = BlockManager(64, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    a = new_seq("a", 3, max_tokens=10)
    sch.add(a)
    run_step(sch)  # a prefilled, 1 token out
    b = new_seq("b", 40, base=5)
    sch.add(b)
    steps = []
    for _ in range(3):
        out = run_step(sch)
        steps.append(dict(zip([s.request.request_id for s in out.seqs], out.num_new_tokens)))
        assert out.num_batched_tokens <= 16
    # the running decode goes first with 1 token; b's 40-token prompt fills the rest in chunks
    assert steps == [{"a": 1, "b": 15}, {"a": 1, "b": 15}, {"a": 1, "b": 10}]
    assert b.num_output_tokens == 1 and b.num_computed_tokens == 40


def test_without_chunked_prefill_prompts_are_not_split():
    bm = BlockManager(64, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16, enable_chunked_prefill=False)
    for i, n in enumerate([10, 10, 3]):
        sch.add(new_seq(f"r{i}", n, base=i * 11))
    out = run_step(sch)
    # r1 does not fit next to r0 (20 > 16) and FCFS admission stops there (r2 must wait too)
    assert out.num_new_tokens == [10]
    out = run_step(sch)
    assert out.num_new_tokens == [1, 10, 3]


def test_max_num_seqs():
    bm = BlockManager(64, 4)
    sch = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(4):
        sch.add(new_seq(f"r{i}", 5, base=i * 7))
    out = run_step(sch)
    assert [s.request.request_id for s in out.seqs] == ["r0", "r1"]
    assert len(sch.running) == 2 and len(sch.waiting) == 2


def test_preemption_frees_newest_and_requeues_it_first():
    bs = 4
    bm = BlockManager(6, bs, enable_prefix_caching=False)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [new_seq(f"r{i}", 7, max_tokens=6, base=i * 13) for i in range(3)]
    for s in seqs:
        sch.add(s)
    run_step(sch)  # 3 x 7 prompt tokens in 3 x 2 blocks: pool full
    assert bm.num_free_blocks == 0
    out = run_step(sch)  # token 7 still fits in each second block
    assert not out.preempted
    out = run_step(sch)  # token 8 needs a 3rd block each: the newest (r2) is preempted
    assert out.preempted == [seqs[2]]
    assert [s.request.request_id for s in out.seqs] == ["r0", "r1"]
    r2 = seqs[2]
    assert r2.status == SequenceStatus.WAITING and r2.block_table == [] and r2.num_computed_tokens == 0
    assert sch.waiting[0] is r2  # back at the front
    assert r2.num_output_tokens == 2  # its sampled token is kept and will be recomputed
    # run to completion: everyone gets all tokens, nothing leaks
    for _ in range(100):
        if not sch.has_unfinished():
            break
        run_step(sch)
    assert not sch.has_unfinished()
    assert all(s.num_output_tokens == 6 for s in seqs)
    assert bm.num_free_blocks == 6 and sch.num_preemptions >= 1


def test_abort_frees_blocks_in_any_state():
    bm = BlockManager(32, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    a, b = new_seq("a", 20), new_seq("b", 5, base=3)
    sch.add(a)
    sch.add(b)
    run_step(sch)  # a half prefilled (8 of 20 tokens), b waiting
    assert a.block_table and b.status == SequenceStatus.WAITING
    sch.finish(a)  # abort mid-prefill
    sch.finish(b)  # abort while waiting
    assert not sch.has_unfinished() and bm.num_free_blocks == 32
    assert a.status == b.status == SequenceStatus.FINISHED


def test_prefix_cache_skips_computed_blocks_at_admission():
    bm = BlockManager(32, 4)
    sch = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a = new_seq("a", 18, max_tokens=1)
    sch.add(a)
    run_step(sch)
    assert a.is_finished
    b = new_seq("b", 18, max_tokens=1)  # same prompt
    sch.add(b)
    out = run_step(sch)
    assert out.num_new_tokens == [2] and b.num_cached_tokens == 16
    assert bm.prefix_cache_hit_rate == 16 / 36

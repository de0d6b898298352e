"""Scheduler decisions, driven by a fake runner that samples fixed tokens without a model."""

from __future__ import annotations

import random

import pytest

from molten.config import SchedulerConfig
from molten.engine.block_manager import BlockManager
from molten.engine.sampling_params import SamplingParams
from molten.engine.scheduler import QueueFullError, Scheduler, SchedulerOutput
from molten.engine.sequence import Sequence, SequenceStatus

KV_BLOCK_SIZE = 4
FAKE_TOKEN_ID = 7
MAX_MODEL_LEN = 256


def make_scheduler(num_blocks: int = 64, *, max_model_len: int = MAX_MODEL_LEN, **settings) -> Scheduler:
    config = SchedulerConfig(**settings)
    return Scheduler(config, BlockManager(num_blocks, KV_BLOCK_SIZE), max_model_len)


def make_seq(num_prompt_tokens: int, max_tokens: int = 4, *, request_id: str = "req", priority: int = 0,
             arrival_time: float = 0.0, first_token: int = 100) -> Sequence:
    prompt = list(range(first_token, first_token + num_prompt_tokens))
    return Sequence(
        request_id=request_id,
        token_ids=prompt,
        num_prompt_tokens=num_prompt_tokens,
        sampling_params=SamplingParams(max_tokens=max_tokens),
        arrival_time=arrival_time,
        priority=priority,
    )


def fake_update(scheduler: Scheduler, output: SchedulerOutput) -> list[Sequence]:
    """Advance computed counts as the engine does, append a fixed token where a row ends, finish at max_tokens."""
    finished = []
    for item in output.scheduled:
        seq = item.seq
        computed_before = seq.num_computed_tokens
        seq.num_computed_tokens += item.num_new_tokens
        scheduler.block_manager.register_full_blocks(seq, computed_before)
        if seq.num_computed_tokens < seq.num_tokens:
            continue
        seq.token_ids.append(FAKE_TOKEN_ID)
        if seq.num_output_tokens >= seq.sampling_params.max_tokens:
            seq.status = SequenceStatus.FINISHED_LENGTH
            scheduler.remove(seq)
            finished.append(seq)
    return finished


def step(scheduler: Scheduler) -> SchedulerOutput:
    output = scheduler.schedule()
    scheduler.check_invariants(output)
    fake_update(scheduler, output)
    return output


def run_all(scheduler: Scheduler, max_steps: int = 2_000) -> list[SchedulerOutput]:
    outputs = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            break
        outputs.append(step(scheduler))
    num_unfinished = len(scheduler.waiting) + len(scheduler.running)
    assert num_unfinished == 0, f"{num_unfinished} sequences unfinished after {max_steps} steps (deadlock?)"
    return outputs


def test_token_budget_respected_every_step():
    rng = random.Random(0)
    scheduler = make_scheduler(num_blocks=48, max_num_batched_tokens=24, max_num_seqs=6)
    seqs = [make_seq(rng.randint(1, 60), rng.randint(1, 12), request_id=f"r{i}", arrival_time=i, first_token=1000 * i)
            for i in range(20)]
    for seq in seqs:
        scheduler.add(seq)

    outputs = run_all(scheduler)

    assert all(output.num_batched_tokens <= 24 for output in outputs)
    assert all(len(output.scheduled) <= 6 for output in outputs)
    assert max(output.num_batched_tokens for output in outputs) == 24
    assert all(seq.num_output_tokens == seq.sampling_params.max_tokens for seq in seqs)
    assert scheduler.block_manager.num_free_blocks == 48
    scheduler.block_manager.check_invariants([])


def test_decodes_scheduled_before_new_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=64)
    decoding = [make_seq(5, max_tokens=20, request_id=f"d{i}", arrival_time=i, first_token=100 * i) for i in range(3)]
    for seq in decoding:
        scheduler.add(seq)
    step(scheduler)  # prefills all three; each now has one token to decode
    newcomer = make_seq(40, request_id="new", arrival_time=10, first_token=5000)
    scheduler.add(newcomer)

    output = step(scheduler)

    assert [item.seq for item in output.scheduled[:3]] == decoding
    assert [item.num_new_tokens for item in output.scheduled[:3]] == [1, 1, 1]
    assert output.scheduled[3].seq is newcomer
    assert output.scheduled[3].num_new_tokens == 40


def test_long_prompt_chunked_while_decodes_continue():
    scheduler = make_scheduler(max_num_batched_tokens=16)
    decoding = [make_seq(3, max_tokens=100, request_id=f"d{i}", arrival_time=i, first_token=100 * i) for i in range(3)]
    for seq in decoding:
        scheduler.add(seq)
    step(scheduler)
    long_prompt = make_seq(100, max_tokens=2, request_id="long", arrival_time=10, first_token=5000)
    scheduler.add(long_prompt)

    chunks = []
    while long_prompt.num_output_tokens == 0:
        output = step(scheduler)
        by_seq = {item.seq.request_id: item.num_new_tokens for item in output.scheduled}
        assert [by_seq.get(seq.request_id) for seq in decoding] == [1, 1, 1]
        assert output.num_batched_tokens <= 16
        chunks.append(by_seq["long"])

    assert chunks == [13] * 7 + [9]
    assert sum(chunks) == 100


def test_whole_prompt_waits_without_chunked_prefill():
    scheduler = make_scheduler(max_num_batched_tokens=64, enable_chunked_prefill=False, max_model_len=64)
    first = make_seq(40, request_id="first", arrival_time=0, first_token=100)
    second = make_seq(40, request_id="second", arrival_time=1, first_token=500)
    scheduler.add(first)
    scheduler.add(second)

    output = step(scheduler)

    assert [(item.seq.request_id, item.num_new_tokens) for item in output.scheduled] == [("first", 40)]
    assert second.status is SequenceStatus.WAITING


def test_priority_policy_orders_waiting():
    scheduler = make_scheduler(policy="priority", max_num_seqs=1)
    low = make_seq(4, request_id="low", priority=5, arrival_time=0)
    high = make_seq(4, request_id="high", priority=0, arrival_time=2)
    middle_early = make_seq(4, request_id="middle-early", priority=1, arrival_time=1)
    middle_late = make_seq(4, request_id="middle-late", priority=1, arrival_time=3)
    for seq in (low, high, middle_late, middle_early):
        scheduler.add(seq)

    assert [seq.request_id for seq in scheduler.waiting] == ["high", "middle-early", "middle-late", "low"]

    output = step(scheduler)

    assert [item.seq.request_id for item in output.scheduled] == ["high"]


def test_fcfs_policy_ignores_priority():
    scheduler = make_scheduler(policy="fcfs")
    late_urgent = make_seq(4, request_id="late-urgent", priority=0, arrival_time=5)
    early = make_seq(4, request_id="early", priority=9, arrival_time=1)
    scheduler.add(late_urgent)
    scheduler.add(early)

    assert [seq.request_id for seq in scheduler.waiting] == ["early", "late-urgent"]


def test_queue_full_at_max_num_waiting():
    scheduler = make_scheduler(max_num_waiting=2)
    scheduler.add(make_seq(4, request_id="a"))
    scheduler.add(make_seq(4, request_id="b"))
    rejected = make_seq(4, request_id="c")

    with pytest.raises(QueueFullError, match="max_num_waiting"):
        scheduler.add(rejected)
    assert [seq.request_id for seq in scheduler.waiting] == ["a", "b"]
    assert rejected.block_table == []


def test_preemption_frees_blocks_and_recomputes():
    # 12 blocks of 4 = 48 slots; four sequences that each grow to 24 tokens cannot all fit.
    scheduler = make_scheduler(num_blocks=12, max_num_batched_tokens=64)
    seqs = [make_seq(8, max_tokens=16, request_id=f"r{i}", arrival_time=i, first_token=100 * i) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)

    outputs = run_all(scheduler)

    preempted = [seq for output in outputs for seq in output.preempted]
    assert preempted
    assert sum(seq.num_preemptions for seq in seqs) == len(preempted)
    assert all(seq.num_output_tokens == 16 for seq in seqs)
    assert scheduler.block_manager.num_free_blocks == 12
    scheduler.block_manager.check_invariants([])


def test_waiting_prefix_hits_do_not_deadlock():
    """A waiting sequence that cannot start must not keep the cached blocks it matched.

    Twelve requests share a 40-token prefix in a pool of 24 blocks of 4 tokens; each one
    alone fits. Preempted sequences match their own cached blocks when they return.
    """
    rng = random.Random(0)
    scheduler = make_scheduler(num_blocks=24, max_num_batched_tokens=32)
    shared = [rng.randrange(10, 40_000) for _ in range(40)]
    seqs = []
    for index in range(12):
        seq = make_seq(1, max_tokens=24, request_id=f"r{index}", arrival_time=index)
        seq.token_ids = shared + [rng.randrange(10, 40_000) for _ in range(rng.randint(1, 30))]
        seq.num_prompt_tokens = len(seq.token_ids)
        seqs.append(seq)
        scheduler.add(seq)

    outputs = run_all(scheduler)

    assert any(output.preempted for output in outputs)
    assert all(seq.num_output_tokens == 24 for seq in seqs)
    assert scheduler.block_manager.num_free_blocks == 24
    scheduler.block_manager.check_invariants([])

"""The scheduler gives up drafts before anything else: budget, memory, preemption, unscheduled."""

from __future__ import annotations

from molten.config import SchedulerConfig
from molten.engine.block_manager import BlockManager
from molten.engine.sampling_params import SamplingParams
from molten.engine.scheduler import Scheduler
from molten.engine.sequence import Sequence, SequenceStatus

KV_BLOCK_SIZE = 4


def decoding_seq(request_id: str, num_prompt_tokens: int, scheduler: Scheduler) -> Sequence:
    """A running sequence with its prompt computed and one sampled token, as after prefill."""
    seq = Sequence(
        request_id=request_id,
        token_ids=list(range(10, 10 + num_prompt_tokens)) + [99],
        num_prompt_tokens=num_prompt_tokens,
        sampling_params=SamplingParams(max_tokens=32),
    )
    assert scheduler.block_manager.allocate_slots(seq, num_prompt_tokens)
    seq.num_computed_tokens = num_prompt_tokens
    seq.status = SequenceStatus.RUNNING
    scheduler.running.append(seq)
    return seq


def make_scheduler(num_blocks: int = 32, max_num_batched_tokens: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens)
    return Scheduler(config, BlockManager(num_blocks, KV_BLOCK_SIZE), max_model_len=128)


def test_drafts_scheduled_as_extra_tokens():
    scheduler = make_scheduler()
    seq = decoding_seq("a", 6, scheduler)
    seq.add_draft_tokens([1, 2, 3], None)
    output = scheduler.schedule()
    item = output.scheduled[0]
    assert item.num_new_tokens == 4
    assert item.num_draft_tokens == 3
    assert seq.num_computed_tokens + item.num_new_tokens == seq.num_tokens
    assert output.num_draft_tokens == 3
    assert output.num_prefill_tokens == 0
    assert output.num_decode_tokens == 4


def test_budget_trims_drafts():
    scheduler = make_scheduler(max_num_batched_tokens=5)
    first = decoding_seq("a", 6, scheduler)
    second = decoding_seq("b", 6, scheduler)
    first.add_draft_tokens([1, 2, 3], None)
    second.add_draft_tokens([4, 5, 6], None)
    output = scheduler.schedule()
    assert [(item.num_new_tokens, item.num_draft_tokens) for item in output.scheduled] == [(4, 3), (1, 0)]
    assert second.num_draft_tokens == 0
    assert second.num_tokens == 7
    assert output.num_batched_tokens <= 5


def test_unscheduled_sequence_loses_drafts():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    first = decoding_seq("a", 6, scheduler)
    second = decoding_seq("b", 6, scheduler)
    first.add_draft_tokens([1, 2, 3], None)
    second.add_draft_tokens([4, 5], None)
    output = scheduler.schedule()
    assert [item.seq for item in output.scheduled] == [first]
    assert second.num_draft_tokens == 0
    assert second.token_ids[-1] == 99


def test_short_memory_drops_drafts_before_preempting():
    # 5 blocks of 4 tokens: each sequence holds 2 (7 computed tokens), so 1 is free. Five
    # drafts for "a" would need 2 more blocks, so they are dropped rather than preempting "b".
    scheduler = make_scheduler(num_blocks=5)
    first = decoding_seq("a", 7, scheduler)
    second = decoding_seq("b", 7, scheduler)
    first.add_draft_tokens([1, 2, 3, 4, 5], None)
    free_before = scheduler.block_manager.num_free_blocks
    assert free_before == 1
    output = scheduler.schedule()
    assert not output.preempted
    assert first.num_draft_tokens == 0
    assert [(item.num_new_tokens, item.num_draft_tokens) for item in output.scheduled] == [(1, 0), (1, 0)]
    assert second.status is SequenceStatus.RUNNING


def test_preempted_sequence_loses_drafts():
    scheduler = make_scheduler(num_blocks=4)
    first = decoding_seq("a", 8, scheduler)
    second = decoding_seq("b", 8, scheduler)
    second.add_draft_tokens([1, 2], None)
    output = scheduler.schedule()  # "a" needs a third block for token 9: "b" is preempted
    assert second in output.preempted
    assert second.num_draft_tokens == 0
    assert second.token_ids[-1] == 99
    assert [item.seq for item in output.scheduled] == [first]

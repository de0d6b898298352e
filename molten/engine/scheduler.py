"""Continuous-batching scheduler: decides which tokens of which sequences run each step.

One counting model covers every case. Each sequence has `num_tokens` and
`num_computed_tokens`; a step gives some sequences `num_new_tokens` so that computed
catches up with total. A new prompt, a prefill chunk, a prefix-cache hit (computed
starts above zero) and a decode step (one new token) differ only in those numbers.

Per step, under `max_num_batched_tokens`:
1. Running sequences first, in order, so decodes are never stalled by new prompts.
   When a sequence needs a KV block and none is free, the lowest-ranked running
   sequence is preempted. Its blocks are freed and it goes back to the front of the
   waiting queue to be recomputed later. Its generated tokens are kept, so its output
   does not change.
2. Then waiting sequences, in policy order, while token budget, `max_num_seqs` and
   free blocks allow. With chunked prefill a prompt that does not fit the remaining
   budget is split; without it, the prompt waits for a step with room.

Speculative drafts (spec_decode/) are ordinary uncomputed tokens at the end of a running
sequence, so they count against the token budget and get KV slots like any other. They
are the first thing given up: when the budget or free blocks run short, drafts are
dropped before any sequence is preempted, and a sequence that is preempted or not
scheduled this step loses its drafts. The scheduled tokens of a sequence with drafts
therefore always end at its last draft, where the verifier needs the logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from molten.config import SchedulerConfig
from molten.engine.block_manager import BlockManager
from molten.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_num_waiting`; the caller should retry later (HTTP 429)."""


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    num_draft_tokens: int = 0
    """Drafts among the new tokens (the last ones). The runner returns their k + 1 logits rows unsampled."""


@dataclass
class SchedulerOutput:
    step_id: int
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)

    @property
    def num_prefill_tokens(self) -> int:
        return sum(
            item.num_new_tokens
            for item in self.scheduled
            if item.num_new_tokens - item.num_draft_tokens > 1 or item.seq.is_prefill
        )

    @property
    def num_draft_tokens(self) -> int:
        return sum(item.num_draft_tokens for item in self.scheduled)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_batched_tokens - self.num_prefill_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        config.validate(max_model_len)
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.step_id = 0
        self.num_preemptions = 0

    # -- queue management ---------------------------------------------------------------

    def _rank(self, seq: Sequence) -> tuple:
        if self.config.policy == "priority":
            return (seq.priority, seq.arrival_time, seq.seq_id)
        return (seq.arrival_time, seq.seq_id)

    def add(self, seq: Sequence, enforce_queue_limit: bool = True) -> None:
        """Queue a sequence. Raises QueueFullError at `max_num_waiting` unless `enforce_queue_limit` is False."""
        if enforce_queue_limit and len(self.waiting) >= self.config.max_num_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting (max_num_waiting)")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.waiting.sort(key=self._rank)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues and free its blocks (abort or finish)."""
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting seq %s of request %s", seq.seq_id, seq.request_id)
        self.running.remove(seq)
        seq.drop_draft_tokens()
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.insert(0, seq)

    # -- the step -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self.step_id += 1
        output = SchedulerOutput(step_id=self.step_id)
        budget = self.config.max_num_batched_tokens
        self._schedule_running(output, budget)
        budget -= output.num_batched_tokens
        self._schedule_waiting(output, budget)
        self._drop_unscheduled_drafts(output)
        return output

    def _drop_unscheduled_drafts(self, output: SchedulerOutput) -> None:
        scheduled_ids = {item.seq.seq_id for item in output.scheduled}
        for seq in self.running:
            if seq.num_draft_tokens and seq.seq_id not in scheduled_ids:
                seq.drop_draft_tokens()

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> None:
        if self.config.policy == "priority":
            self.running.sort(key=self._rank)
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            # NOTE: each running sequence takes its 1 + k tokens in order, so with many
            # sequences and a large k the tail can miss a step while the head spends the
            # budget on drafts. Reserving one token per sequence first would be fairer.
            num_new = self._fit_drafts(seq, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                if seq.num_draft_tokens:
                    seq.drop_draft_tokens()
                    num_new = min(seq.num_uncomputed_tokens, budget)
                    continue
                # NOTE: sequences scheduled earlier in this step keep the slots of their drafts.
                # So a plain decode can be preempted to make room for another sequence's drafts.
                # Dropping those drafts first would need their blocks trimmed.
                victim = self.running[-1]
                self._preempt(victim)
                output.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            output.scheduled.append(ScheduledSequence(seq, num_new, seq.num_draft_tokens))
            budget -= num_new
            index += 1

    def _fit_drafts(self, seq: Sequence, budget: int) -> int:
        """Drop the drafts that do not fit `budget`, so the scheduled tokens end at the last draft."""
        num_new = min(seq.num_uncomputed_tokens, budget)
        if seq.num_draft_tokens and num_new < seq.num_uncomputed_tokens:
            seq.drop_draft_tokens(seq.num_uncomputed_tokens - num_new)
            num_new = min(seq.num_uncomputed_tokens, budget)
        return num_new

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq in output.preempted:
                break  # it just lost its blocks; retrying in the same step would thrash
            if not seq.block_table:
                cached = self.block_manager.match_prefix(seq)
                seq.num_computed_tokens = cached
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = min(cached, seq.num_prompt_tokens)
            num_new = seq.num_uncomputed_tokens
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.block_manager.allocate_slots(seq, num_new):
                # Give back the prefix-cache hits: a waiting sequence that keeps blocks can
                # starve the running ones, and when nothing runs the engine deadlocks. The
                # blocks stay cached, so the next attempt matches them again.
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            output.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new

    def check_invariants(self, output: SchedulerOutput) -> None:
        """Raise if the step breaks the budget, the sequence limit, or block accounting."""
        if output.num_batched_tokens > self.config.max_num_batched_tokens:
            raise RuntimeError(f"step {output.step_id} scheduled {output.num_batched_tokens} tokens over budget")
        if len(self.running) > self.config.max_num_seqs:
            raise RuntimeError(f"{len(self.running)} running sequences exceed max_num_seqs")
        for item in output.scheduled:
            capacity = len(item.seq.block_table) * self.block_manager.kv_block_size
            if item.seq.num_computed_tokens + item.num_new_tokens > capacity:
                raise RuntimeError(f"seq {item.seq.seq_id} scheduled past its block table")

"""Sequences: one generation stream each, owning its tokens, KV blocks and timings."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from molten.engine.sampling_params import SamplingParams
from molten.engine.spec_decode.stats import SpecDecodeStats


class SequenceStatus(enum.IntEnum):
    """Lifecycle of a sequence. Finished states sort last so `status.is_finished` is one comparison."""

    WAITING = 0
    RUNNING = 1
    PREFILLED = 2
    """Prompt computed and first token sampled on a prefill-only engine; KV waits to be exported."""
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12

    @property
    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}

_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    """Prompt tokens followed by generated tokens, then `num_draft_tokens` unverified drafts."""
    num_prompt_tokens: int
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.time)
    """Wall-clock arrival (`time.time()`), comparable across the prefill and decode processes."""
    priority: int = 0
    seq_index: int = 0
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache. It catches up with `num_tokens` step by step."""
    num_cached_prompt_tokens: int = 0
    """Prompt tokens whose K/V came from the prefix cache."""
    block_table: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    prefill_only: bool = False
    """Stop after the first token and keep the KV blocks for export (disaggregated prefill)."""
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    num_draft_tokens: int = 0
    """Speculative drafts at the end of `token_ids`, present only between proposal and verification."""
    draft_probs: torch.Tensor | None = None
    """[num_draft_tokens, vocab] draft-model probabilities of the drafts; None means each
    draft was chosen deterministically (n-gram or greedy draft), a one-hot distribution."""
    spec_stats: SpecDecodeStats | None = None
    """Acceptance statistics, set once the sequence has verified drafts."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_verified_tokens(self) -> int:
        """Tokens excluding unverified drafts."""
        return len(self.token_ids) - self.num_draft_tokens

    @property
    def is_prefill(self) -> bool:
        """True while prompt tokens are still uncomputed (including recompute after preemption)."""
        return self.num_computed_tokens < self.num_verified_tokens - 1

    def add_draft_tokens(self, token_ids: list[int], probs: torch.Tensor | None) -> None:
        """Append drafts to verify in the next step. Raises if the sequence already carries some."""
        if self.num_draft_tokens:
            raise RuntimeError(f"seq {self.seq_id} already carries {self.num_draft_tokens} draft tokens")
        self.token_ids.extend(token_ids)
        self.num_draft_tokens = len(token_ids)
        self.draft_probs = probs

    def drop_draft_tokens(self, count: int | None = None) -> list[int]:
        """Remove the last `count` drafts (all when None) and return them."""
        count = self.num_draft_tokens if count is None else min(count, self.num_draft_tokens)
        if count == 0:
            return []
        dropped = self.token_ids[-count:]
        del self.token_ids[-count:]
        self.num_draft_tokens -= count
        if self.draft_probs is not None:
            self.draft_probs = self.draft_probs[: self.num_draft_tokens] if self.num_draft_tokens else None
        return dropped

    def num_blocks_for(self, num_tokens: int, kv_block_size: int) -> int:
        return (num_tokens + kv_block_size - 1) // kv_block_size

    def block_tokens(self, block_index: int, kv_block_size: int) -> list[int]:
        start = block_index * kv_block_size
        return self.token_ids[start : start + kv_block_size]


def make_generator(seed: int | None) -> torch.Generator | None:
    """Build the per-request generator, so a seeded request samples the same tokens whatever its batch mates."""
    if seed is None:
        return None
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator

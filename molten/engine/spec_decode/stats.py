"""Acceptance statistics of speculative decoding, per request and per engine step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    """Running totals of one sequence (or of the whole engine) under speculative decoding.

    A verification is one target step over a sequence that carried k > 0 drafts.
    `accepted_length_histogram[a]` counts verifications that accepted exactly `a` drafts,
    so it has k + 1 entries.
    """

    num_speculative_tokens: int
    num_verifications: int = 0
    num_draft_tokens: int = 0
    """Drafts that reached the target model (after the scheduler trimmed any)."""
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0
    """Tokens emitted by verifications: accepted drafts plus one recovered or bonus token each."""
    accepted_length_histogram: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.accepted_length_histogram:
            self.accepted_length_histogram = [0] * (self.num_speculative_tokens + 1)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over drafts verified; 0 before the first verification."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.num_accepted_tokens / self.num_verifications if self.num_verifications else 0.0

    @property
    def tokens_per_verification(self) -> float:
        return self.num_emitted_tokens / self.num_verifications if self.num_verifications else 0.0

    def record(self, num_draft_tokens: int, num_accepted: int, num_emitted: int) -> None:
        self.num_verifications += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        self.num_emitted_tokens += num_emitted
        self.accepted_length_histogram[num_accepted] += 1

    def merge(self, other: SpecDecodeStats) -> None:
        self.num_verifications += other.num_verifications
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.num_emitted_tokens += other.num_emitted_tokens
        for index, count in enumerate(other.accepted_length_histogram):
            self.accepted_length_histogram[index] += count

    def to_dict(self) -> dict:
        return {
            "num_speculative_tokens": self.num_speculative_tokens,
            "num_verifications": self.num_verifications,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "num_emitted_tokens": self.num_emitted_tokens,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "accepted_length_histogram": list(self.accepted_length_histogram),
        }


@dataclass
class SpecStepStats:
    """What speculation did in one engine step, for telemetry and the step trace."""

    step_id: int
    method: str
    num_proposing_seqs: int = 0
    """Sequences the drafter proposed for (some may have received no drafts)."""
    totals: SpecDecodeStats | None = None
    """Verifications of this step only."""
    propose_ms: float = 0.0
    """Time the drafter took before scheduling (a draft model's forwards, or n-gram search)."""
    verify_ms: float = 0.0
    """Time spent accepting and rejecting drafts after the target forward."""

    def to_dict(self) -> dict:
        return {
            "step_id": self.step_id,
            "method": self.method,
            "num_proposing_seqs": self.num_proposing_seqs,
            "propose_ms": round(self.propose_ms, 3),
            "verify_ms": round(self.verify_ms, 3),
            **(self.totals.to_dict() if self.totals is not None else {}),
        }

"""Records the engine streams: one per generated token, the KV handoff cost, speculation stats."""

from __future__ import annotations

from dataclasses import dataclass

from molten.engine.spec_decode.stats import SpecDecodeStats


@dataclass
class TokenEvent:
    """One generated token, with the timings that explain its cost."""

    request_id: str
    seq_index: int
    """Index of the request's sequence (0..n-1) that produced the token."""
    token_id: int
    text: str
    """Text delta this token makes visible. It may be empty (a partial UTF-8 character or
    text held back while a stop string could still match) or carry held-back text."""
    logprob: float | None
    top_logprobs: list[tuple[int, str, float]] | None
    """(token id, token text, logprob) of the most likely alternatives, when requested."""
    time_since_arrival_ms: float
    step_id: int
    batch_size: int
    """Number of sequences in the engine step that produced the token."""
    origin: str
    """How the token was produced: `prefill` (first token, sampled after the prompt) or
    `decode` (one target step, one token). Speculative decoding adds `draft-accepted` (a
    draft the target verified), `recovered` (sampled in place of the first rejected draft)
    and `bonus` (sampled after every draft was accepted). Beam search streams its best
    beam at the end with origin `beam`."""
    index: int
    """Position of the token among this sequence's generated tokens, from 0."""
    finish_reason: str | None = None
    """`stop` or `length` on the sequence's last event, else None."""
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache instead of being computed."""
    handoff: "HandoffStats | None" = None
    """Set on the first event a decode worker streams after importing KV blocks."""
    spec_stats: SpecDecodeStats | None = None
    """Acceptance statistics of the sequence, on its last event when it verified any drafts."""


@dataclass
class HandoffStats:
    """Cost of moving one sequence's KV cache from the prefill worker to the decode worker."""

    num_bytes: int
    num_blocks: int
    export_ms: float
    transfer_ms: float
    import_ms: float
    reused_blocks: int = 0
    """Blocks the decode worker already held (prefix cache) and did not import again."""

    @property
    def total_ms(self) -> float:
        return self.export_ms + self.transfer_ms + self.import_ms

    def to_dict(self) -> dict:
        return {
            "bytes": self.num_bytes,
            "blocks": self.num_blocks,
            "reused_blocks": self.reused_blocks,
            "export_ms": round(self.export_ms, 3),
            "transfer_ms": round(self.transfer_ms, 3),
            "import_ms": round(self.import_ms, 3),
            "total_ms": round(self.total_ms, 3),
        }

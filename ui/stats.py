"""Live figures of one streamed reply: TTFT, token rates, token counts, KV handoff and inter-token latency.

All times come from the engine's `TokenEvent.time_since_arrival_ms`, measured from the
moment the ingress accepted the request, so they exclude the browser and Gradio.
This module has no Gradio import, so the figures can be tested without a UI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from molten.engine.events import HandoffStats, TokenEvent
from molten.engine.spec_decode.stats import SpecDecodeStats


@dataclass
class ReplyStats:
    """Figures of one reply (one sequence), updated as its TokenEvents arrive."""

    num_prompt_tokens: int | None = None
    num_cached_prompt_tokens: int | None = None
    token_times_ms: list[float] = field(default_factory=list)
    """time_since_arrival_ms of each generated token, in arrival order."""
    origins: list[str] = field(default_factory=list)
    step_ids: list[int] = field(default_factory=list)
    """Engine step that produced each generated token, in arrival order."""
    batch_sizes: list[int] = field(default_factory=list)
    """Number of sequences in the step that produced each token."""
    token_texts: list[str] = field(default_factory=list)
    """Text delta of each token, which may be empty (see `TokenEvent.text`)."""
    handoff: HandoffStats | None = None
    finish_reason: str | None = None
    spec_stats: SpecDecodeStats | None = None
    """Acceptance statistics under speculative decoding; they arrive with the last token."""

    def add_event(self, event: TokenEvent) -> None:
        if event.index == 0 or self.num_prompt_tokens is None:
            self.num_prompt_tokens = event.num_prompt_tokens
            self.num_cached_prompt_tokens = event.num_cached_prompt_tokens
        self.token_times_ms.append(event.time_since_arrival_ms)
        self.origins.append(event.origin)
        self.step_ids.append(event.step_id)
        self.batch_sizes.append(event.batch_size)
        self.token_texts.append(event.text)
        if event.handoff is not None:
            self.handoff = event.handoff
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        if event.spec_stats is not None:
            self.spec_stats = event.spec_stats

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times_ms)

    @property
    def ttft_ms(self) -> float | None:
        return self.token_times_ms[0] if self.token_times_ms else None

    @property
    def total_ms(self) -> float | None:
        return self.token_times_ms[-1] if self.token_times_ms else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, divided by the time from the first token to the last."""
        if len(self.token_times_ms) < 2:
            return None
        elapsed_ms = self.token_times_ms[-1] - self.token_times_ms[0]
        return (len(self.token_times_ms) - 1) / (elapsed_ms / 1000.0) if elapsed_ms > 0 else None

    @property
    def overall_tokens_per_s(self) -> float | None:
        """All generated tokens divided by the time from arrival to the last token (TTFT included)."""
        total_ms = self.total_ms
        return self.num_output_tokens / (total_ms / 1000.0) if total_ms else None

    def inter_token_latencies(self) -> list[tuple[int, float]]:
        """(token index, ms since the previous token) for every token after the first."""
        times = self.token_times_ms
        return [(index, times[index] - times[index - 1]) for index in range(1, len(times))]

    @property
    def mean_itl_ms(self) -> float | None:
        gaps = [gap for _, gap in self.inter_token_latencies()]
        return sum(gaps) / len(gaps) if gaps else None


def format_bytes(num_bytes: int) -> str:
    """Write a byte count with a binary unit, e.g. `48.0 KiB`."""
    if num_bytes < 1024:
        return f"{num_bytes} B"
    if num_bytes < 1024 * 1024:
        return f"{num_bytes / 1024:.1f} KiB"
    if num_bytes < 1024**3:
        return f"{num_bytes / (1024 * 1024):.1f} MiB"
    return f"{num_bytes / 1024**3:.1f} GiB"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} tokens/s"


def _count(value: int | None) -> str:
    return "–" if value is None else str(value)


def describe_handoff(stats: ReplyStats, mode: str | None) -> str:
    """Describe the KV handoff of a reply, or the reason it has none."""
    handoff = stats.handoff
    if handoff is not None:
        reused = f", {handoff.reused_blocks} reused" if handoff.reused_blocks else ""
        return (
            f"{format_bytes(handoff.num_bytes)} ({handoff.num_bytes:,} bytes), "
            f"{handoff.num_blocks} KV blocks{reused}; {handoff.total_ms:.1f} ms "
            f"(export {handoff.export_ms:.1f} + transfer {handoff.transfer_ms:.1f} + import {handoff.import_ms:.1f})"
        )
    if mode == "colocated":
        return "none: one co-located worker runs prefill and decode"
    if stats.num_output_tokens == 0:
        return "–"
    if stats.num_output_tokens == 1 and stats.finish_reason is not None:
        return "none: the reply ended at its first token, so no decode worker was needed"
    return "pending: arrives with the first decode token"


def format_stats_markdown(stats: ReplyStats, mode: str | None = None) -> str:
    """Render the reply's figures as a Markdown table for the playground's side panel."""
    cached = stats.num_cached_prompt_tokens
    prompt = stats.num_prompt_tokens
    cached_text = _count(cached)
    if cached is not None and prompt:
        cached_text += f" ({100.0 * cached / prompt:.0f}% of the prompt)"
    rows = [
        ("Time to first token (TTFT)", _ms(stats.ttft_ms)),
        ("Decode rate", _rate(stats.decode_tokens_per_s)),
        ("Overall rate (TTFT included)", _rate(stats.overall_tokens_per_s)),
        ("Mean inter-token latency", _ms(stats.mean_itl_ms)),
        ("Prompt tokens", _count(prompt)),
        ("Cached prompt tokens (prefix cache)", cached_text),
        # "–" before any token arrives, like the other rows; 0 only for a reply that ended without one.
        ("Output tokens", _count(stats.num_output_tokens or (0 if stats.finish_reason else None))),
        ("KV handoff (prefill → decode)", describe_handoff(stats, mode)),
        ("Finish reason", stats.finish_reason or "–"),
    ]
    lines = ["| Figure | Value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)

"""Request records and the one place where timings become metrics.

Every door and peer fills `RequestRecord`s with `time.perf_counter()` timestamps taken
on the client side (the benchmark process), and `summarize_run` derives every reported
figure from them, so all systems are timed the same way:

- TTFT: first token time minus the time the request was sent.
- ITL: gaps between consecutive tokens of one request.
- end-to-end latency: last token time minus the time the request was sent.
- output tokens/s: all generated tokens divided by the time from the first request
  sent to the last token received.
- decode tokens/s: per request, (tokens - 1) / (last token - first token), averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (0..100) of `values`, interpolating linearly between ranks.

    Matches numpy's default ("linear") method. Raises ValueError for an empty list or a
    q outside 0..100.
    """
    if not values:
        raise ValueError("percentile of an empty list is undefined")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lower = math.floor(rank)
    upper = min(lower + 1, len(ordered) - 1)
    weight = rank - lower
    return ordered[lower] * (1 - weight) + ordered[upper] * weight


@dataclass(frozen=True)
class LatencySummary:
    """Mean, median and 99th percentile of a set of latencies, in milliseconds."""

    mean_ms: float
    p50_ms: float
    p99_ms: float
    count: int


def summarize_latencies(values_ms: list[float]) -> LatencySummary | None:
    """Summarize latencies in milliseconds; None when there are none."""
    if not values_ms:
        return None
    return LatencySummary(
        mean_ms=sum(values_ms) / len(values_ms),
        p50_ms=percentile(values_ms, 50),
        p99_ms=percentile(values_ms, 99),
        count=len(values_ms),
    )


@dataclass(frozen=True)
class RequestSpec:
    """One benchmark request: what to send and when."""

    prompt_token_ids: list[int]
    max_tokens: int
    """Tokens to generate. Every system is set to ignore EOS, so it generates exactly this many."""
    arrival_s: float = 0.0
    """Seconds after the start of the run at which the request is sent."""
    tag: str = ""
    """Free label that workloads use to pick subsets (for example `decode` and `long`)."""


@dataclass(frozen=True)
class HandoffRecord:
    """KV handoff cost of one disaggregated request, as the decode worker reported it."""

    num_bytes: int
    total_ms: float


@dataclass
class RequestRecord:
    """Client-side timings of one request, in `time.perf_counter()` seconds."""

    spec: RequestSpec
    sent_time: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_cached_prompt_tokens: int = 0
    handoff: HandoffRecord | None = None

    def add_token(self, when: float, token_id: int) -> None:
        self.token_times.append(when)
        self.token_ids.append(token_id)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.spec.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft_ms(self) -> float | None:
        return (self.token_times[0] - self.sent_time) * 1000 if self.token_times else None

    @property
    def e2e_ms(self) -> float | None:
        return (self.token_times[-1] - self.sent_time) * 1000 if self.token_times else None

    @property
    def itls_ms(self) -> list[float]:
        return [(later - earlier) * 1000 for earlier, later in zip(self.token_times, self.token_times[1:])]

    @property
    def decode_tokens_per_s(self) -> float | None:
        if len(self.token_times) < 2 or self.token_times[-1] <= self.token_times[0]:
            return None
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])


@dataclass(frozen=True)
class RunMetrics:
    """Figures measured by one run of a workload through one system."""

    system: str
    """System that served the requests, e.g. `Molten engine`, `Molten HTTP`, `transformers batch 16`."""
    dtype: str
    num_requests: int
    num_output_tokens: int
    duration_s: float
    """From the first request sent to the last token received."""
    output_tokens_per_s: float
    decode_tokens_per_s: float | None
    """Mean over requests of each request's own decode rate (excludes its first token)."""
    ttft: LatencySummary | None
    itl: LatencySummary | None
    e2e: LatencySummary | None
    prefix_hit_rate: float
    """Prompt tokens taken from the prefix cache over all prompt tokens."""
    handoff_bytes_mean: float | None = None
    handoff_ms: LatencySummary | None = None


def summarize_run(system: str, dtype: str, records: list[RequestRecord]) -> RunMetrics:
    """Derive every reported figure of a run from its request records.

    Raises ValueError when no record has a token, because nothing can be measured then.
    """
    finished = [record for record in records if record.token_times]
    if not finished:
        raise ValueError(f"{system}: no request produced a token")
    started = min(record.sent_time for record in records)
    ended = max(record.token_times[-1] for record in finished)
    duration_s = max(ended - started, 1e-9)
    num_output_tokens = sum(record.num_output_tokens for record in records)
    decode_rates = [rate for record in finished if (rate := record.decode_tokens_per_s) is not None]
    num_prompt_tokens = sum(record.num_prompt_tokens for record in records)
    num_cached = sum(record.num_cached_prompt_tokens for record in records)
    handoffs = [record.handoff for record in records if record.handoff is not None]
    return RunMetrics(
        system=system,
        dtype=dtype,
        num_requests=len(records),
        num_output_tokens=num_output_tokens,
        duration_s=duration_s,
        output_tokens_per_s=num_output_tokens / duration_s,
        decode_tokens_per_s=sum(decode_rates) / len(decode_rates) if decode_rates else None,
        ttft=summarize_latencies([record.ttft_ms for record in finished]),
        itl=summarize_latencies([gap for record in finished for gap in record.itls_ms]),
        e2e=summarize_latencies([record.e2e_ms for record in finished]),
        prefix_hit_rate=num_cached / num_prompt_tokens if num_prompt_tokens else 0.0,
        handoff_bytes_mean=sum(h.num_bytes for h in handoffs) / len(handoffs) if handoffs else None,
        handoff_ms=summarize_latencies([h.total_ms for h in handoffs]),
    )


def median_run(runs: list[RunMetrics]) -> RunMetrics:
    """Pick the run with the median decode rate (the lower middle one for an even count)."""
    if not runs:
        raise ValueError("median_run needs at least one run")
    ordered = sorted(runs, key=lambda run: run.decode_tokens_per_s or 0.0)
    return ordered[(len(ordered) - 1) // 2]

"""What the workers' metrics record per token and per step, with the Ray metric objects replaced by recorders.

The end-to-end test reads the same metrics from Ray's Prometheus endpoint. This one pins
the timing arithmetic (TTFT, ITL chains, end-to-end, queue time) without starting Ray.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from molten.deployments.metrics import EngineMetrics
from molten.engine.events import HandoffStats, TokenEvent


class Recorder:
    """Stands in for a Ray Histogram, Counter or Gauge and keeps every call."""

    def __init__(self, name: str):
        self.name = name
        self.values: list[tuple[float, dict | None]] = []

    def observe(self, value, tags=None):
        self.values.append((value, tags))

    def inc(self, value=1, tags=None):
        self.values.append((value, tags))

    set = observe

    @property
    def info(self):
        return {"name": self.name}


@pytest.fixture
def metrics():
    engine_metrics = EngineMetrics("tiny", "colocated", "test-app")
    engine_metrics.stop()
    for name, value in list(vars(engine_metrics).items()):
        if hasattr(value, "info") and hasattr(value, "set_default_tags"):
            setattr(engine_metrics, name, Recorder(value.info["name"]))
    engine_metrics.latency_totals = {
        getattr(engine_metrics, name): Recorder(f"{name}_total") for name in ("ttft", "itl", "e2e", "queue_time")
    }
    return engine_metrics


def token(index: int, *, seq_index: int = 0, finish_reason: str | None = None, handoff=None) -> TokenEvent:
    return TokenEvent(
        request_id="r", seq_index=seq_index, token_id=5, text="x", logprob=None, top_logprobs=None,
        time_since_arrival_ms=0.0, step_id=1, batch_size=1, origin="decode" if index else "prefill", index=index,
        finish_reason=finish_reason, num_prompt_tokens=7, handoff=handoff,
    )


def values(recorder: Recorder) -> list[float]:
    return [value for value, _ in recorder.values]


def test_token_timings_from_arrival(metrics):
    metrics.observe_token(token(0), now=10.5, arrival_time=10.0, previous_token_time=None)
    metrics.observe_token(token(1), now=10.7, arrival_time=10.0, previous_token_time=10.5)
    metrics.observe_token(token(2, finish_reason="length"), now=11.0, arrival_time=10.0, previous_token_time=10.7)

    assert values(metrics.ttft) == [0.5]
    assert values(metrics.latency_totals[metrics.ttft]) == [0.5]
    assert values(metrics.itl) == pytest.approx([0.2, 0.3])
    assert values(metrics.e2e) == [1.0]
    assert values(metrics.prompt_tokens) == [7]
    assert len(metrics.generation_tokens.values) == 3
    assert metrics.requests_finished.values == [(1, {"finish_reason": "length"})]


def test_handoff_recorded_once(metrics):
    stats = HandoffStats(num_bytes=4096, num_blocks=2, export_ms=1.0, transfer_ms=2.0, import_ms=3.0)

    metrics.observe_token(token(1, handoff=stats), now=5.0, arrival_time=1.0, previous_token_time=4.0)

    assert values(metrics.handoff_bytes) == [4096]
    assert values(metrics.handoff_bytes_total) == [4096]
    assert values(metrics.handoff_time) == pytest.approx([0.006])
    assert values(metrics.itl) == [1.0]


def test_zero_latency_skips_total_counter(metrics):
    metrics.observe_token(token(1), now=3.0, arrival_time=1.0, previous_token_time=3.0)

    assert values(metrics.itl) == [0.0]
    assert metrics.latency_totals[metrics.itl].values == []


def test_track_chains_itl_per_sequence(metrics, monkeypatch):
    clock = iter([2.0, 2.1, 2.4, 2.6])
    monkeypatch.setattr("molten.deployments.metrics.time.time", lambda: next(clock))
    events = [token(1, seq_index=0), token(1, seq_index=1), token(2, seq_index=0), token(2, seq_index=1)]

    async def source():
        for event in events:
            yield event

    async def consume():
        return [event async for event in metrics.track(source(), arrival_time=1.0, previous_token_time=1.5)]

    assert asyncio.run(consume()) == events
    # Each sequence's first gap starts at previous_token_time, later gaps at its own last token.
    assert values(metrics.itl) == pytest.approx([0.5, 0.6, 0.4, 0.5])


def test_ttft_once_per_request_with_n(metrics):
    metrics.observe_token(token(0, seq_index=0), 3.0, 1.0, None)
    metrics.observe_token(token(0, seq_index=1), 3.5, 1.0, None)
    assert values(metrics.ttft) == pytest.approx([2.0])
    assert values(metrics.prompt_tokens) == [7]
    assert values(metrics.generation_tokens) == [1, 1]


def test_track_survives_metric_failure(metrics):
    def broken(*args, **kwargs):
        raise ValueError("tag rejected")

    metrics.generation_tokens.inc = broken
    events = [token(0), token(1), token(2, finish_reason="stop")]

    async def source():
        for event in events:
            yield event

    async def consume():
        return [event async for event in metrics.track(source(), arrival_time=1.0)]

    assert asyncio.run(consume()) == events
    assert metrics.num_token_errors == 3


def test_step_sets_gauges_and_queue_times(metrics):
    engine = SimpleNamespace(
        step_stats=SimpleNamespace(last=lambda: SimpleNamespace(admitted=[{"request_id": "r", "queue_ms": 250.0}])),
        scheduler=SimpleNamespace(running=[1, 2], waiting=[3]),
        block_manager=SimpleNamespace(
            num_blocks=10, num_free_blocks=4, prefix_stats=SimpleNamespace(num_queried_tokens=32, num_hit_tokens=16, hit_rate=0.5)
        ),
    )

    metrics.observe_step(engine, [], 0.02)

    assert values(metrics.queue_time) == [0.25]
    assert values(metrics.step_time) == [0.02]
    assert values(metrics.num_running) == [2]
    assert values(metrics.num_waiting) == [1]
    assert values(metrics.kv_blocks_used) == [6]
    assert values(metrics.kv_blocks_free) == [4]
    assert values(metrics.prefix_queried_tokens) == [32]
    assert values(metrics.prefix_hit_tokens) == [16]
    assert values(metrics.prefix_hit_rate) == [0.5]

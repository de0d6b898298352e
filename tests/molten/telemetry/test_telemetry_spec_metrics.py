"""The workers' speculative decoding metrics, recorded from `LLMEngine.last_spec_step` once per step.

The Ray metric objects are replaced by recorders, so the test needs no Ray.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from molten.deployments.metrics import ACCEPTED_LENGTH_BOUNDARIES, EngineMetrics
from molten.engine.spec_decode.stats import SpecDecodeStats, SpecStepStats


class Recorder:
    """Stands in for a Ray Counter or Histogram and keeps every recorded value."""

    def __init__(self, name: str):
        self.name = name
        self.values: list[float] = []

    def inc(self, value=1, tags=None):
        self.values.append(value)

    def observe(self, value, tags=None):
        self.values.append(value)


@pytest.fixture
def metrics():
    engine_metrics = EngineMetrics("tiny", "colocated", "test-app")
    engine_metrics.stop()
    for name in ("spec_draft_tokens", "spec_accepted_tokens", "spec_emitted_tokens", "spec_accepted_length"):
        setattr(engine_metrics, name, Recorder(name))
    return engine_metrics


def spec_step(step_id: int, accepted_lengths: list[int], k: int = 4) -> SpecStepStats:
    totals = SpecDecodeStats(k)
    for accepted in accepted_lengths:
        totals.record(k, accepted, accepted + 1)
    return SpecStepStats(step_id=step_id, method="ngram", num_proposing_seqs=len(accepted_lengths), totals=totals)


def test_step_counts_drafts_accepted_emitted_and_lengths(metrics):
    metrics.observe_spec_step(spec_step(5, [4, 0, 2]))
    assert metrics.spec_draft_tokens.values == [12]
    assert metrics.spec_accepted_tokens.values == [6]
    assert metrics.spec_emitted_tokens.values == [9]
    assert sorted(metrics.spec_accepted_length.values) == [0, 2, 4]


def test_same_step_is_recorded_once(metrics):
    step = spec_step(5, [1])
    engine = SimpleNamespace(
        step_stats=SimpleNamespace(last=lambda: None),
        scheduler=SimpleNamespace(running=[], waiting=[]),
        block_manager=SimpleNamespace(
            num_blocks=4, num_free_blocks=4, prefix_stats=SimpleNamespace(num_queried_tokens=0, num_hit_tokens=0)
        ),
        last_spec_step=step,
    )
    # An engine step that scheduled nothing leaves last_spec_step unchanged.
    metrics.observe_step(engine, [], 0.01)
    metrics.observe_step(engine, [], 0.01)
    assert metrics.spec_draft_tokens.values == [4]
    engine.last_spec_step = spec_step(6, [3])
    metrics.observe_step(engine, [], 0.01)
    assert metrics.spec_accepted_tokens.values == [1, 3]


def test_step_without_verifications_records_nothing(metrics):
    metrics.observe_spec_step(SpecStepStats(step_id=2, method="ngram", totals=SpecDecodeStats(4)))
    metrics.observe_spec_step(None)
    assert metrics.spec_draft_tokens.values == []
    assert metrics.spec_accepted_length.values == []


def test_accepted_length_buckets_separate_each_count():
    # Bucket a + 0.5 holds the verifications that accepted at most a drafts, 0 to 16.
    assert ACCEPTED_LENGTH_BOUNDARIES[0] == 0.5
    assert ACCEPTED_LENGTH_BOUNDARIES[-1] == 16.5
    assert all(later - earlier == 1.0 for earlier, later in itertools.pairwise(ACCEPTED_LENGTH_BOUNDARIES))

"""Percentiles and the run summary every door and peer shares."""

from __future__ import annotations

import numpy as np
import pytest

from molten.bench.metrics import (
    HandoffRecord,
    RequestRecord,
    RequestSpec,
    RunMetrics,
    median_run,
    percentile,
    summarize_run,
)


@pytest.mark.parametrize("values", [[5.0], [3.0, 1.0], [1.0, 2.0, 3.0, 4.0, 10.0], list(np.linspace(0, 7, 33))])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_empty_list():
    with pytest.raises(ValueError, match="empty"):
        percentile([], 50)


def test_percentile_rejects_q_out_of_range():
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], 101)


def make_record(sent: float, token_times: list[float], num_prompt: int = 4, cached: int = 0) -> RequestRecord:
    record = RequestRecord(spec=RequestSpec([7] * num_prompt, len(token_times)), sent_time=sent)
    for index, when in enumerate(token_times):
        record.add_token(when, index)
    record.num_cached_prompt_tokens = cached
    return record


def test_summarize_run_timings():
    records = [
        make_record(0.0, [0.1, 0.2, 0.4]),
        make_record(0.5, [0.8, 1.0], cached=2),
    ]
    metrics = summarize_run("system", "float32", records)

    assert metrics.num_requests == 2
    assert metrics.num_output_tokens == 5
    assert metrics.duration_s == pytest.approx(1.0)
    assert metrics.output_tokens_per_s == pytest.approx(5.0)
    assert metrics.ttft.mean_ms == pytest.approx(200.0)
    assert metrics.ttft.count == 2
    assert metrics.itl.p50_ms == pytest.approx(200.0)
    assert metrics.itl.count == 3
    assert metrics.e2e.p50_ms == pytest.approx(450.0)
    # Per-request decode rates: 2 tokens in 0.3 s and 1 token in 0.2 s.
    assert metrics.decode_tokens_per_s == pytest.approx((2 / 0.3 + 1 / 0.2) / 2)
    assert metrics.prefix_hit_rate == pytest.approx(2 / 8)
    assert metrics.handoff_bytes_mean is None


def test_summarize_run_handoffs():
    records = [make_record(0.0, [0.1, 0.2]), make_record(0.0, [0.1, 0.3])]
    records[0].handoff = HandoffRecord(num_bytes=1000, total_ms=2.0)
    records[1].handoff = HandoffRecord(num_bytes=3000, total_ms=4.0)
    metrics = summarize_run("system", "float32", records)
    assert metrics.handoff_bytes_mean == 2000
    assert metrics.handoff_ms.mean_ms == pytest.approx(3.0)


def test_summarize_run_without_tokens_raises():
    with pytest.raises(ValueError, match="no request produced a token"):
        summarize_run("system", "float32", [make_record(0.0, [])])


def test_single_token_request_has_no_decode_rate():
    metrics = summarize_run("system", "float32", [make_record(0.0, [0.5])])
    assert metrics.decode_tokens_per_s is None
    assert metrics.itl is None
    assert metrics.ttft.p99_ms == pytest.approx(500.0)


def run_with_rate(rate: float) -> RunMetrics:
    return RunMetrics("s", "float32", 1, 1, 1.0, 1.0, rate, None, None, None, 0.0)


def test_median_run_picks_middle_decode_rate():
    runs = [run_with_rate(3.0), run_with_rate(1.0), run_with_rate(2.0)]
    assert median_run(runs).decode_tokens_per_s == 2.0
    assert median_run(runs[:2]).decode_tokens_per_s == 1.0

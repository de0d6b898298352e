"""compare_precisions(quick=True) on a tiny model: every field filled, rejections kept, a plot."""

from __future__ import annotations

import dataclasses
import math

import pytest

from molten.models.errors import PrecisionError
from molten.quant.compare import PrecisionComparison, compare_precisions

MEASURED_FIELDS = [
    "weight_bytes", "weight_fraction_of_fp32", "ttft_ms", "single_stream_tokens_per_s",
    "batched_tokens_per_s", "single_stream_speedup", "perplexity", "perplexity_change_pct",
    "logprob_drift_mean", "logprob_drift_max", "top1_agreement", "load_seconds",
]


@pytest.fixture(scope="module")
def comparison() -> PrecisionComparison:
    return compare_precisions("tiny-random-llama", ["fp32", "int8", "fp16"], quick=True)


def test_rows_have_every_field(comparison):
    assert [row.precision for row in comparison.rows] == ["fp32", "int8", "fp16"]
    fp32, int8, fp16 = comparison.rows
    for field in MEASURED_FIELDS:
        assert getattr(int8, field) is not None, field
        assert getattr(fp32, field) is not None or field.startswith(("logprob", "top1")), field
    assert fp32.weight_fraction_of_fp32 == 1.0
    assert fp32.perplexity_change_pct == 0.0
    assert math.isfinite(int8.perplexity)
    assert 0.2 < int8.weight_fraction_of_fp32 < 0.3
    assert int8.logprob_drift_max >= int8.logprob_drift_mean > 0
    assert 0.0 <= int8.top1_agreement <= 1.0
    assert fp16.error is not None and "fp16" in fp16.error
    assert fp16.perplexity is None


def test_table_and_dict(comparison):
    table = comparison.to_markdown()
    assert table.count("\n") == 2 + len(comparison.rows)
    assert "| int8 |" in table
    assert "rejected" in table
    record = comparison.to_dict()
    assert record["model"] == "tiny-random-llama"
    assert record["num_corpus_tokens"] == 256
    assert set(record["rows"][1]) == {field.name for field in dataclasses.fields(comparison.rows[1])}


def test_save_plot_writes_png(comparison, tmp_path):
    path = tmp_path / "precisions.png"
    comparison.save_plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_suffix_and_unknown_precision_rejected():
    with pytest.raises(PrecisionError, match="without a precision suffix"):
        compare_precisions("tiny-random-llama:int8", ["fp32"])
    with pytest.raises(PrecisionError, match="int2"):
        compare_precisions("tiny-random-llama", ["int2"])

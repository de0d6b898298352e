"""Each learning-path stage in quick mode on the tiny model: figures present, consistent, and saved."""

from __future__ import annotations

import math

import pytest

from molten.experiments.record import load_record
from molten.experiments.runner import run_stage
from molten.experiments.stage_list import STAGE_LIST
from molten.experiments.stages import STAGES, StageSettingsError, get_stage

KV_BLOCK_SIZE = 16
TINY_KV_BYTES_PER_TOKEN_FP32 = 2 * 4 * 2 * 16 * 4
"""tiny-random-llama: 2 (K, V) x 4 layers x 2 KV heads x head_dim 16 x 4 bytes."""


def run_quick(name: str, root, overrides: dict | None = None):
    lines: list[str] = []
    record = run_stage(name, overrides, quick=True, threads=1, progress=lines.append, root=root)
    assert lines, "a stage must report progress"
    assert record.plot_png.startswith(b"\x89PNG")
    assert record.rows and all(len(row) == len(record.columns) for row in record.rows)
    assert load_record(record.record_id, root) == record
    return record


def column(record, name: str) -> list:
    index = record.columns.index(name)
    return [row[index] for row in record.rows]


def test_stage_list_matches_modules():
    assert [(stage.number, stage.name, stage.title) for stage in STAGES.values()] == list(STAGE_LIST)
    assert get_stage("3").name == "batch-size"


def test_model_size_precision_halves_memory(tmp_path):
    record = run_quick("model-size", tmp_path)
    assert column(record, "dtype") == ["float32", "bfloat16"]
    float32_mb, bfloat16_mb = column(record, "weight MB")
    assert bfloat16_mb == pytest.approx(float32_mb / 2, rel=0.01)
    assert column(record, "KV bytes per token") == [TINY_KV_BYTES_PER_TOKEN_FP32, TINY_KV_BYTES_PER_TOKEN_FP32 // 2]
    assert all(value > 0 for value in column(record, "decode tokens/s"))
    assert record.summary["copy_bandwidth_gb_per_s"] > 0
    assert record.environment["torch_threads"] == "1"


def test_batch_size_amortizes_weight_reads(tmp_path):
    record = run_quick("batch-size", tmp_path)
    assert column(record, "batch size") == [1, 2, 4]
    per_token = column(record, "weight bytes read per token (MB)")
    assert per_token[0] == pytest.approx(2 * per_token[1], rel=0.01)
    assert per_token[0] == pytest.approx(4 * per_token[2], rel=0.01)
    assert all(value > 0 for value in column(record, "output tokens/s (decode)"))
    assert record.settings["quick"] is True


def test_context_length_kv_grows_with_tokens(tmp_path):
    record = run_quick("context-length", tmp_path)
    lengths = column(record, "prompt tokens")
    assert lengths == [16, 32, 64, 128]
    kv_mib = column(record, "KV MiB at end")
    assert kv_mib == sorted(kv_mib)
    assert len(set(kv_mib)) == len(kv_mib)
    max_tokens = record.settings["max_tokens"]
    for length, mib in zip(lengths, kv_mib):
        assert mib == pytest.approx((length + max_tokens) * TINY_KV_BYTES_PER_TOKEN_FP32 / 2**20, abs=1e-3)
    for length, blocks in zip(lengths, column(record, "KV blocks used (peak)")):
        # Blocks are read after each step; the last token's step frees them, so the peak
        # holds every token but the last.
        assert blocks == math.ceil((length + max_tokens - 1) / KV_BLOCK_SIZE)
    assert record.summary["kv_bytes_per_token"] == TINY_KV_BYTES_PER_TOKEN_FP32


def test_disaggregation_handoff_bytes(tmp_path):
    record = run_quick("disaggregation", tmp_path)
    assert column(record, "mode") == ["co-located", "disaggregated"]
    assert record.summary["same_tokens_in_both_modes"] is True
    prompt_tokens = record.settings["prompt_tokens"]
    expected = math.ceil(prompt_tokens / KV_BLOCK_SIZE) * KV_BLOCK_SIZE * TINY_KV_BYTES_PER_TOKEN_FP32
    assert record.summary["handoff_bytes_per_request"] == expected
    assert record.summary["handoff_ms_per_request"] > 0


def test_speculative_keeps_greedy_output(tmp_path):
    record = run_quick("speculative", tmp_path)
    assert column(record, "k") == [0, 1, 2, 4]
    assert record.summary["all_outputs_equal_baseline"] is True
    for rate in column(record, "acceptance rate")[1:]:
        assert 0.0 <= rate <= 1.0
    assert all(value >= 1.0 for value in column(record, "tokens per step"))


def test_parallel_sampling_sharing_saves_blocks(tmp_path):
    record = run_quick("parallel-sampling", tmp_path)
    ns = column(record, "n")
    unshared = column(record, "peak blocks, no prefix cache")
    together = column(record, "peak blocks, prefix cache, together")
    staggered = column(record, "peak blocks, prefix cache, staggered")
    forked = column(record, "peak blocks, forked in the engine")
    assert ns == [1, 2, 4]
    assert unshared == [unshared[0] * n for n in ns]
    assert together == unshared
    assert staggered[0] == unshared[0]
    assert forked[0] == unshared[0]
    assert all(shared < alone for shared, alone in zip(staggered[1:], unshared[1:]))
    # The 64-token prompt fills 4 blocks. A fork shares the first 3 and copies the block
    # holding the last prompt token, so each extra completion adds 2 blocks (that copy
    # and one block of output).
    assert forked == [unshared[0] + 2 * (n - 1) for n in ns]
    ratios = column(record, "peak KV ratio, forked / no prefix cache")
    assert ratios == [round(shared / alone, 3) for shared, alone in zip(forked, unshared)]
    assert record.summary["kv_ratio_forked_vs_independent_n4"] == ratios[-1]


def test_quantization_records_comparison(tmp_path):
    record = run_quick("quantization", tmp_path)
    precisions = column(record, "precision")
    assert precisions == ["fp32", "int8"]
    fp32_bytes, int8_bytes = column(record, "weight_bytes")
    assert int8_bytes < fp32_bytes / 2


def test_unknown_setting_names_fields(tmp_path):
    with pytest.raises(StageSettingsError, match="has no setting 'batchsize'.*batch_sizes"):
        run_stage("batch-size", {"batchsize": "1"}, quick=True, root=tmp_path)


def test_bad_setting_value(tmp_path):
    with pytest.raises(StageSettingsError, match="batch_sizes"):
        run_stage("batch-size", {"batch_sizes": "1,zero"}, quick=True, root=tmp_path)
    with pytest.raises(StageSettingsError, match="batch_sizes must contain integers >= 1"):
        run_stage("batch-size", {"batch_sizes": "0"}, quick=True, root=tmp_path)
    with pytest.raises(StageSettingsError, match="unknown stage"):
        run_stage("no-such-stage", root=tmp_path)
    assert not any(tmp_path.iterdir())

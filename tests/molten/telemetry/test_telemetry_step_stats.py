"""Engine step records: token counts, bytes and FLOPs from shapes, on the tiny random Llama."""

from __future__ import annotations

import time

import pytest
import torch

from molten.config import CacheConfig, EngineConfig, SchedulerConfig
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams
from molten.engine.step_stats import StepCostModel

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_llama():
    from molten.models import load_model

    return load_model("tiny-random-llama", dtype=torch.float32)


def make_engine(loaded, *, step_history: int = 64, chunk: int = 64) -> LLMEngine:
    config = EngineConfig(
        model="tiny-random-llama",
        cache=CacheConfig(kv_block_size=4, num_kv_blocks=64),
        scheduler=SchedulerConfig(max_num_batched_tokens=chunk),
        step_history=step_history,
    )
    return LLMEngine(config, loaded)


def expected_linear_flops_per_token(config) -> int:
    """2 * multiply-adds of a Llama layer stack: q, k, v, o projections and the gated MLP."""
    h, heads, kv_heads, d, inter = (
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        config.intermediate_size,
    )
    per_layer = h * heads * d + 2 * h * kv_heads * d + heads * d * h + 3 * h * inter
    return 2 * per_layer * config.num_hidden_layers


def test_cost_model_from_llama_shapes(tiny_llama):
    model = tiny_llama.model
    config = model.config
    kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4

    cost = StepCostModel.from_model(model, kv_bytes_per_token)

    all_bytes = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    embedding_bytes = config.vocab_size * config.hidden_size * 4
    assert cost.embedding_row_bytes == config.hidden_size * 4
    assert cost.lm_head_bytes == config.vocab_size * config.hidden_size * 4
    assert cost.body_weight_bytes == all_bytes - embedding_bytes - cost.lm_head_bytes
    assert cost.linear_flops_per_token == expected_linear_flops_per_token(config)
    assert cost.lm_head_flops_per_row == 2 * config.hidden_size * config.vocab_size
    assert cost.attention_flops_per_pair == 4 * config.num_attention_heads * config.head_dim * config.num_hidden_layers


def test_cost_model_counts_tied_weights_once(tiny_llama):
    model = tiny_llama.model
    tied = type(model)(model.config)
    tied.lm_head.weight = tied.model.embed_tokens.weight

    cost = StepCostModel.from_model(tied, 1)

    all_bytes = sum(p.numel() * 4 for p in tied.parameters()) + sum(b.numel() * b.element_size() for b in tied.buffers())
    assert cost.body_weight_bytes == all_bytes - cost.lm_head_bytes


def test_step_records_prefill_then_decode(tiny_llama):
    engine = make_engine(tiny_llama, chunk=8)
    cost = engine.step_stats.cost_model
    prompt = list(range(5, 17))  # 12 tokens: chunks of 8 and 4
    before = time.time()
    engine.add_request("r1", prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))

    while engine.has_unfinished():
        engine.step()

    records = engine.step_stats.records_after(None)
    assert [r.num_prefill_tokens for r in records] == [8, 4, 0, 0]
    assert [r.num_decode_tokens for r in records] == [0, 0, 1, 1]
    assert records[0].prefill_chunks == [{"request_id": "r1", "num_tokens": 8}]
    assert records[2].decode_request_ids == ["r1"]
    assert [r["request_id"] for r in records[0].admitted] == ["r1"]
    assert all(not r.admitted for r in records[1:])
    assert 0 <= records[0].admitted[0]["queue_ms"] <= (time.time() - before) * 1000

    first_chunk, last_chunk, decode = records[0], records[1], records[2]
    # The first chunk computes no logits, so the LM head is not read.
    assert first_chunk.weight_bytes == cost.body_weight_bytes + 8 * cost.embedding_row_bytes
    assert last_chunk.weight_bytes == cost.body_weight_bytes + 4 * cost.embedding_row_bytes + cost.lm_head_bytes
    assert first_chunk.kv_bytes_read == 8 * cost.kv_bytes_per_token
    assert last_chunk.kv_bytes_read == 12 * cost.kv_bytes_per_token
    assert decode.kv_bytes_read == 13 * cost.kv_bytes_per_token
    assert decode.kv_bytes_written == cost.kv_bytes_per_token
    # Positions 8..11 attend to 9..12 keys, and the decode token at position 12 to 13.
    assert last_chunk.flops == (
        4 * cost.linear_flops_per_token + (9 + 10 + 11 + 12) * cost.attention_flops_per_pair + cost.lm_head_flops_per_row
    )
    assert decode.flops == cost.linear_flops_per_token + 13 * cost.attention_flops_per_pair + cost.lm_head_flops_per_row


def test_step_record_rates_and_ids(tiny_llama):
    engine = make_engine(tiny_llama)
    engine.generate([[5, 6, 7], [8, 9, 10, 11]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))

    records = engine.step_stats.records_after(None)
    ids = [r.step_id for r in records]
    assert ids == sorted(ids)
    assert records[0].batch_size == 2
    assert records[0].num_prefill_tokens == 7
    for record in records:
        assert record.duration_ms > 0
        assert 0 < record.forward_ms <= record.duration_ms
        seconds = record.duration_ms / 1000
        assert record.achieved_bandwidth_bytes_per_s == pytest.approx(
            (record.weight_bytes + record.kv_bytes_read) / seconds, rel=1e-6
        )
        assert record.achieved_flops_per_s == pytest.approx(record.flops / seconds, rel=1e-6)
    assert engine.step_stats.records_after(ids[1]) == records[2:]
    assert set(records[0].to_dict()) >= {
        "step_id", "time", "duration_ms", "batch_size", "num_prefill_tokens", "num_decode_tokens",
        "num_preemptions", "prefill_chunks", "decode_request_ids", "weight_bytes", "kv_bytes_read", "flops",
        "achieved_bandwidth_bytes_per_s", "achieved_flops_per_s",
    }


def test_step_history_keeps_newest_or_none(tiny_llama):
    short_history = make_engine(tiny_llama, step_history=2)
    short_history.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    off = make_engine(tiny_llama, step_history=0)
    off.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))

    kept_ids = [r.step_id for r in short_history.step_stats.records_after(None)]
    assert kept_ids == [short_history.num_steps - 1, short_history.num_steps]
    assert off.step_stats.records_after(None) == []
    assert off.step_stats.last() is None

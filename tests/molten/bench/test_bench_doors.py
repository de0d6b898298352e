"""The engine door and the transformers peer on tiny-random-llama: token counts, arrivals, tokens."""

from __future__ import annotations

import time

import pytest
import torch

from molten.bench.door_engine import BenchTimeoutError, EngineDoor, benchmark_params
from molten.bench.door_serve import HttpDoor, parse_token_chunk
from molten.bench.metrics import RequestSpec
from molten.bench.peer_transformers import TransformersPeer
from molten.config import CacheConfig, EngineConfig
from molten.engine.llm_engine import LLMEngine

MODEL = "tiny-random-llama"


@pytest.fixture(scope="module")
def tiny_models():
    from molten.models import load_model

    torch.set_num_threads(1)
    # Two copies: the engine replaces the attention of the model it runs.
    return load_model(MODEL), load_model(MODEL)


def engine_door(loaded, **cache) -> EngineDoor:
    config = EngineConfig(model=MODEL, max_model_len=512, cache=CacheConfig(num_kv_blocks=256, **cache))
    return EngineDoor.build(config, loaded)


def prompt(start: int, length: int) -> list[int]:
    return [300 + (start + i) % 1000 for i in range(length)]


def test_engine_door_token_counts(tiny_models):
    door = engine_door(tiny_models[0])
    requests = [RequestSpec(prompt(0, 5), 3), RequestSpec(prompt(50, 40), 7), RequestSpec(prompt(9, 1), 1)]
    records = door.run(requests, time_limit_s=120)

    assert [r.spec for r in records] == requests
    assert [r.num_output_tokens for r in records] == [3, 7, 1]
    assert all(len(r.token_ids) == r.num_output_tokens for r in records)
    assert all(r.token_times == sorted(r.token_times) for r in records)
    assert all(r.token_times[0] >= r.sent_time for r in records)
    assert not door.engine.has_unfinished()


def test_engine_door_tokens_match_generate(tiny_models):
    door = engine_door(tiny_models[0])
    prompts = [prompt(0, 12), prompt(100, 30)]
    records = door.run([RequestSpec(p, 6) for p in prompts], time_limit_s=120)
    expected = door.engine.generate(prompts, benchmark_params(6))
    assert [r.token_ids for r in records] == expected


def test_engine_door_honours_arrival_times(tiny_models):
    door = engine_door(tiny_models[0])
    started = time.perf_counter()
    records = door.run([RequestSpec(prompt(0, 4), 2, 0.0), RequestSpec(prompt(5, 4), 2, 0.3)], time_limit_s=120)
    assert records[0].sent_time - started < 0.3
    assert records[1].sent_time - started >= 0.3


def test_engine_door_reports_prefix_hits(tiny_models):
    door = engine_door(tiny_models[0], kv_block_size=16)
    shared = prompt(0, 64)
    first = door.run([RequestSpec(shared + [400], 2)], time_limit_s=120)
    second = door.run([RequestSpec(shared + [401], 2)], time_limit_s=120)
    assert first[0].num_cached_prompt_tokens == 0
    assert second[0].num_cached_prompt_tokens == 64


def test_engine_door_time_limit_leaves_engine_empty(tiny_models):
    door = engine_door(tiny_models[0])
    with pytest.raises(BenchTimeoutError):
        door.run([RequestSpec(prompt(0, 8), 400, 0.0)], time_limit_s=0.05)
    assert not door.engine.has_unfinished()


def test_transformers_peer_counts_and_tokens(tiny_models):
    peer = TransformersPeer.for_model(tiny_models[1])
    requests = [RequestSpec(prompt(0, 12), 6), RequestSpec(prompt(100, 30), 4), RequestSpec(prompt(7, 20), 5)]

    sequential = peer.run(requests, batch_size=1, time_limit_s=120)
    batched = peer.run(requests, batch_size=2, time_limit_s=120)

    assert [r.num_output_tokens for r in sequential] == [6, 4, 5]
    assert [r.num_output_tokens for r in batched] == [6, 4, 5]
    # Requests of one static batch are sent together.
    assert batched[0].sent_time == batched[1].sent_time
    assert batched[2].sent_time > batched[1].sent_time

    config = EngineConfig(model=MODEL, max_model_len=512, cache=CacheConfig(num_kv_blocks=256))
    engine = LLMEngine(config, tiny_models[0])
    expected = [engine.generate([r.prompt_token_ids], benchmark_params(r.max_tokens))[0] for r in requests]
    assert [r.token_ids for r in sequential] == expected


def test_parse_token_chunk_reads_molten_timings():
    chunk = {
        "choices": [{"index": 0, "text": "a"}],
        "molten": {
            "index": 0,
            "token_id": 42,
            "num_cached_prompt_tokens": 16,
            "handoff": {"bytes": 4096, "total_ms": 1.5},
        },
    }
    token = parse_token_chunk(chunk)
    assert token.token_id == 42
    assert token.num_cached_prompt_tokens == 16
    assert token.handoff.num_bytes == 4096
    assert token.handoff.total_ms == 1.5


def test_http_door_only_sends_to_loopback():
    with pytest.raises(ValueError, match="127.0.0.1"):
        HttpDoor("model", "http://example.com:8000")

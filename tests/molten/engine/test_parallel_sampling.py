"""`n > 1` requests: one prompt computation, prompt KV blocks shared, the last one copied on write."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import MAX_STEPS, greedy_params, random_prompts, run_to_completion

from molten.engine.async_engine import AsyncEngine
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams

NEW_TOKENS = 12
KV_BLOCK_SIZE = 16


def run_parallel(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> tuple[list[list[int]], list]:
    """Run one request and return each sequence's tokens (by seq_index) and every step's output."""
    engine.add_request("parallel", prompt, params)
    tokens: list[list[int]] = [[] for _ in range(params.n)]
    steps = []
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished():
            break
        for event in engine.step():
            tokens[event.seq_index].append(event.token_id)
        steps.append(engine.last_step)
    assert not engine.has_unfinished()
    return tokens, steps


def test_greedy_sequences_match_single(tiny_llama, make_engine):
    prompt = random_prompts(3, 1, 40, 40)[0]  # 40 tokens: two full blocks and a partial one
    expected = run_to_completion(make_engine(tiny_llama), [prompt], greedy_params(NEW_TOKENS)).outputs()[0]
    engine = make_engine(tiny_llama)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, n=3)
    tokens, _ = run_parallel(engine, prompt, params)
    assert tokens == [expected] * 3
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("prompt_len", [33, 48], ids=["partial-last-block", "full-last-block"])
def test_seeded_sequences_match_separate_requests(tiny_llama, make_engine, prompt_len):
    prompt = random_prompts(5, 1, prompt_len, prompt_len)[0]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=40, ignore_eos=True, n=3)
    separate = [
        SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=40 + index, ignore_eos=True) for index in range(3)
    ]
    expected = run_to_completion(make_engine(tiny_llama), [prompt] * 3, separate).outputs()
    tokens, _ = run_parallel(make_engine(tiny_llama, enable_prefix_caching=False), prompt, params)
    assert tokens == expected
    assert len({tuple(t) for t in tokens}) == 3


def test_prompt_computed_once_and_blocks_shared(tiny_llama, make_engine):
    prompt = random_prompts(7, 1, 40, 40)[0]
    engine = make_engine(tiny_llama, enable_prefix_caching=False)
    engine.add_request("parallel", prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.8, n=4, ignore_eos=True))
    engine.step()  # the whole prompt of sequence 0, then the fork
    seqs = engine.sequences["parallel"]
    assert len(seqs) == 4
    engine.step()  # each child recomputes only the last prompt token
    assert [item.num_new_tokens for item in engine.last_step.scheduled] == [1, 1, 1, 1]
    parent = seqs[0]
    num_full = (len(prompt) - 1) // KV_BLOCK_SIZE
    for child in seqs[1:]:
        assert child.block_table[:num_full] == parent.block_table[:num_full]
        assert child.block_table[num_full] != parent.block_table[num_full]
    for block_id in parent.block_table[:num_full]:
        assert engine.block_manager.blocks[block_id].ref_count == 4
    assert engine.block_manager.num_saved_blocks == 3 * num_full
    state = engine.kv_state()
    assert state["saved_kv_bytes"] == 3 * num_full * engine.kv_cache.spec.bytes_per_block
    engine.check_block_accounting()
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_frees_every_sequence(tiny_llama, make_engine):
    engine = make_engine(tiny_llama)
    engine.add_request("parallel", random_prompts(9, 1, 30, 30)[0], SamplingParams(max_tokens=50, n=3, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert len(engine.sequences["parallel"]) == 3
    assert engine.abort_request("parallel")
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_max_tokens_one_still_forks(tiny_llama, make_engine):
    engine = make_engine(tiny_llama)
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=1, n=3)
    tokens, _ = run_parallel(engine, random_prompts(10, 1, 20, 20)[0], params)
    assert [len(t) for t in tokens] == [1, 1, 1]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_async_stream_waits_for_all_sequences(tiny_llama, make_engine):
    async def collect(async_engine: AsyncEngine) -> list:
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3, ignore_eos=True)
        return [event async for event in async_engine.generate("parallel", random_prompts(12, 1, 10, 10)[0], params)]

    async_engine = AsyncEngine(make_engine(tiny_llama), name="parallel-test")
    try:
        events = asyncio.run(asyncio.wait_for(collect(async_engine), timeout=120))
    finally:
        async_engine.shutdown()
    assert sorted({event.seq_index for event in events}) == [0, 1, 2]
    assert sum(1 for event in events if event.finish_reason is not None) == 3
    assert len(events) == 18

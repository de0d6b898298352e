"""Chunked prefill, prefix caching and preemption change how the engine computes, never what it outputs."""

from __future__ import annotations

import random

import pytest
from engine_helpers import (
    greedy_params,
    mismatched_indices,
    random_prompts,
    random_tokens,
    run_to_completion,
)

from molten.engine.llm_engine import PromptTooLongError

MAX_NEW_TOKENS = 24
MODEL = "tiny-random-llama"


@pytest.fixture(scope="module")
def mixed_prompts() -> list[list[int]]:
    return random_prompts(seed=2, count=16, max_len=200)


@pytest.fixture(scope="module")
def shared_prefix_prompts() -> list[list[int]]:
    """Ten prompts that start with the same 100 tokens; four also share the next 40."""
    rng = random.Random(3)
    common = random_tokens(rng, 100)
    second_level = random_tokens(rng, 40)
    prompts = [common + random_tokens(rng, rng.randint(1, 40)) for _ in range(6)]
    prompts += [common + second_level + random_tokens(rng, rng.randint(1, 20)) for _ in range(4)]
    return prompts


def test_chunked_prefill_on_and_off_match(tiny_llama, make_engine, reference_generate, mixed_prompts):
    expected = reference_generate(MODEL, mixed_prompts, MAX_NEW_TOKENS)
    chunked = make_engine(tiny_llama, max_num_batched_tokens=32, enable_chunked_prefill=True, max_model_len=256)
    whole = make_engine(tiny_llama, max_num_batched_tokens=256, enable_chunked_prefill=False, max_model_len=256)

    chunked_run = run_to_completion(chunked, mixed_prompts, greedy_params(MAX_NEW_TOKENS))
    whole_run = run_to_completion(whole, mixed_prompts, greedy_params(MAX_NEW_TOKENS))

    chunked_rows = [item for step in chunked_run.steps for item in step.scheduled]
    whole_rows = [item for step in whole_run.steps for item in step.scheduled]
    assert any(1 < item.num_new_tokens < item.seq.num_prompt_tokens for item in chunked_rows)
    assert all(item.num_new_tokens in (1, item.seq.num_prompt_tokens) for item in whole_rows)
    assert max(step.num_batched_tokens for step in chunked_run.steps) <= 32
    assert any(step.num_prefill_tokens and step.num_decode_tokens for step in chunked_run.steps)
    assert len(chunked_run.steps) > len(whole_run.steps)
    assert not mismatched_indices(chunked_run.outputs(), expected)
    assert not mismatched_indices(whole_run.outputs(), expected)
    assert chunked_run.outputs() == whole_run.outputs()


def test_chunk_boundaries_inside_and_on_blocks(tiny_llama, make_engine, reference_generate):
    """Budgets of 7 and 16 put chunk ends both inside a 16-token block and on its edge."""
    prompts = random_prompts(seed=4, count=6, min_len=30, max_len=90)
    expected = reference_generate(MODEL, prompts, 8)

    for budget in (7, 16):
        engine = make_engine(tiny_llama, max_num_batched_tokens=budget, max_model_len=128)
        run = run_to_completion(engine, prompts, greedy_params(8))

        mismatches = mismatched_indices(run.outputs(), expected)
        assert not mismatches, f"budget {budget}: prompts {mismatches} differ"


def test_prefix_caching_on_and_off_match(tiny_llama, make_engine, reference_generate, shared_prefix_prompts):
    expected = reference_generate(MODEL, shared_prefix_prompts, MAX_NEW_TOKENS)
    cached = make_engine(tiny_llama, enable_prefix_caching=True)
    uncached = make_engine(tiny_llama, enable_prefix_caching=False)
    first, rest = shared_prefix_prompts[:1], shared_prefix_prompts[1:]
    params = greedy_params(MAX_NEW_TOKENS)

    # The first request runs alone, so its blocks are cached before the others arrive.
    cached_first = run_to_completion(cached, first, params, prefix="first")
    cached_rest = run_to_completion(cached, rest, params, prefix="rest")
    uncached_first = run_to_completion(uncached, first, params, prefix="first")
    uncached_rest = run_to_completion(uncached, rest, params, prefix="rest")

    cached_outputs = cached_first.outputs() + cached_rest.outputs()
    uncached_outputs = uncached_first.outputs() + uncached_rest.outputs()
    assert not mismatched_indices(cached_outputs, expected)
    assert not mismatched_indices(uncached_outputs, expected)

    second_request = cached_rest.events["rest-0"][0]
    assert second_request.num_cached_prompt_tokens > 0
    assert second_request.num_cached_prompt_tokens == 96  # 100 shared tokens = 6 full blocks of 16
    assert cached.block_manager.prefix_stats.hit_rate > 0
    assert uncached.block_manager.prefix_stats.hit_rate == 0
    assert all(events[0].num_cached_prompt_tokens == 0 for events in uncached_rest.events.values())

    cached.check_block_accounting()
    assert cached.block_manager.num_free_blocks == cached.block_manager.num_blocks


def test_prefix_hit_on_whole_prompt(tiny_llama, make_engine, reference_generate):
    """A repeated prompt of whole blocks reuses all but its last block, whose last token is recomputed."""
    prompt = random_prompts(seed=5, count=1, min_len=64, max_len=64)
    expected = reference_generate(MODEL, prompt, 8)
    engine = make_engine(tiny_llama)

    first = run_to_completion(engine, prompt, greedy_params(8), prefix="first")
    again = run_to_completion(engine, prompt, greedy_params(8), prefix="again")

    assert again.events["again-0"][0].num_cached_prompt_tokens == 48
    assert first.outputs() == expected
    assert again.outputs() == expected


@pytest.mark.parametrize("enable_prefix_caching", [False, True], ids=["no-prefix-cache", "prefix-cache"])
def test_preemption_keeps_outputs(tiny_llama, make_engine, reference_generate, enable_prefix_caching):
    prompts = random_prompts(seed=2, count=10, max_len=120)
    expected = reference_generate(MODEL, prompts, MAX_NEW_TOKENS)
    # 10 blocks of 16 tokens: the longest sequence (120 + 24 tokens) fits alone, but the
    # batch does not, so running sequences are preempted and recomputed.
    engine = make_engine(tiny_llama, num_kv_blocks=10, enable_prefix_caching=enable_prefix_caching)

    run = run_to_completion(engine, prompts, greedy_params(MAX_NEW_TOKENS))

    preempted_seqs = {seq.request_id: seq.num_preemptions for step in run.steps for seq in step.preempted}
    assert run.num_preempted > 0
    assert all(count > 0 for count in preempted_seqs.values())
    mismatches = mismatched_indices(run.outputs(), expected)
    assert not mismatches, f"prompts {mismatches} differ after preemption"
    engine.check_block_accounting()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_pool_smaller_than_context_caps_length(tiny_llama, make_engine, reference_generate):
    """With a pool of 4 blocks of 16 tokens, a sequence can never grow past 64 tokens."""
    engine = make_engine(tiny_llama, num_kv_blocks=4, max_model_len=512)
    prompt = random_prompts(seed=6, count=1, min_len=50, max_len=50)

    run = run_to_completion(engine, prompt, greedy_params(30))

    assert engine.facts.max_model_len == 64
    assert len(run.outputs()[0]) == 14
    assert run.events["req-0"][-1].finish_reason == "length"
    assert run.outputs()[0] == reference_generate(MODEL, prompt, 14)[0]
    with pytest.raises(PromptTooLongError):
        engine.add_request("too-long", list(range(3, 67)), greedy_params(1))

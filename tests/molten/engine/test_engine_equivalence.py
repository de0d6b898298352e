"""The engine's greedy tokens equal transformers `generate()` on the tiny models, alone and batched."""

from __future__ import annotations

import pytest
from engine_helpers import greedy_params, mismatched_indices, random_prompts, run_to_completion

MAX_NEW_TOKENS = 24
NUM_PROMPTS = 40
NUM_PROMPTS_ONE_AT_A_TIME = 8
"""One request at a time costs a full step per token, so that test runs the first prompts only."""

FAMILIES = ["tiny-random-llama", "tiny-random-qwen2"]


@pytest.fixture(params=FAMILIES, ids=["llama", "qwen2"])
def loaded_family(request, tiny_llama, tiny_qwen2):
    return {"tiny-random-llama": tiny_llama, "tiny-random-qwen2": tiny_qwen2}[request.param]


def test_one_at_a_time_matches_generate(loaded_family, make_engine, reference_generate):
    prompts = random_prompts(seed=1, count=NUM_PROMPTS, max_len=200)[:NUM_PROMPTS_ONE_AT_A_TIME]
    expected = reference_generate(loaded_family.model_id, prompts, MAX_NEW_TOKENS)
    engine = make_engine(loaded_family)

    outputs = [
        run_to_completion(engine, [prompt], greedy_params(MAX_NEW_TOKENS), prefix=f"single-{index}").outputs()[0]
        for index, prompt in enumerate(prompts)
    ]

    mismatches = mismatched_indices(outputs, expected)
    assert not mismatches, f"prompts {mismatches} (lengths {[len(prompts[i]) for i in mismatches]}) differ"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_continuous_batch_matches_generate(loaded_family, make_engine, reference_generate):
    prompts = random_prompts(seed=1, count=NUM_PROMPTS, max_len=200)
    expected = reference_generate(loaded_family.model_id, prompts, MAX_NEW_TOKENS)
    # 256 tokens per step: the first steps hold several prompts, and later prompts join
    # while earlier ones decode, so prefill chunks and decode rows share batches.
    engine = make_engine(loaded_family, max_num_batched_tokens=256)

    run = run_to_completion(engine, prompts, greedy_params(MAX_NEW_TOKENS))

    mismatches = mismatched_indices(run.outputs(), expected)
    assert not mismatches, f"prompts {mismatches} (lengths {[len(prompts[i]) for i in mismatches]}) differ"
    assert max(len(step.scheduled) for step in run.steps) > 1
    assert any(step.num_prefill_tokens and step.num_decode_tokens for step in run.steps)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.check_block_accounting()


def test_generate_length_and_ids_are_plausible(loaded_family, reference_generate):
    """Guard the reference itself: a broken reference would make the tests above meaningless."""
    prompts = random_prompts(seed=1, count=NUM_PROMPTS, max_len=200)
    expected = reference_generate(loaded_family.model_id, prompts, MAX_NEW_TOKENS)

    assert all(len(tokens) == MAX_NEW_TOKENS for tokens in expected)
    assert len({tuple(tokens) for tokens in expected}) > NUM_PROMPTS // 2

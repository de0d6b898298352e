"""The runner packs steps into its preallocated buffers: slots, decode-first order, growth past the limits."""

from __future__ import annotations

import torch
from engine_helpers import greedy_params, random_prompts, run_to_completion

from molten.engine.kv_cache import PagedKVCache
from molten.engine.model_runner import ModelRunner


def step_until_mixed(engine, max_steps: int = 100):
    """Step until the scheduler's next output mixes decodes with a prefill chunk that has earlier context."""
    for _ in range(max_steps):
        output = engine.scheduler.schedule()
        has_decode = any(item.num_new_tokens == 1 and item.seq.num_computed_tokens > 0 for item in output.scheduled)
        has_chunk = any(item.num_new_tokens > 1 and item.seq.num_computed_tokens > 0 for item in output.scheduled)
        if has_decode and has_chunk:
            return output
        engine._update(output, engine.runner.execute(output))
    raise AssertionError(f"no mixed step in {max_steps} steps")


def test_slots_and_order_match_block_tables(tiny_llama, make_engine):
    engine = make_engine(tiny_llama, max_num_batched_tokens=48)
    for index, prompt in enumerate(random_prompts(seed=3, count=4, min_len=60, max_len=120)):
        engine.add_request(f"slots-{index}", prompt, greedy_params(max_tokens=40))
    output = step_until_mixed(engine)

    with torch.inference_mode():
        inputs = engine.runner.prepare(output)

    size = engine.block_manager.kv_block_size
    decodes = [item for item in output.scheduled if item.num_new_tokens == 1 and item.seq.num_computed_tokens > 0]
    others = [item for item in output.scheduled if item not in decodes]
    expected_ids, expected_positions, expected_slots = [], [], []
    for item in decodes + others:
        seq = item.seq
        for position in range(seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens):
            expected_ids.append(seq.token_ids[position])
            expected_positions.append(position)
            expected_slots.append(seq.block_table[position // size] * size + position % size)
    assert inputs.input_ids[0].tolist() == expected_ids
    assert inputs.positions[0].tolist() == expected_positions
    assert inputs.metadata.slot_mapping.tolist() == expected_slots
    assert inputs.metadata.num_decode_tokens == len(decodes)
    engine._update(output, engine.runner.execute(output))


def test_inputs_are_views_of_buffers(tiny_llama, make_engine):
    engine = make_engine(tiny_llama)
    for index, prompt in enumerate(random_prompts(seed=4, count=3, min_len=20, max_len=40)):
        engine.add_request(f"views-{index}", prompt, greedy_params(max_tokens=8))
    for _ in range(3):
        engine.step()
    output = engine.scheduler.schedule()

    with torch.inference_mode():
        first = engine.runner.prepare(output)
        second = engine.runner.prepare(output)

    buffers = engine.runner.buffers
    assert first.input_ids.data_ptr() == buffers.input_ids.data_ptr()
    assert first.metadata.slot_mapping.data_ptr() == buffers.slot_mapping.data_ptr()
    assert first.metadata.decode_block_tables.data_ptr() == buffers.block_tables.data_ptr()
    assert second.input_ids.data_ptr() == first.input_ids.data_ptr()
    engine._update(output, engine.runner.execute(output))


def test_buffers_grow_past_their_limits(tiny_llama, make_engine, reference_generate):
    prompts = random_prompts(seed=5, count=6, min_len=30, max_len=90)
    expected = reference_generate("tiny-random-llama", prompts, 12)
    engine = make_engine(tiny_llama)
    # A runner sized for 2 sequences, 8 tokens and 2 blocks per sequence must grow to run this batch.
    engine.runner = ModelRunner(
        engine.model, engine.kv_cache, max_num_seqs=2, max_num_batched_tokens=8, max_model_len=2 * engine.facts.kv_block_size
    )
    assert isinstance(engine.kv_cache, PagedKVCache)

    run = run_to_completion(engine, prompts, greedy_params(12))

    assert run.outputs() == expected
    assert engine.runner.buffers.max_num_rows >= 6
    assert engine.runner.buffers.max_num_tokens >= sum(len(p) for p in prompts[:1])

"""Disaggregated prefill: export from a prefill-only engine, import into a decode engine."""

from __future__ import annotations

import random

import pytest
from engine_helpers import greedy_params, random_prompts, random_tokens, run_to_completion

from molten.engine.sequence import SequenceStatus

MAX_NEW_TOKENS = 12
MODEL = "tiny-random-llama"


def prefill(engine, request_id: str, prompt: list[int], max_tokens: int = MAX_NEW_TOKENS):
    """Run a prefill-only request until its first token; return that event."""
    engine.add_request(request_id, prompt, greedy_params(max_tokens), prefill_only=True)
    events = []
    for _ in range(100):
        events = [event for event in engine.step() if event.request_id == request_id]
        if events:
            break
    assert len(events) == 1
    return events[0]


def decode_to_end(engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(1_000):
        if not engine.has_unfinished():
            break
        for event in engine.step():
            tokens.setdefault(event.request_id, []).append(event.token_id)
    assert not engine.has_unfinished()
    return tokens


def assert_all_blocks_free(engine) -> None:
    engine.check_block_accounting()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.fixture(scope="module")
def handoff_prompts() -> list[list[int]]:
    """Lengths on and around block edges (kv_block_size 16), plus a one-token prompt."""
    rng = random.Random(7)
    return [random_tokens(rng, length) for length in (1, 15, 16, 17, 32, 57)]


def test_handoff_continues_like_one_engine(tiny_llama, make_engine, reference_generate, handoff_prompts):
    expected = reference_generate(MODEL, handoff_prompts, MAX_NEW_TOKENS)
    prefill_engine = make_engine(tiny_llama)
    decode_engine = make_engine(tiny_llama)

    first_tokens = {}
    for index, prompt in enumerate(handoff_prompts):
        request_id = f"req-{index}"
        first_event = prefill(prefill_engine, request_id, prompt)
        assert first_event.origin == "prefill"
        assert prefill_engine.live_sequences()[0].status is SequenceStatus.PREFILLED
        first_tokens[request_id] = first_event.token_id
        handoff = prefill_engine.export_sequence(request_id)
        assert handoff.kv.shape[2] == (len(prompt) + 15) // 16
        decode_engine.import_sequence(handoff)
    decoded = decode_to_end(decode_engine)

    outputs = [[first_tokens[f"req-{i}"]] + decoded[f"req-{i}"] for i in range(len(handoff_prompts))]
    assert outputs == expected
    assert_all_blocks_free(prefill_engine)
    assert_all_blocks_free(decode_engine)


def test_handoff_matches_single_engine_batch(tiny_llama, make_engine, handoff_prompts):
    single = make_engine(tiny_llama)
    expected = run_to_completion(single, handoff_prompts, greedy_params(MAX_NEW_TOKENS)).outputs()
    prefill_engine = make_engine(tiny_llama)
    decode_engine = make_engine(tiny_llama)

    first_tokens = {}
    for index, prompt in enumerate(handoff_prompts):
        first_tokens[f"req-{index}"] = prefill(prefill_engine, f"req-{index}", prompt).token_id
        decode_engine.import_sequence(prefill_engine.export_sequence(f"req-{index}"))
    decoded = decode_to_end(decode_engine)

    assert [[first_tokens[f"req-{i}"]] + decoded[f"req-{i}"] for i in range(len(handoff_prompts))] == expected


def test_second_import_reuses_prefix_blocks(tiny_llama, make_engine, reference_generate):
    rng = random.Random(8)
    shared = random_tokens(rng, 48)  # three full blocks
    prompts = [shared + random_tokens(rng, 5), shared + random_tokens(rng, 9)]
    expected = reference_generate(MODEL, prompts, MAX_NEW_TOKENS)
    prefill_engine = make_engine(tiny_llama)
    decode_engine = make_engine(tiny_llama)

    outputs, stats = [], []
    for index, prompt in enumerate(prompts):
        first = prefill(prefill_engine, f"req-{index}", prompt)
        stats.append(decode_engine.import_sequence(prefill_engine.export_sequence(f"req-{index}")))
        outputs.append([first.token_id] + decode_to_end(decode_engine)[f"req-{index}"])

    assert stats[0].reused_blocks == 0
    assert stats[0].num_blocks == 4
    assert stats[1].reused_blocks == 3
    assert stats[1].num_blocks == 4
    assert outputs == expected
    assert_all_blocks_free(prefill_engine)
    assert_all_blocks_free(decode_engine)


def test_prefill_only_finishing_at_first_token(tiny_llama, make_engine):
    engine = make_engine(tiny_llama)

    event = prefill(engine, "one-token", random_prompts(seed=9, count=1)[0], max_tokens=1)

    assert event.finish_reason == "length"
    assert "one-token" not in engine.prefilled
    assert_all_blocks_free(engine)


def test_import_ignores_waiting_queue_limit(tiny_llama, make_engine):
    # The client already holds the first token, so the decode side must not reject it.
    prompts = random_prompts(seed=10, count=2, min_len=20, max_len=40)
    prefill_engine = make_engine(tiny_llama)
    decode_engine = make_engine(tiny_llama, max_num_waiting=1)
    handoffs = []
    for index, prompt in enumerate(prompts):
        prefill(prefill_engine, f"req-{index}", prompt)
        handoffs.append(prefill_engine.export_sequence(f"req-{index}"))
    decode_engine.import_sequence(handoffs[0])
    decode_engine.import_sequence(handoffs[1])

    decode_engine.check_block_accounting()
    assert sorted(decode_engine.sequences) == ["req-0", "req-1"]
    decode_to_end(decode_engine)
    assert_all_blocks_free(decode_engine)


def test_import_without_free_blocks_raises_memory_error(tiny_llama, make_engine):
    prompt = random_prompts(seed=11, count=1, min_len=60, max_len=60)[0]
    prefill_engine = make_engine(tiny_llama)
    decode_engine = make_engine(tiny_llama, num_kv_blocks=3, max_model_len=48)
    prefill(prefill_engine, "big", prompt)
    handoff = prefill_engine.export_sequence("big")

    with pytest.raises(MemoryError, match="big"):
        decode_engine.import_sequence(handoff)

    assert_all_blocks_free(decode_engine)
    assert "big" not in decode_engine.sequences


def test_abort_prefilled_request_frees_blocks(tiny_llama, make_engine):
    engine = make_engine(tiny_llama)
    prefill(engine, "dropped", random_prompts(seed=12, count=1, min_len=40, max_len=40)[0])

    assert engine.abort_request("dropped") is True

    assert "dropped" not in engine.prefilled
    assert_all_blocks_free(engine)


def test_unhashed_import_not_cached_as_root(tiny_llama, make_engine, reference_generate):
    """Blocks after unhashed imported blocks must not be cached as if they started a prompt.

    The prefill engine runs without prefix caching, so its handoff carries no hashes. The
    decode engine caches the block it fills itself; keyed on that block's tokens alone,
    a later prompt starting with those tokens would reuse K/V computed after another prefix.
    """
    prompt = random_prompts(seed=13, count=1, min_len=40, max_len=40)[0]
    prefill_engine = make_engine(tiny_llama, enable_prefix_caching=False)
    decode_engine = make_engine(tiny_llama, enable_prefix_caching=True)
    first = prefill(prefill_engine, "imported", prompt)
    decode_engine.import_sequence(prefill_engine.export_sequence("imported"))
    imported_tokens = prompt + [first.token_id] + decode_to_end(decode_engine)["imported"]
    # Tokens 32-47 filled the decode engine's third block, after two unhashed imported blocks.
    follower = imported_tokens[32:48] + random_prompts(seed=14, count=1, min_len=5, max_len=5)[0]

    run = run_to_completion(decode_engine, [follower], greedy_params(MAX_NEW_TOKENS), prefix="follower")

    assert run.events["follower-0"][0].num_cached_prompt_tokens == 0
    assert run.outputs() == reference_generate(MODEL, [follower], MAX_NEW_TOKENS)
    assert_all_blocks_free(decode_engine)

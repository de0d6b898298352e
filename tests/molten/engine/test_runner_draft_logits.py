"""The runner returns raw logits, unsampled, for items that verify draft tokens (speculative decoding)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy_params, random_prompts

from molten.engine.scheduler import ScheduledSequence, SchedulerOutput

NUM_DRAFT_TOKENS = 3


@pytest.fixture(scope="module")
def reference_model(reference_generate):
    """A fresh tiny llama with transformers' own attention, for plain forwards."""
    return reference_generate.load_model("tiny-random-llama").model


def decode_until(engine, num_output_tokens: int) -> None:
    for _ in range(200):
        seqs = engine.live_sequences()
        if all(seq.num_output_tokens >= num_output_tokens for seq in seqs):
            return
        engine.step()
    raise AssertionError("sequences did not reach the expected length in 200 steps")


def test_draft_items_get_raw_logits(tiny_llama, make_engine, reference_model):
    engine = make_engine(tiny_llama)
    prompts = random_prompts(seed=7, count=2, min_len=20, max_len=40)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"draft-{index}", prompt, greedy_params(max_tokens=50))
    decode_until(engine, num_output_tokens=2)
    verifying, plain = engine.live_sequences()

    # The engine appends the drafts before scheduling; the item then ends at num_tokens.
    drafts = [11, 222, 3333]
    verifying.token_ids.extend(drafts)
    num_new = verifying.num_uncomputed_tokens  # the last sampled token plus the drafts
    assert num_new == NUM_DRAFT_TOKENS + 1
    assert engine.block_manager.allocate_slots(verifying, num_new)
    assert engine.block_manager.allocate_slots(plain, 1)
    verify_item = ScheduledSequence(verifying, num_new)
    verify_item.num_draft_tokens = NUM_DRAFT_TOKENS
    step = SchedulerOutput(step_id=10_000, scheduled=[verify_item, ScheduledSequence(plain, 1)])

    output = engine.runner.execute(step)

    assert set(output.sampled) == {plain.seq_id}
    assert set(output.logits) == {verifying.seq_id}
    logits = output.logits[verifying.seq_id]
    assert logits.dtype == torch.float32
    assert logits.shape == (NUM_DRAFT_TOKENS + 1, reference_model.config.vocab_size)
    with torch.inference_mode():
        full = reference_model(torch.tensor([verifying.token_ids])).logits[0]  # [num_tokens, vocab]
        plain_next = reference_model(torch.tensor([plain.token_ids])).logits[0, -1].argmax().item()
    expected = full[-(NUM_DRAFT_TOKENS + 1) :]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert output.sampled[plain.seq_id].token_id == plain_next


def test_too_few_draft_rows_raise(tiny_llama, make_engine):
    engine = make_engine(tiny_llama)
    engine.add_request("short", random_prompts(seed=8, count=1, min_len=10, max_len=10)[0], greedy_params(10))
    decode_until(engine, num_output_tokens=1)
    (seq,) = engine.live_sequences()
    assert engine.block_manager.allocate_slots(seq, 1)
    item = ScheduledSequence(seq, 1)
    item.num_draft_tokens = 1

    with pytest.raises(RuntimeError, match="draft tokens"):
        engine.runner.execute(SchedulerOutput(step_id=10_000, scheduled=[item]))

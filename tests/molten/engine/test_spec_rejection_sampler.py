"""The rejection sampler keeps the target distribution, and greedy verification keeps argmax tokens.

The statistical checks draw a few thousand verifications on a six-token vocabulary with
fixed seeds and compare the emitted tokens' frequencies to the target probabilities with
a chi-square statistic. The bound is the 0.999 quantile for five degrees of freedom, and
the same bound rejects the uncorrected draft distribution, so the test can fail.
"""

from __future__ import annotations

import torch

from molten.engine.sampling_params import SamplingParams
from molten.engine.spec_decode.rejection_sampler import verify_drafts

NUM_TRIALS = 4000
CHI_SQUARE_BOUND = 20.52
"""0.999 quantile of the chi-square distribution with 5 degrees of freedom (vocabulary of 6)."""
TARGET_PROBS = torch.tensor([
    [0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
    [0.05, 0.10, 0.50, 0.05, 0.20, 0.10],
    [0.30, 0.05, 0.05, 0.30, 0.20, 0.10],
])
DRAFT_PROBS = torch.tensor([
    [0.10, 0.10, 0.10, 0.40, 0.20, 0.10],
    [0.30, 0.30, 0.10, 0.10, 0.10, 0.10],
])
SAMPLING = SamplingParams(max_tokens=8, temperature=1.0)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_draft_probs_distribution_differs_from_target():
    """The bound has power: plain draft samples fail it against the target."""
    generator = torch.Generator().manual_seed(1)
    drafts = torch.multinomial(DRAFT_PROBS[0], NUM_TRIALS, replacement=True, generator=generator)
    counts = torch.bincount(drafts, minlength=6).float()
    assert chi_square(counts, TARGET_PROBS[0]) > CHI_SQUARE_BOUND


def test_sampled_drafts_keep_target_distribution():
    generator = torch.Generator().manual_seed(2)
    logits = TARGET_PROBS.log()
    first = torch.zeros(6)
    second_after_accept = torch.zeros(6)
    num_accepted_total = 0
    for _ in range(NUM_TRIALS):
        drafts = [int(torch.multinomial(DRAFT_PROBS[row], 1, generator=generator)) for row in range(2)]
        result = verify_drafts(logits, drafts, DRAFT_PROBS, [1, 2, 3], SAMPLING, generator)
        tokens = [t.token_id for t in result.tokens]
        first[tokens[0]] += 1
        if result.num_accepted >= 1:
            second_after_accept[tokens[1]] += 1
        num_accepted_total += result.num_accepted
    assert chi_square(first, TARGET_PROBS[0]) < CHI_SQUARE_BOUND
    # Given draft 1 was accepted, the next token follows the target's second row.
    assert second_after_accept.sum() > 500
    assert chi_square(second_after_accept, TARGET_PROBS[1]) < CHI_SQUARE_BOUND
    assert 0 < num_accepted_total < 2 * NUM_TRIALS


def test_one_hot_drafts_keep_target_distribution():
    """An n-gram draft is deterministic (q one-hot); the emitted token still follows p."""
    generator = torch.Generator().manual_seed(3)
    logits = TARGET_PROBS.log()
    first = torch.zeros(6)
    origins = set()
    for _ in range(NUM_TRIALS):
        result = verify_drafts(logits, [3, 0], None, [1, 2, 3], SAMPLING, generator)
        first[result.tokens[0].token_id] += 1
        origins.update(result.origins)
    assert chi_square(first, TARGET_PROBS[0]) < CHI_SQUARE_BOUND
    assert origins == {"draft-accepted", "recovered", "bonus"}


def test_seeded_verification_is_reproducible():
    logits = TARGET_PROBS.log()
    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(7)
        runs.append([[t.token_id for t in verify_drafts(logits, [0, 2], None, [5], SAMPLING, generator).tokens] for _ in range(50)])
    assert runs[0] == runs[1]


def test_greedy_accepts_while_draft_is_argmax():
    logits = TARGET_PROBS.log()  # argmax per row: 0, 2, 0
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    all_accepted = verify_drafts(logits, [0, 2], None, [9], greedy, None)
    assert [t.token_id for t in all_accepted.tokens] == [0, 2, 0]
    assert all_accepted.origins == ["draft-accepted", "draft-accepted", "bonus"]
    rejected = verify_drafts(logits, [0, 4], None, [9], greedy, None)
    assert [t.token_id for t in rejected.tokens] == [0, 2]
    assert rejected.origins == ["draft-accepted", "recovered"]
    first_rejected = verify_drafts(logits, [1, 2], None, [9], greedy, None)
    assert [t.token_id for t in first_rejected.tokens] == [0]
    assert first_rejected.num_accepted == 0


def test_greedy_repetition_penalty_counts_earlier_drafts():
    """Row 1 must penalise draft 0 as seen, as a plain decode step after it would."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.5, 2.0, 0.0]])
    params = SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=2.0)
    # Context [2]. Row 0: token 0 wins. Row 1 sees {2, 0}: 2.5 / 2 = 1.25 < 2.0, so token 1
    # wins; without counting the draft as seen, token 0 would.
    result = verify_drafts(logits, [0], None, [2], params, None)
    assert [t.token_id for t in result.tokens] == [0, 1]
    three_rows = torch.cat([logits, torch.tensor([[0.0, 0.0, 5.0]])])
    result = verify_drafts(three_rows, [0, 0], None, [2], params, None)
    assert [t.token_id for t in result.tokens] == [0, 1]
    assert result.origins == ["draft-accepted", "recovered"]


def test_logprobs_come_from_raw_rows():
    logits = TARGET_PROBS.log()
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=2)
    result = verify_drafts(logits, [0, 2], None, [9], params, None)
    for row, token in enumerate(result.tokens):
        assert abs(token.logprob - float(TARGET_PROBS[row, token.token_id].log())) < 1e-5
        assert len(token.top_logprobs) == 2

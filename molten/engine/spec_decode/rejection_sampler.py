"""Verify drafts against the target model's distribution.

Sampling follows speculative sampling as described by Leviathan, Kalman and Matias
(2023, algorithm 1) and Chen et al. (2023): draft i is accepted with probability
min(1, p_i(d) / q_i(d)). On the first rejection the token is drawn from
norm(max(0, p_i - q_i)), and if all k drafts pass, a bonus token is drawn from p_k. The
emitted tokens then follow the target distribution exactly, whatever the drafter
proposed. A deterministic drafter (n-gram, greedy draft model) has a one-hot q, so the
acceptance probability is p_i(d) and the residual is p_i with d removed.

Greedy requests accept while each draft equals the target's argmax, so their output is
token for token the output without speculation.

Every random draw uses the request's own generator when it has a seed, so a seeded
request stays reproducible for a given speculative setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from molten.engine.sampler import SampledToken, apply_repetition_penalty, sampled_token, sampling_probs
from molten.engine.sampling_params import SamplingParams

ORIGIN_ACCEPTED = "draft-accepted"
ORIGIN_RECOVERED = "recovered"
ORIGIN_BONUS = "bonus"


@dataclass
class Verification:
    """Outcome of verifying one sequence's drafts."""

    tokens: list[SampledToken]
    """The accepted drafts, then one recovered or bonus token."""
    num_accepted: int
    num_draft_tokens: int

    @property
    def origins(self) -> list[str]:
        last = ORIGIN_BONUS if self.num_accepted == self.num_draft_tokens else ORIGIN_RECOVERED
        return [ORIGIN_ACCEPTED] * self.num_accepted + [last]


def penalised_logits(logits: torch.Tensor, context_token_ids: list[int], draft_token_ids: list[int], params: SamplingParams) -> torch.Tensor:
    """Apply the repetition penalty per row: row i also counts the i drafts before it as seen."""
    logits = logits.float().clamp(max=torch.finfo(torch.float32).max)
    if params.repetition_penalty != 1.0:
        rows = [
            SimpleNamespace(token_ids=context_token_ids + draft_token_ids[:row], sampling_params=params)
            for row in range(logits.shape[0])
        ]
        apply_repetition_penalty(logits, rows)
    return logits


def verify_drafts(
    logits: torch.Tensor,
    draft_token_ids: list[int],
    draft_probs: torch.Tensor | None,
    context_token_ids: list[int],
    params: SamplingParams,
    generator: torch.Generator | None,
) -> Verification:
    """Accept a prefix of the drafts and pick the token that follows it.

    logits: [k + 1, vocab] raw target logits, row i scoring the token after draft i (row 0
    the token after the context). draft_probs: [k, vocab] or None for a one-hot draft.
    context_token_ids: the sequence's tokens before the first draft.
    """
    num_drafts = len(draft_token_ids)
    if logits.shape[0] != num_drafts + 1:
        raise ValueError(f"{num_drafts} drafts need {num_drafts + 1} logits rows, got {logits.shape[0]}")
    raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if params.logprobs else None
    scores = penalised_logits(logits, context_token_ids, draft_token_ids, params)

    if params.greedy:
        target_ids = scores.argmax(dim=-1).tolist()
        num_accepted = 0
        while num_accepted < num_drafts and draft_token_ids[num_accepted] == target_ids[num_accepted]:
            num_accepted += 1
        token_ids = draft_token_ids[:num_accepted] + [target_ids[num_accepted]]
    else:
        probs = sampling_probs(scores, [params] * (num_drafts + 1))  # [k + 1, vocab]
        token_ids, num_accepted = _rejection_sample(probs, draft_token_ids, draft_probs, generator)

    tokens = [
        sampled_token(token_id, params, raw_logprobs[row] if raw_logprobs is not None else None)
        for row, token_id in enumerate(token_ids)
    ]
    return Verification(tokens, num_accepted, num_drafts)


def _rejection_sample(
    probs: torch.Tensor, draft_token_ids: list[int], draft_probs: torch.Tensor | None, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Speculative sampling over target probs [k + 1, vocab]; return (emitted token ids, accepted count)."""
    for row, draft in enumerate(draft_token_ids):
        target_p = float(probs[row, draft])
        draft_q = float(draft_probs[row, draft]) if draft_probs is not None else 1.0
        uniform = float(torch.rand((), generator=generator))
        # uniform < p / q, written without the division so q = 0 (a draft the drafter
        # itself gave no mass) can only be accepted if p > 0.
        if uniform * draft_q < target_p:
            continue
        if draft_probs is None:
            residual = probs[row].clone()
            residual[draft] = 0.0
        else:
            residual = (probs[row] - draft_probs[row].float()).clamp(min=0.0)
        total = float(residual.sum())
        if total <= 0.0:
            # Only reachable through rounding when p and q are equal; then p itself is exact.
            residual, total = probs[row], 1.0
        recovered = int(torch.multinomial(residual / total, 1, generator=generator)[0])
        return draft_token_ids[:row] + [recovered], row
    bonus = int(torch.multinomial(probs[-1], 1, generator=generator)[0])
    return list(draft_token_ids) + [bonus], len(draft_token_ids)

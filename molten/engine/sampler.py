"""Token sampling for a whole batch of logits at once.

Filters are applied in transformers' order: repetition penalty, temperature, top-k,
top-p, min-p. Greedy rows take the argmax of the penalised logits. Sampled rows draw
with their request's own generator when it has a seed, so the draw does not depend on
which other requests share the batch.

Reported logprobs are of the model's raw distribution (log-softmax of unmodified
logits), which is what a reader comparing models or precisions wants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from molten.engine.sampling_params import SamplingParams
from molten.engine.sequence import Sequence


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


def apply_repetition_penalty(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Penalise in place every token that already occurs in each row's prompt or output."""
    for row, seq in enumerate(seqs):
        penalty = seq.sampling_params.repetition_penalty
        if penalty == 1.0:
            continue
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        scores = logits[row, seen]
        logits[row, seen] = torch.where(scores > 0, scores / penalty, scores * penalty)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask filtered tokens to -inf. logits: [rows, vocab] already temperature-scaled; the others: [rows]."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    remove = ranks >= k

    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # Mass before each token; the top token has 0 before it, so it is always kept.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p.unsqueeze(1)
    remove |= probs < (min_p.unsqueeze(1) * probs[:, :1])

    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Turn penalised float32 logits [rows, vocab] into the distribution each row samples from.

    Applies temperature, top-k, top-p and min-p; `params` has one entry per row, none greedy.
    """
    temperature = torch.tensor([p.temperature for p in params]).unsqueeze(1)
    # A temperature such as 1e-50 rounds to 0 in float32, and 0 / 0 would be NaN.
    temperature = temperature.clamp(min=torch.finfo(torch.float32).tiny)
    # Shift each row so its max is 0 before dividing: softmax is unchanged, and a tiny
    # temperature can then only push logits toward -inf. Unshifted, finite logits over
    # a temperature such as 1e-40 overflow to +inf, softmax gives NaN, and multinomial
    # raises, failing every request in the step.
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    filtered = filter_logits(
        scaled,
        top_k=torch.tensor([p.top_k for p in params], dtype=torch.long),
        top_p=torch.tensor([p.top_p for p in params]),
        min_p=torch.tensor([p.min_p for p in params]),
    )
    return filtered.softmax(dim=-1)


def sampled_token(token_id: int, params: SamplingParams, raw_logprobs: torch.Tensor | None) -> SampledToken:
    """Wrap a chosen token with its raw logprob and top alternatives when `params` asks for them."""
    if not params.logprobs or raw_logprobs is None:
        return SampledToken(token_id, None, None)
    top = None
    if params.top_logprobs:
        values, ids = raw_logprobs.topk(params.top_logprobs)
        top = list(zip(ids.tolist(), values.tolist()))
    return SampledToken(token_id, float(raw_logprobs[token_id]), top)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
    """Pick one token per row. logits: [rows, vocab], any float dtype; rows match `seqs`."""
    # +inf (a model overflowing float16, say) becomes the largest float32, so log-softmax
    # and the shifted softmax below give no NaN.
    logits = logits.float().clamp(max=torch.finfo(torch.float32).max)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(s.sampling_params.logprobs for s in seqs) else None
    apply_repetition_penalty(logits, seqs)

    params = [s.sampling_params for s in seqs]
    token_ids = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, dtype=torch.long)
        probs = sampling_probs(logits[rows], [params[i] for i in sampled_rows])
        for j, row in enumerate(sampled_rows):
            generator = seqs[row].generator
            token_ids[row] = torch.multinomial(probs[j], 1, generator=generator)[0]

    return [
        sampled_token(token_id, params[row], raw_logprobs[row] if raw_logprobs is not None else None)
        for row, token_id in enumerate(token_ids.tolist())
    ]

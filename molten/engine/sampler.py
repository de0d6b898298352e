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
        temperature = torch.tensor([params[i].temperature for i in sampled_rows]).unsqueeze(1)
        # A temperature such as 1e-50 rounds to 0 in float32, and 0 / 0 would be NaN.
        temperature = temperature.clamp(min=torch.finfo(torch.float32).tiny)
        # Shift each row so its max is 0 before dividing: softmax is unchanged, and a tiny
        # temperature can then only push logits toward -inf. Unshifted, finite logits over
        # a temperature such as 1e-40 overflow to +inf, softmax gives NaN, and multinomial
        # raises, failing every request in the step.
        scaled = logits[rows]
        scaled = (scaled - scaled.max(dim=-1, keepdim=True).values) / temperature
        filtered = filter_logits(
            scaled,
            top_k=torch.tensor([params[i].top_k for i in sampled_rows], dtype=torch.long),
            top_p=torch.tensor([params[i].top_p for i in sampled_rows]),
            min_p=torch.tensor([params[i].min_p for i in sampled_rows]),
        )
        probs = filtered.softmax(dim=-1)
        for j, row in enumerate(sampled_rows):
            generator = seqs[row].generator
            token_ids[row] = torch.multinomial(probs[j], 1, generator=generator)[0]

    results = []
    token_list = token_ids.tolist()
    for row, token_id in enumerate(token_list):
        p = params[row]
        if not p.logprobs:
            results.append(SampledToken(token_id, None, None))
            continue
        logprob = float(raw_logprobs[row, token_id])
        top = None
        if p.top_logprobs:
            values, ids = raw_logprobs[row].topk(p.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        results.append(SampledToken(token_id, logprob, top))
    return results

"""Prompt-lookup drafting: propose what followed the last earlier occurrence of the context's suffix.

On input-grounded tasks (summarise, edit, quote a given text) the output repeats spans
of the prompt, so the tokens after an earlier match of the last n tokens are often the
next tokens. No second model runs; the search is a few tensor comparisons per sequence.
"""

from __future__ import annotations

import torch

from molten.engine.sequence import Sequence


def find_ngram_continuation(token_ids: list[int], ngram_min: int, ngram_max: int, num_tokens: int) -> list[int]:
    """Return up to `num_tokens` tokens that followed the latest earlier match of the suffix.

    Suffixes are tried from `ngram_max` tokens down to `ngram_min`, because a longer match
    predicts the continuation better. Returns [] when no suffix occurs earlier.
    """
    length = len(token_ids)
    if num_tokens < 1 or length < ngram_min + 1:
        return []
    context = torch.tensor(token_ids, dtype=torch.long)
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        suffix = context[length - n :]
        # Windows starting at 0 .. length - n - 1: every earlier n-gram, but not the suffix itself.
        windows = context[:-1].unfold(0, n, 1)  # [length - n, n]
        matches = (windows == suffix).all(dim=1).nonzero()
        if matches.numel():
            start = int(matches[-1]) + n
            return token_ids[start : start + num_tokens]
    return []


class NgramDrafter:
    """Drafter for `method="ngram"`. It keeps no state between steps."""

    method = "ngram"

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def propose(self, seqs: list[Sequence], max_drafts: list[int]) -> list[list[int]]:
        return [
            find_ngram_continuation(seq.token_ids, self.ngram_min, self.ngram_max, limit)
            for seq, limit in zip(seqs, max_drafts)
        ]

    def release(self, seq: Sequence) -> None:
        pass

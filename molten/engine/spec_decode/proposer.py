"""Build the drafter that a `SpeculativeConfig` selects, and choose which sequences draft each step."""

from __future__ import annotations

import logging
from typing import Protocol

from molten.config import ConfigError, SpeculativeConfig
from molten.engine.sequence import Sequence, SequenceStatus
from molten.engine.spec_decode.draft_model import DraftModelDrafter, build_self_draft
from molten.engine.spec_decode.ngram import NgramDrafter

logger = logging.getLogger(__name__)


class Drafter(Protocol):
    method: str

    def propose(self, seqs: list[Sequence], max_drafts: list[int]) -> list[list[int]]:
        """Return up to `max_drafts[i]` draft token ids for each sequence (possibly none)."""

    def release(self, seq: Sequence) -> None:
        """Forget a sequence that finished, was aborted or left the engine."""


def build_drafter(config: SpeculativeConfig, loaded_model, num_kv_blocks: int, kv_block_size: int) -> Drafter | None:
    """Return the drafter for `config`, or None when speculation is off.

    `loaded_model` is the target's `LoadedModel`. A separate draft model loads in the
    precision its id names (float32 without a `:<precision>` suffix) and must have the
    target's vocabulary.
    """
    if config.method == "none":
        return None
    if config.method == "ngram":
        return NgramDrafter(config.ngram_min, config.ngram_max)
    target = loaded_model.model
    if config.draft_model is None:
        draft = build_self_draft(target, config.draft_num_layers)
        name = f"{loaded_model.model_id} (first {config.draft_num_layers} layers)"
    else:
        from molten.models import load_model

        loaded_draft = load_model(config.draft_model)
        if loaded_draft.model.config.vocab_size != target.config.vocab_size:
            raise ConfigError(
                "draft_model",
                f"draft model {config.draft_model} has a vocabulary of {loaded_draft.model.config.vocab_size} tokens "
                f"but the target has {target.config.vocab_size}; use a draft that shares the target's tokenizer",
            )
        draft = loaded_draft.model
        name = loaded_draft.model_id
    return DraftModelDrafter(draft, num_kv_blocks, kv_block_size, name)


def drafting_candidates(running: list[Sequence], num_speculative_tokens: int, max_model_len: int) -> tuple[list[Sequence], list[int]]:
    """Pick the running sequences that can draft this step, and how many drafts each may take.

    A sequence drafts only in plain decode (all but its last token computed), never on a
    prefill-only engine. The draft count is capped so that accepting all drafts plus the
    bonus token stays within `max_tokens` and the context window.
    """
    seqs, limits = [], []
    for seq in running:
        if seq.status is not SequenceStatus.RUNNING or seq.prefill_only or seq.num_draft_tokens:
            continue
        if seq.num_computed_tokens != seq.num_tokens - 1 or seq.num_output_tokens == 0:
            continue
        params = seq.sampling_params
        if params.beam_width > 1:
            continue  # a beam's next token comes from beam selection, not from one target row
        limit = min(
            num_speculative_tokens,
            params.max_tokens - seq.num_output_tokens - 1,
            max_model_len - seq.num_tokens - 1,
        )
        if limit > 0:
            seqs.append(seq)
            limits.append(limit)
    return seqs, limits


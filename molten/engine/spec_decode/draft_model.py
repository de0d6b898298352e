"""Draft-model drafting: a smaller model (or the target's own first layers) proposes k tokens.

The draft model has its own paged KV pool, block manager and `ModelRunner`, and keeps a
shadow `Sequence` per target sequence. Each step the shadow is brought in line with the
target's verified tokens. The tokens the two share keep their draft KV, and rejected
drafts are cut off with their blocks. The new tokens are computed in the same forward
that proposes the first draft, then k - 1 single-token forwards propose the rest.

The draft always proposes greedily (its argmax), so its distribution q is one-hot and
the rejection sampler needs no draft probabilities. This keeps the target distribution
exact for sampled requests too. Only the acceptance rate is lower than drafting from q.

A self-draft runs the target's first `num_layers` decoder layers, then the target's
final norm and LM head, on shared weights (an early exit). It costs no extra weight
memory, only a KV pool for those layers.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from molten.config import ConfigError
from molten.engine.block_manager import BlockManager
from molten.engine.kv_cache import KVCacheSpec, PagedKVCache
from molten.engine.model_runner import ModelRunner
from molten.engine.sampling_params import SamplingParams
from molten.engine.scheduler import ScheduledSequence, SchedulerOutput
from molten.engine.sequence import Sequence

logger = logging.getLogger(__name__)

DRAFT_PARAMS = SamplingParams(max_tokens=1, temperature=0.0)


def build_self_draft(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """Return a view of a causal LM that runs only its first `num_layers` decoder layers.

    The view shares every parameter with `model`. Only the module containers and the
    config are copied, so the target keeps all of its layers.
    """
    base = model.base_model
    total = len(base.layers)
    if not 1 <= num_layers < total:
        raise ConfigError(
            "draft_num_layers", f"draft_num_layers must be in [1, {total - 1}] for a {total}-layer model, got {num_layers}"
        )
    config = copy.copy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types[:num_layers])

    draft_base = copy.copy(base)
    draft_base._modules = dict(base._modules)
    draft_base.layers = torch.nn.ModuleList(list(base.layers[:num_layers]))
    draft_base.config = config

    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    setattr(draft, model.base_model_prefix, draft_base)
    draft.config = config
    return draft


def kv_spec_for(model: torch.nn.Module, kv_block_size: int) -> KVCacheSpec:
    config = model.config
    return KVCacheSpec(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        dtype=next(model.parameters()).dtype,
        kv_block_size=kv_block_size,
    )


@dataclass
class _Shadow:
    """The draft model's copy of one target sequence: its tokens and its blocks in the draft pool."""

    seq: Sequence
    target_seq_id: int
    num_synced_tokens: int = 0
    """Target tokens at the last sync. Tokens past it are this shadow's own drafts."""
    num_registered_tokens: int = 0
    """Computed tokens whose full blocks were offered to the draft pool's prefix cache."""


class DraftModelDrafter:
    """Drafter for `method="draft"`: runs a draft model with its own KV pool."""

    method = "draft"

    def __init__(self, draft_model: torch.nn.Module, num_kv_blocks: int, kv_block_size: int, name: str):
        self.name = name
        self.kv_cache = PagedKVCache(kv_spec_for(draft_model, kv_block_size), num_kv_blocks)
        self.block_manager = BlockManager(num_kv_blocks, kv_block_size, enable_prefix_caching=True)
        self.runner = ModelRunner(draft_model, self.kv_cache)
        self.shadows: dict[int, _Shadow] = {}
        self.num_forwards = 0
        logger.info(
            "draft model %s ready: %d layers, KV pool of %d blocks (%.1f MiB)",
            name, self.kv_cache.spec.num_layers, num_kv_blocks, self.kv_cache.num_bytes / 2**20,
        )

    def release(self, seq: Sequence) -> None:
        shadow = self.shadows.pop(seq.seq_id, None)
        if shadow is not None:
            self.block_manager.free(shadow.seq)

    def propose(self, seqs: list[Sequence], max_drafts: list[int]) -> list[list[int]]:
        drafts: dict[int, list[int]] = {seq.seq_id: [] for seq in seqs}
        limits = {seq.seq_id: limit for seq, limit in zip(seqs, max_drafts)}
        shadows = [self._sync(seq) for seq, limit in zip(seqs, max_drafts) if limit > 0]
        # The first forward computes each shadow's missing tokens (a whole prompt the first
        # time) and proposes draft 1. Each later forward computes the previous draft and
        # proposes the next.
        pending = [shadow for shadow in shadows if self._allocate(shadow)]
        while pending:
            items = [ScheduledSequence(shadow.seq, shadow.seq.num_uncomputed_tokens) for shadow in pending]
            output = self.runner.execute(SchedulerOutput(step_id=self.num_forwards, scheduled=items))
            self.num_forwards += 1
            still_pending = []
            for shadow, item in zip(pending, items):
                shadow.seq.num_computed_tokens += item.num_new_tokens
                token_id = output.sampled[shadow.seq.seq_id].token_id
                shadow.seq.token_ids.append(token_id)
                proposed = drafts[shadow.target_seq_id]
                proposed.append(token_id)
                if len(proposed) < limits[shadow.target_seq_id] and self._allocate(shadow):
                    still_pending.append(shadow)
            pending = still_pending
        return [drafts[seq.seq_id] for seq in seqs]

    def _sync(self, seq: Sequence) -> _Shadow:
        """Bring the shadow's tokens in line with the target's verified tokens, rolling back its drafts."""
        shadow = self.shadows.get(seq.seq_id)
        if shadow is None:
            shadow_seq = Sequence(
                request_id=seq.request_id, token_ids=[], num_prompt_tokens=seq.num_prompt_tokens, sampling_params=DRAFT_PARAMS
            )
            shadow = _Shadow(shadow_seq, seq.seq_id)
            self.shadows[seq.seq_id] = shadow
        shadow_tokens = shadow.seq.token_ids
        target_tokens = seq.token_ids
        common = shadow.num_synced_tokens
        limit = min(len(shadow_tokens), len(target_tokens))
        while common < limit and shadow_tokens[common] == target_tokens[common]:
            common += 1
        del shadow_tokens[common:]
        shadow_tokens.extend(target_tokens[common:])
        shadow.num_synced_tokens = len(target_tokens)
        shadow.seq.num_computed_tokens = min(shadow.seq.num_computed_tokens, common)
        self.block_manager.trim(shadow.seq, shadow.seq.num_computed_tokens)
        # Only now are all computed tokens verified ones, so only now may their full blocks
        # enter the prefix cache: a block hashed with a rejected draft would serve wrong KV.
        num_registered = min(shadow.num_registered_tokens, shadow.seq.num_computed_tokens)
        self.block_manager.register_full_blocks(shadow.seq, num_registered)
        shadow.num_registered_tokens = shadow.seq.num_computed_tokens
        return shadow

    def _allocate(self, shadow: _Shadow) -> bool:
        """Reserve slots for the shadow's uncomputed tokens. On failure drop the shadow (no drafts)."""
        seq = shadow.seq
        if not seq.block_table and seq.num_computed_tokens == 0:
            seq.num_computed_tokens = self.block_manager.match_prefix(seq)
            shadow.num_registered_tokens = seq.num_computed_tokens
        if self.block_manager.allocate_slots(seq, seq.num_uncomputed_tokens):
            return True
        logger.debug("draft KV pool is full, so seq %s of request %s gets no drafts", shadow.target_seq_id, seq.request_id)
        self.block_manager.free(seq)
        self.shadows.pop(shadow.target_seq_id, None)
        return False

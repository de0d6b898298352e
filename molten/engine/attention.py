"""Attention over the paged KV pool, plugged into transformers' attention interface.

transformers runs the model's own modules (embeddings, RoPE, projections, MLP, norms)
and calls `paged_attention` in place of its SDPA/eager attention. The runner passes a
packed batch: every scheduled sequence's new tokens laid end to end in one row
(batch dimension 1, no padding), with per-token positions. `paged_attention` then

1. writes the new tokens' K/V into their slots of the pool (`slot_mapping`), and
2. attends each sequence's queries to that sequence's whole context, read back from
   the pool through its slot list.

Decode tokens (one query each) are attended together in one batched SDPA call over
their gathered, right-padded contexts. Prefill chunks are attended one sequence at a
time; a chunk with no earlier context uses its fresh K/V directly with a causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from molten.engine.kv_cache import PagedKVCache

ATTENTION_IMPLEMENTATION = "molten_paged"
METADATA_KWARG = "molten_attention"


@dataclass
class PrefillSegment:
    start: int
    """Offset of the chunk's first token in the packed batch."""
    end: int
    context_slots: torch.Tensor | None
    """[context_len] slots of all tokens the chunk attends to; None when the chunk starts at position 0."""
    mask: torch.Tensor | None
    """[chunk_len, context_len] bool, True where attention is allowed; None with `context_slots`."""


@dataclass
class AttentionMetadata:
    kv_cache: PagedKVCache
    slot_mapping: torch.Tensor
    """[num_tokens] slot each new token's K/V is written to."""
    decode_token_index: torch.Tensor | None
    """[num_decode] positions of decode tokens in the packed batch."""
    decode_context_slots: torch.Tensor | None
    """[num_decode, max_context_len] slots of each decode sequence's context, right-padded with slot 0."""
    decode_mask: torch.Tensor | None
    """[num_decode, 1, 1, max_context_len] bool, False on padding."""
    prefill_segments: list[PrefillSegment]


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    # query: [1, heads, tokens, head_dim]; key, value: [1, kv_heads, tokens, head_dim]
    metadata: AttentionMetadata = kwargs[METADATA_KWARG]
    k_cache, v_cache = metadata.kv_cache.layer(module.layer_idx)  # [slots, kv_heads, head_dim]
    new_k = key[0].transpose(0, 1)  # [tokens, kv_heads, head_dim]
    new_v = value[0].transpose(0, 1)
    k_cache.index_copy_(0, metadata.slot_mapping, new_k.to(k_cache.dtype))
    v_cache.index_copy_(0, metadata.slot_mapping, new_v.to(v_cache.dtype))

    q = query[0]  # [heads, tokens, head_dim]
    num_heads, num_tokens, head_dim = q.shape
    out = q.new_empty(num_tokens, num_heads, head_dim)

    if metadata.decode_token_index is not None:
        dec_q = q[:, metadata.decode_token_index, :].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, head_dim]
        slots = metadata.decode_context_slots
        dec_k = k_cache[slots].transpose(1, 2)  # [B, kv_heads, max_context, head_dim]
        dec_v = v_cache[slots].transpose(1, 2)
        dec_out = F.scaled_dot_product_attention(
            dec_q, dec_k, dec_v, attn_mask=metadata.decode_mask, scale=scaling, enable_gqa=True
        )  # [B, heads, 1, head_dim]
        out[metadata.decode_token_index] = dec_out[:, :, 0, :]

    for segment in metadata.prefill_segments:
        seg_q = q[:, segment.start : segment.end, :].unsqueeze(0)  # [1, heads, chunk, head_dim]
        if segment.context_slots is None:
            seg_k = key[:, :, segment.start : segment.end, :]
            seg_v = value[:, :, segment.start : segment.end, :]
            seg_out = F.scaled_dot_product_attention(seg_q, seg_k, seg_v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            seg_k = k_cache[segment.context_slots].transpose(0, 1).unsqueeze(0)  # [1, kv_heads, context, head_dim]
            seg_v = v_cache[segment.context_slots].transpose(0, 1).unsqueeze(0)
            seg_out = F.scaled_dot_product_attention(
                seg_q, seg_k, seg_v, attn_mask=segment.mask, scale=scaling, enable_gqa=True
            )
        out[segment.start : segment.end] = seg_out[0].transpose(0, 1)

    return out.unsqueeze(0), None  # [1, tokens, heads, head_dim]


AttentionInterface.register(ATTENTION_IMPLEMENTATION, paged_attention)

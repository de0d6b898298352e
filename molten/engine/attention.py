"""Attention over the paged KV pool, plugged into transformers' attention interface.

transformers runs the model's own modules (embeddings, RoPE, projections, MLP, norms)
and calls `paged_attention` in place of its SDPA/eager attention. The runner passes a
packed batch: every scheduled sequence's new tokens laid end to end in one row
(batch dimension 1, no padding), with per-token positions. `paged_attention` then

1. writes the new tokens' K/V into their slots of the pool (`slot_mapping`), and
2. attends each sequence's queries to that sequence's whole context, read back from
   the pool through its slot list.

Decode tokens (one query each) come first in the packed batch and are attended together
with two batched matmuls over their contexts, gathered block by block and right-padded. Prefill chunks are attended
one sequence at a time with SDPA; a chunk with no earlier context uses its fresh K/V
directly with a causal mask.
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
    context_len: int
    """Tokens the chunk attends to: everything before it plus itself."""
    block_table: torch.Tensor | None
    """[num_blocks] KV blocks holding the context; None when the chunk starts at position 0."""
    mask: torch.Tensor | None
    """[chunk_len, context_len] bool, True where attention is allowed; None with `block_table`."""


@dataclass
class AttentionMetadata:
    kv_cache: PagedKVCache
    slot_mapping: torch.Tensor
    """[num_tokens] slot each new token's K/V is written to."""
    num_decode_tokens: int
    """Decode tokens (one query each), packed first: they are tokens [0, num_decode_tokens) of the batch."""
    decode_block_tables: torch.Tensor | None
    """[num_decode, max_blocks] block ids of each decode sequence's context, right-padded with block 0."""
    decode_mask: torch.Tensor | None
    """[num_decode, 1, 1, max_blocks * kv_block_size] additive mask: 0 on context, -inf on padding."""
    prefill_segments: list[PrefillSegment]


def gather_blocks(cache_blocks: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Read whole blocks: [rows, max_blocks] ids -> [rows, max_blocks * kv_block_size, kv_heads, head_dim].

    Copying whole blocks (one contiguous run of kv_block_size slots each) with
    index_select is several times cheaper on CPU than gathering slot by slot.
    """
    rows, max_blocks = block_tables.shape
    _, block_size, kv_heads, head_dim = cache_blocks.shape
    gathered = cache_blocks.index_select(0, block_tables.reshape(-1))
    return gathered.view(rows, max_blocks * block_size, kv_heads, head_dim)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attend one query token per sequence to its padded context, with grouped KV heads.

    q: [B, heads, head_dim]; k, v: [B, context, kv_heads, head_dim]; mask: [B, 1, 1, context].
    Returns [B, heads, head_dim]. Two batched matmuls beat SDPA's CPU kernel for a
    single query row, and grouping the query heads avoids repeating K/V per head.
    """
    batch, num_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = num_heads // kv_heads
    q = q.view(batch, kv_heads, group, head_dim)
    scores = torch.matmul(q, k.permute(0, 2, 3, 1)) * scaling  # [B, kv_heads, group, context]
    scores = scores + mask
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.transpose(1, 2))  # [B, kv_heads, group, head_dim]
    return out.reshape(batch, num_heads, head_dim)


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
    k_cache.index_copy_(0, metadata.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, metadata.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))
    k_blocks, v_blocks = metadata.kv_cache.layer_blocks(module.layer_idx)  # [blocks, kv_block_size, kv_heads, head_dim]

    q = query[0]  # [heads, tokens, head_dim]
    num_heads, num_tokens, head_dim = q.shape
    scaling = scaling if scaling is not None else head_dim**-0.5
    out = q.new_empty(num_tokens, num_heads, head_dim)

    num_decode = metadata.num_decode_tokens
    if num_decode:
        dec_q = q[:, :num_decode, :].transpose(0, 1)  # [B, heads, head_dim]
        dec_k = gather_blocks(k_blocks, metadata.decode_block_tables)  # [B, context, kv_heads, head_dim]
        dec_v = gather_blocks(v_blocks, metadata.decode_block_tables)
        out[:num_decode] = decode_attention(dec_q, dec_k, dec_v, metadata.decode_mask, scaling)

    for segment in metadata.prefill_segments:
        seg_q = q[:, segment.start : segment.end, :].unsqueeze(0)  # [1, heads, chunk, head_dim]
        if segment.block_table is None:
            seg_k = key[:, :, segment.start : segment.end, :]
            seg_v = value[:, :, segment.start : segment.end, :]
            seg_out = F.scaled_dot_product_attention(seg_q, seg_k, seg_v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            table = segment.block_table.unsqueeze(0)
            # [1, context, kv_heads, head_dim] -> [1, kv_heads, context, head_dim]
            seg_k = gather_blocks(k_blocks, table)[:, : segment.context_len].transpose(1, 2)
            seg_v = gather_blocks(v_blocks, table)[:, : segment.context_len].transpose(1, 2)
            seg_out = F.scaled_dot_product_attention(
                seg_q, seg_k, seg_v, attn_mask=segment.mask, scale=scaling, enable_gqa=True
            )
        out[segment.start : segment.end] = seg_out[0].transpose(0, 1)

    return out.unsqueeze(0), None  # [1, tokens, heads, head_dim]


AttentionInterface.register(ATTENTION_IMPLEMENTATION, paged_attention)

"""Runs one scheduled step through the model: packs inputs, builds attention metadata, samples.

Packing. Every scheduled token goes into one row (batch dimension 1, no padding):
decode tokens first, one per decoding sequence in schedule order, then each prefill
chunk (or verify chunk of draft tokens) end to end. With decodes first, attention
reads them as the slice `[:num_decode]` instead of gathering scattered rows.

Hot path. The step's inputs live in `StepBuffers`, tensors allocated once and sized
from the engine's limits. Each step writes a prefix of them through numpy views (no
tensor per request), and computes every token's KV slot in one vectorised expression
from the block-table buffer:

    slot = block_tables[row, position // kv_block_size] * kv_block_size + position % kv_block_size

`StepBuffers` is the readable reference for what the model receives: read `prepare`
beside it, and the tensors passed to the model are slices of these buffers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from molten.engine.attention import ATTENTION_IMPLEMENTATION, METADATA_KWARG, AttentionMetadata, PrefillSegment
from molten.engine.kv_cache import PagedKVCache
from molten.engine.sampler import SampledToken, sample
from molten.engine.scheduler import ScheduledSequence, SchedulerOutput

logger = logging.getLogger(__name__)

DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512


@dataclass
class RunnerOutput:
    sampled: dict[int, SampledToken] = field(default_factory=dict)
    """Sampled token per seq_id, for sequences whose scheduled tokens reached their end."""
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    """Raw float32 logits [k + 1, vocab] per seq_id for items verifying k > 0 draft tokens.

    Row i scores the token after position `num_tokens - k - 1 + i`. These sequences are
    not sampled here: the speculative decoder accepts or rejects their drafts.
    """
    forward_ms: float = 0.0
    """Input packing plus the model call, in milliseconds."""
    sample_ms: float = 0.0


@dataclass
class StepInputs:
    """Step inputs packed by `prepare`: views into `StepBuffers`, valid until the next step."""

    input_ids: torch.Tensor
    """[1, num_tokens] token ids, decode tokens first."""
    positions: torch.Tensor
    """[1, num_tokens] position of each token in its sequence."""
    metadata: AttentionMetadata
    logits_index: torch.Tensor
    """[num_logits_rows] packed-batch offsets whose logits are needed, in schedule order."""


def num_logits_rows(item: ScheduledSequence) -> int:
    """Logits rows an item that reaches its sequence's end needs: k + 1 when verifying k drafts, else 1."""
    # `num_draft_tokens` is read with getattr so the runner also works with schedulers that lack it.
    num_draft_tokens = getattr(item, "num_draft_tokens", 0)
    if num_draft_tokens >= item.num_new_tokens:
        raise RuntimeError(
            f"seq {item.seq.seq_id}: {num_draft_tokens} draft tokens need at least {num_draft_tokens + 1} "
            f"scheduled tokens, got {item.num_new_tokens}"
        )
    return num_draft_tokens + 1


def is_decode(item: ScheduledSequence) -> bool:
    """Check whether an item is a decode (one new token after earlier context), attended in the batched kernel."""
    return item.num_new_tokens == 1 and item.seq.num_computed_tokens > 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class StepBuffers:
    """Preallocated step inputs; each step fills a prefix of every buffer.

    The runner sizes them from the limits it is given (`max_num_batched_tokens`,
    `max_num_seqs`, the context window). A step that needs more grows them to at least
    twice the old size. That happens for a draft model's runner, whose steps have no
    token budget.
    """

    def __init__(self, max_num_tokens: int, max_num_rows: int, max_blocks_per_row: int, kv_block_size: int, mask_dtype):
        self.kv_block_size = kv_block_size
        self.mask_dtype = mask_dtype
        self._allocate(max_num_tokens, max_num_rows, max_blocks_per_row)

    def _allocate(self, max_num_tokens: int, max_num_rows: int, max_blocks_per_row: int) -> None:
        self.max_num_tokens = max_num_tokens
        self.max_num_rows = max_num_rows
        self.max_blocks_per_row = max_blocks_per_row
        max_context = max_blocks_per_row * self.kv_block_size

        long = torch.long
        self.input_ids = torch.zeros(max_num_tokens, dtype=long)
        self.positions = torch.zeros(max_num_tokens, dtype=long)
        self.token_rows = torch.zeros(max_num_tokens, dtype=long)
        """[max_num_tokens] block-table row of each packed token's sequence."""
        self.slot_mapping = torch.zeros(max_num_tokens, dtype=long)
        self.logits_index = torch.zeros(max_num_tokens, dtype=long)
        self.block_tables = torch.zeros(max_num_rows, max_blocks_per_row, dtype=long)
        """[rows, max_blocks_per_row]: decode sequences in rows 0..num_decode-1, then prefill chunks.
        Columns past a row's own blocks keep stale but valid block ids, which the mask hides."""
        self.context_lens = torch.zeros(max_num_rows, dtype=long)
        self.context_arange = torch.arange(max_context)
        # Flat storage so a step's [num_decode, context] mask is one contiguous view.
        self.decode_mask = torch.zeros(max_num_rows * max_context, dtype=self.mask_dtype)
        self.decode_padding = torch.zeros(max_num_rows * max_context, dtype=torch.bool)

        # numpy views share memory with the tensors: writing Python ints through them
        # creates no tensor per request.
        self.input_ids_np = self.input_ids.numpy()
        self.positions_np = self.positions.numpy()
        self.token_rows_np = self.token_rows.numpy()
        self.logits_index_np = self.logits_index.numpy()
        self.block_tables_np = self.block_tables.numpy()
        self.context_lens_np = self.context_lens.numpy()
        self.arange_np = self.context_arange.numpy()

    def ensure(self, num_tokens: int, num_rows: int, num_blocks: int) -> None:
        """Grow the buffers when a step exceeds them (rare, see the class docstring)."""
        if num_tokens <= self.max_num_tokens and num_rows <= self.max_num_rows and num_blocks <= self.max_blocks_per_row:
            return
        sizes = (
            max(num_tokens, 2 * self.max_num_tokens) if num_tokens > self.max_num_tokens else self.max_num_tokens,
            max(num_rows, 2 * self.max_num_rows) if num_rows > self.max_num_rows else self.max_num_rows,
            max(num_blocks, 2 * self.max_blocks_per_row) if num_blocks > self.max_blocks_per_row else self.max_blocks_per_row,
        )
        logger.debug("growing step buffers to %d tokens, %d rows, %d blocks per row", *sizes)
        self._allocate(*sizes)

    def fill_decode_mask(self, num_decode: int, max_blocks: int) -> torch.Tensor:
        """Additive mask [num_decode, 1, 1, max_blocks * kv_block_size]: 0 on each row's context, -inf after it."""
        context = max_blocks * self.kv_block_size
        padding = self.decode_padding[: num_decode * context].view(num_decode, context)
        torch.ge(self.context_arange[:context], self.context_lens[:num_decode, None], out=padding)
        mask = self.decode_mask[: num_decode * context].view(num_decode, context)
        mask.zero_().masked_fill_(padding, float("-inf"))
        return mask[:, None, None, :]


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: PagedKVCache,
        *,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        max_model_len: int | None = None,
    ):
        """Wrap `model` for paged attention; the limits size the step buffers (a larger step grows them)."""
        self.model = model
        self.kv_cache = kv_cache
        self.kv_block_size = kv_cache.spec.kv_block_size
        pool_tokens = kv_cache.num_blocks * self.kv_block_size
        max_blocks_per_seq = cdiv(min(max_model_len or pool_tokens, pool_tokens), self.kv_block_size)
        self.buffers = StepBuffers(
            max_num_tokens=max_num_batched_tokens,
            max_num_rows=max_num_seqs,
            max_blocks_per_row=max_blocks_per_seq,
            kv_block_size=self.kv_block_size,
            mask_dtype=kv_cache.spec.dtype,
        )
        model.config._attn_implementation = ATTENTION_IMPLEMENTATION
        # Some models keep a copy of the config per submodule; point all of them at the paged kernel.
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = ATTENTION_IMPLEMENTATION

    def prepare(self, scheduler_output: SchedulerOutput) -> StepInputs:
        """Pack the step's tokens into the buffers and build the attention metadata."""
        items = scheduler_output.scheduled
        size = self.kv_block_size
        num_decode = sum(1 for item in items if is_decode(item))
        num_tokens = sum(item.num_new_tokens for item in items)
        max_blocks = max(cdiv(item.seq.num_computed_tokens + item.num_new_tokens, size) for item in items)
        buffers = self.buffers
        buffers.ensure(num_tokens, len(items), max_blocks)
        input_ids, positions, token_rows = buffers.input_ids_np, buffers.positions_np, buffers.token_rows_np
        tables, context_lens, logits_index = buffers.block_tables_np, buffers.context_lens_np, buffers.logits_index_np

        segments: list[PrefillSegment] = []
        decode_row = 0
        prefill_row = num_decode
        prefill_offset = num_decode
        num_logits = 0
        for item in items:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            num_blocks = cdiv(end, size)
            if is_decode(item):
                row = offset = decode_row
                decode_row += 1
                input_ids[offset] = seq.token_ids[start]
                positions[offset] = start
                token_rows[offset] = row
                context_lens[row] = end
                tables[row, :num_blocks] = seq.block_table[:num_blocks]
            else:
                row, offset = prefill_row, prefill_offset
                prefill_row += 1
                prefill_offset += item.num_new_tokens
                input_ids[offset : offset + item.num_new_tokens] = seq.token_ids[start:end]
                positions[offset : offset + item.num_new_tokens] = buffers.arange_np[start:end]
                token_rows[offset : offset + item.num_new_tokens] = row
                tables[row, :num_blocks] = seq.block_table[:num_blocks]
                segments.append(self._prefill_segment(offset, start, end, row, num_blocks))
            if end == seq.num_tokens:
                num_rows = num_logits_rows(item)
                last = offset + item.num_new_tokens
                logits_index[num_logits : num_logits + num_rows] = range(last - num_rows, last)
                num_logits += num_rows

        position_ids = buffers.positions[:num_tokens]
        # Every token's slot at once: block id from its row's table, times the block size, plus the offset.
        block_ids = buffers.block_tables[buffers.token_rows[:num_tokens], position_ids // size]  # [num_tokens]
        slot_mapping = buffers.slot_mapping[:num_tokens]
        torch.add(block_ids * size, position_ids % size, out=slot_mapping)

        decode_blocks = cdiv(int(context_lens[:num_decode].max()), size) if num_decode else 0
        metadata = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=slot_mapping,
            num_decode_tokens=num_decode,
            decode_block_tables=buffers.block_tables[:num_decode, :decode_blocks] if num_decode else None,
            decode_mask=buffers.fill_decode_mask(num_decode, decode_blocks) if num_decode else None,
            prefill_segments=segments,
        )
        return StepInputs(
            input_ids=buffers.input_ids[:num_tokens].unsqueeze(0),  # [1, num_tokens]
            positions=position_ids.unsqueeze(0),  # [1, num_tokens]
            metadata=metadata,
            logits_index=buffers.logits_index[:num_logits],
        )

    def _prefill_segment(self, offset: int, start: int, end: int, row: int, num_blocks: int) -> PrefillSegment:
        num_new = end - start
        if start == 0:
            # No earlier context: attention uses the chunk's fresh K/V with a causal mask.
            return PrefillSegment(offset, offset + num_new, end, None, None)
        buffers = self.buffers
        query_positions = buffers.positions[offset : offset + num_new].unsqueeze(1)  # [chunk, 1]
        mask = buffers.context_arange[:end].unsqueeze(0) <= query_positions  # [chunk, context]
        return PrefillSegment(offset, offset + num_new, end, buffers.block_tables[row, :num_blocks], mask)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        t0 = time.perf_counter()
        inputs = self.prepare(scheduler_output)
        output = RunnerOutput()
        model_kwargs = {"input_ids": inputs.input_ids, "position_ids": inputs.positions, "use_cache": False,
                        METADATA_KWARG: inputs.metadata}
        if not len(inputs.logits_index):
            # Only partial prefill chunks this step: compute K/V, skip the LM head entirely.
            self.model.base_model(**model_kwargs)
            output.forward_ms = (time.perf_counter() - t0) * 1000
            return output

        logits = self.model(**model_kwargs, logits_to_keep=inputs.logits_index).logits[0]  # [num_logits_rows, vocab]
        t1 = time.perf_counter()

        sampling_seqs = []
        sampling_rows: list[int] = []
        row = 0
        for item in scheduler_output.scheduled:
            seq = item.seq
            if seq.num_computed_tokens + item.num_new_tokens != seq.num_tokens:
                continue
            num_rows = num_logits_rows(item)
            if num_rows > 1:
                output.logits[seq.seq_id] = logits[row : row + num_rows].float()  # [k + 1, vocab]
            else:
                sampling_seqs.append(seq)
                sampling_rows.append(row)
            row += num_rows
        if sampling_seqs:
            # The whole batch is sampled in one call; the slice is skipped when no row verifies drafts.
            rows = logits if len(sampling_rows) == row else logits[sampling_rows]
            for seq, token in zip(sampling_seqs, sample(rows, sampling_seqs)):
                output.sampled[seq.seq_id] = token
        output.forward_ms = (t1 - t0) * 1000
        output.sample_ms = (time.perf_counter() - t1) * 1000
        return output

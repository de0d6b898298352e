"""Runs one scheduled step through the model: packs inputs, builds attention metadata, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from molten.engine.attention import ATTENTION_IMPLEMENTATION, METADATA_KWARG, AttentionMetadata, PrefillSegment
from molten.engine.kv_cache import PagedKVCache
from molten.engine.sampler import SampledToken, sample
from molten.engine.scheduler import ScheduledSequence, SchedulerOutput


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
    sample_ms: float = 0.0


def num_logits_rows(item: ScheduledSequence) -> int:
    """Logits rows an item that reaches its sequence's end needs: k + 1 when verifying k drafts, else 1."""
    # `num_draft_tokens` is read with getattr until the speculative decoder adds the field.
    num_draft_tokens = getattr(item, "num_draft_tokens", 0)
    if num_draft_tokens >= item.num_new_tokens:
        raise RuntimeError(
            f"seq {item.seq.seq_id}: {num_draft_tokens} draft tokens need at least {num_draft_tokens + 1} "
            f"scheduled tokens, got {item.num_new_tokens}"
        )
    return num_draft_tokens + 1


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: PagedKVCache):
        self.model = model
        self.kv_cache = kv_cache
        self.kv_block_size = kv_cache.spec.kv_block_size
        model.config._attn_implementation = ATTENTION_IMPLEMENTATION
        # Some models keep a copy of the config per submodule; point all of them at the paged kernel.
        for module in model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = ATTENTION_IMPLEMENTATION

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        size = self.kv_block_size
        return [block_table[i // size] * size + i % size for i in range(start, end)]

    def prepare(self, scheduler_output: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        decode_index: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        segments: list[PrefillSegment] = []
        logits_index: list[int] = []

        for item in scheduler_output.scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            offset = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(self._slots(seq.block_table, start, end))

            num_context_blocks = (end + self.kv_block_size - 1) // self.kv_block_size
            if item.num_new_tokens == 1 and start > 0:
                decode_index.append(offset)
                decode_tables.append(seq.block_table[:num_context_blocks])
                decode_lens.append(end)
            elif start == 0:
                segments.append(PrefillSegment(offset, offset + item.num_new_tokens, end, None, None))
            else:
                table = torch.tensor(seq.block_table[:num_context_blocks], dtype=torch.long)
                query_pos = torch.arange(start, end).unsqueeze(1)
                mask = torch.arange(end).unsqueeze(0) <= query_pos  # [chunk, context]
                segments.append(PrefillSegment(offset, offset + item.num_new_tokens, end, table, mask))
            if end == seq.num_tokens:
                num_rows = num_logits_rows(item)
                last = offset + item.num_new_tokens
                logits_index.extend(range(last - num_rows, last))

        metadata = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long),
            decode_token_index=None,
            decode_block_tables=None,
            decode_mask=None,
            prefill_segments=segments,
        )
        if decode_index:
            max_blocks = max(len(t) for t in decode_tables)
            tables = torch.zeros(len(decode_tables), max_blocks, dtype=torch.long)
            for row, table in enumerate(decode_tables):
                tables[row, : len(table)] = torch.tensor(table, dtype=torch.long)
            positions_in_context = torch.arange(max_blocks * self.kv_block_size).unsqueeze(0)
            is_padding = positions_in_context >= torch.tensor(decode_lens).unsqueeze(1)
            mask = torch.zeros(is_padding.shape, dtype=self.kv_cache.spec.dtype).masked_fill_(is_padding, float("-inf"))
            metadata.decode_token_index = torch.tensor(decode_index, dtype=torch.long)
            metadata.decode_block_tables = tables
            metadata.decode_mask = mask[:, None, None, :]

        ids = torch.tensor(input_ids, dtype=torch.long).unsqueeze(0)  # [1, tokens]
        pos = torch.tensor(positions, dtype=torch.long).unsqueeze(0)
        return ids, pos, metadata, logits_index

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        import time

        t0 = time.perf_counter()
        ids, pos, metadata, logits_index = self.prepare(scheduler_output)
        output = RunnerOutput()
        if not logits_index:
            # Only partial prefill chunks this step: compute K/V, skip the LM head entirely.
            self.model.base_model(input_ids=ids, position_ids=pos, use_cache=False, **{METADATA_KWARG: metadata})
            output.forward_ms = (time.perf_counter() - t0) * 1000
            return output

        logits = self.model(
            input_ids=ids,
            position_ids=pos,
            use_cache=False,
            logits_to_keep=torch.tensor(logits_index, dtype=torch.long),
            **{METADATA_KWARG: metadata},
        ).logits[0]  # [len(logits_index), vocab]
        t1 = time.perf_counter()

        sampling_seqs: list = []
        sampling_rows: list[int] = []
        row = 0
        for item in scheduler_output.scheduled:
            seq = item.seq
            if seq.num_computed_tokens + item.num_new_tokens != seq.num_tokens:
                continue
            num_rows = num_logits_rows(item)
            if getattr(item, "num_draft_tokens", 0) > 0:
                output.logits[seq.seq_id] = logits[row : row + num_rows].float()  # [k + 1, vocab]
            else:
                sampling_seqs.append(seq)
                sampling_rows.append(row)
            row += num_rows
        if sampling_seqs:
            rows = logits if len(sampling_rows) == len(logits_index) else logits[sampling_rows]
            for seq, token in zip(sampling_seqs, sample(rows, sampling_seqs)):
                output.sampled[seq.seq_id] = token
        output.forward_ms = (t1 - t0) * 1000
        output.sample_ms = (time.perf_counter() - t1) * 1000
        return output

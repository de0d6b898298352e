"""Per-step cost records: tokens, time, bytes read and FLOPs of every engine step, for the roofline.

The costs come from shapes and precision, not from counters:

- Weights: one forward reads every weight once, whatever the batch. The input
  embedding is the exception: only the rows of the step's input tokens are read. The LM
  head is read only when the step computes logits.
- KV cache: attention reads the K and V of every context token of each scheduled
  sequence (positions 0 .. end-1) once per step, `kv_bytes_per_token` each.
- FLOPs: 2 per multiply-add. Linear layers cost 2 * in * out per token; attention costs
  4 * heads * head_dim per (query, key) pair per layer (QK^T and the weighted sum of V),
  with causal masking, so a query at position p attends to p + 1 keys. The LM head costs
  2 * hidden * vocab per logits row.

Achieved bandwidth is (weight bytes + KV bytes read) / step time, and the achieved FLOP
rate is FLOPs / step time. Activations, norms and the sampler are left out, so both are
slight underestimates of the real traffic and work.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch

from molten.engine.scheduler import SchedulerOutput
from molten.telemetry.ring_buffer import RingBuffer


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_tensors(module: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Parameters and buffers of `module`, keyed by storage pointer so tied weights count once."""
    tensors = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        tensors.setdefault(tensor.data_ptr(), tensor)
    return tensors


@dataclass(frozen=True)
class StepCostModel:
    """The per-token and per-step costs of one model, found once from its shapes and dtypes."""

    body_weight_bytes: int
    """Weights every forward reads in full: all but the input embedding and the LM head."""
    embedding_row_bytes: int
    """Bytes of one input-embedding row, read once per input token."""
    lm_head_bytes: int
    """Bytes of the LM head, read once by a step that computes any logits."""
    linear_flops_per_token: int
    """2 * multiply-adds of the linear layers (LM head excluded) for one token."""
    lm_head_flops_per_row: int
    attention_flops_per_pair: int
    """4 * heads * head_dim * layers: FLOPs of one (query, key) pair across all layers."""
    kv_bytes_per_token: int

    @classmethod
    def from_model(cls, model: torch.nn.Module, kv_bytes_per_token: int) -> StepCostModel:
        config = model.config
        embedding = model.get_input_embeddings()
        lm_head = model.get_output_embeddings()
        all_tensors = _module_tensors(model)
        embedding_tensors = _module_tensors(embedding)
        head_tensors = _module_tensors(lm_head) if lm_head is not None else {}

        embedding_bytes = _tensor_bytes(embedding_tensors.values())
        head_bytes = _tensor_bytes(head_tensors.values())
        excluded = embedding_tensors.keys() | head_tensors.keys()
        body_bytes = _tensor_bytes(t for ptr, t in all_tensors.items() if ptr not in excluded)

        linear_macs = 0
        head_macs = 0
        for module in model.modules():
            in_features = getattr(module, "in_features", None)
            out_features = getattr(module, "out_features", None)
            if not (isinstance(in_features, int) and isinstance(out_features, int)):
                continue
            if module is lm_head:
                head_macs = in_features * out_features
            else:
                linear_macs += in_features * out_features

        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            body_weight_bytes=body_bytes,
            embedding_row_bytes=embedding_bytes // embedding.num_embeddings,
            lm_head_bytes=head_bytes,
            linear_flops_per_token=2 * linear_macs,
            lm_head_flops_per_row=2 * head_macs,
            attention_flops_per_pair=4 * num_heads * head_dim * config.num_hidden_layers,
            kv_bytes_per_token=kv_bytes_per_token,
        )


@dataclass
class StepRecord:
    """One engine step as the step trace and the roofline show it."""

    step_id: int
    time: float
    """Unix seconds at the end of the step."""
    duration_ms: float
    """Wall time of schedule + execute + update."""
    forward_ms: float
    batch_size: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_preemptions: int
    prefill_chunks: list[dict] = field(default_factory=list)
    """{"request_id", "num_tokens"} of every prefill chunk in the step."""
    decode_request_ids: list[str] = field(default_factory=list)
    admitted: list[dict] = field(default_factory=list)
    """{"request_id", "queue_ms"} of requests scheduled for the first time: arrival to this step."""
    weight_bytes: int = 0
    kv_bytes_read: int = 0
    kv_bytes_written: int = 0
    flops: int = 0
    achieved_bandwidth_bytes_per_s: float = 0.0
    achieved_flops_per_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _PendingStep:
    """A step's record, filled in before the update moves `num_computed_tokens` on."""

    started: float
    record: StepRecord


class StepStatsRecorder:
    """Builds a `StepRecord` per engine step and keeps the last `capacity` of them.

    The engine calls `begin` after scheduling (before the update changes the sequences)
    and `finish` at the end of the step. `capacity` 0 turns recording off.
    """

    def __init__(self, cost_model: StepCostModel, capacity: int):
        self.cost_model = cost_model
        self.records: RingBuffer[StepRecord] | None = RingBuffer(capacity) if capacity > 0 else None

    def begin(self, scheduler_output: SchedulerOutput, started: float) -> _PendingStep | None:
        """Compute the step's costs from the scheduled sequences; `started` is its perf_counter start."""
        if self.records is None:
            return None
        cost = self.cost_model
        record = StepRecord(
            step_id=scheduler_output.step_id,
            time=0.0,
            duration_ms=0.0,
            forward_ms=0.0,
            batch_size=len(scheduler_output.scheduled),
            num_prefill_tokens=0,
            num_decode_tokens=0,
            num_preemptions=len(scheduler_output.preempted),
        )
        now = time.time()
        num_tokens = 0
        num_logits_rows = 0
        kv_tokens_read = 0
        attention_pairs = 0
        for item in scheduler_output.scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            num_draft = getattr(item, "num_draft_tokens", 0)
            num_tokens += item.num_new_tokens
            kv_tokens_read += end
            # Causal attention: the query at position p attends to p + 1 keys.
            attention_pairs += (end * (end + 1) - start * (start + 1)) // 2
            if end == seq.num_tokens:
                num_logits_rows += 1 + num_draft
            is_decode = item.num_new_tokens == 1 + num_draft and end == seq.num_tokens and start >= seq.num_prompt_tokens
            if is_decode:
                record.num_decode_tokens += item.num_new_tokens
                record.decode_request_ids.append(seq.request_id)
            else:
                record.num_prefill_tokens += item.num_new_tokens
                record.prefill_chunks.append({"request_id": seq.request_id, "num_tokens": item.num_new_tokens})
            is_first_schedule = (
                seq.num_output_tokens == 0 and seq.num_preemptions == 0 and start == seq.num_cached_prompt_tokens
            )
            if is_first_schedule:
                record.admitted.append({"request_id": seq.request_id, "queue_ms": (now - seq.arrival_time) * 1000})

        record.weight_bytes = (
            cost.body_weight_bytes
            + num_tokens * cost.embedding_row_bytes
            + (cost.lm_head_bytes if num_logits_rows else 0)
        )
        record.kv_bytes_read = kv_tokens_read * cost.kv_bytes_per_token
        record.kv_bytes_written = num_tokens * cost.kv_bytes_per_token
        record.flops = (
            num_tokens * cost.linear_flops_per_token
            + attention_pairs * cost.attention_flops_per_pair
            + num_logits_rows * cost.lm_head_flops_per_row
        )
        return _PendingStep(started, record)

    def finish(self, pending: _PendingStep | None, forward_ms: float) -> StepRecord | None:
        """Stamp the step's duration and rates, keep the record and return it."""
        if pending is None or self.records is None:
            return None
        record = pending.record
        duration_s = time.perf_counter() - pending.started
        record.time = time.time()
        record.duration_ms = duration_s * 1000
        record.forward_ms = forward_ms
        if duration_s > 0:
            record.achieved_bandwidth_bytes_per_s = (record.weight_bytes + record.kv_bytes_read) / duration_s
            record.achieved_flops_per_s = record.flops / duration_s
        self.records.append(record)
        return record

    def last(self) -> StepRecord | None:
        return self.records.last() if self.records is not None else None

    def records_after(self, step_id: int | None) -> list[StepRecord]:
        """Records with a step id above `step_id` (all when None), oldest first."""
        if self.records is None:
            return []
        return self.records.items_after(lambda record: record.step_id, step_id)

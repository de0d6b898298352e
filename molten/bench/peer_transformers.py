"""The transformers peer: `model.generate()` one request at a time, or in static batches.

Each call is greedy and generates exactly the requested count (`min_new_tokens` equals
`max_new_tokens`, so EOS cannot end it early). The attention mask is always passed:
SmolLM2's pad id equals its EOS id, so a mask inferred from pad tokens would be wrong.
A static batch is left-padded to its longest prompt and runs until its longest
request is done, which is the cost static batching has.
"""

from __future__ import annotations

import time

import torch
from transformers.generation.streamers import BaseStreamer

from molten.bench.door_engine import BenchTimeoutError
from molten.bench.metrics import RequestRecord, RequestSpec


class TokenTimer(BaseStreamer):
    """Records when `generate()` produces each new token (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.token_ids: list[list[int]] = []
        self._saw_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._saw_prompt:
            self._saw_prompt = True
            return
        self.times.append(time.perf_counter())
        self.token_ids.append(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class TransformersPeer:
    """Runs request lists through a transformers model's own `generate()` and records token times."""

    def __init__(self, model, pad_token_id: int):
        self.model = model
        self.pad_token_id = pad_token_id

    @classmethod
    def for_model(cls, loaded_model) -> TransformersPeer:
        """Wrap a `molten.models.LoadedModel`; padding uses its pad id, or an EOS id when it has none."""
        pad_token_id = loaded_model.tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = min(loaded_model.eos_token_ids)
        return cls(loaded_model.model, pad_token_id)

    def warm_up(self) -> None:
        self.run_batch([RequestSpec(list(range(1000, 1016)), 4)])

    def run(self, requests: list[RequestSpec], batch_size: int, time_limit_s: float) -> list[RequestRecord]:
        """Run `requests` in arrival order, `batch_size` per `generate()` call, one call after another.

        Arrival times are ignored: a static batch starts when the previous one ends.
        Raises BenchTimeoutError when a batch ends past `time_limit_s`.
        """
        deadline = time.perf_counter() + time_limit_s
        ordered = sorted(requests, key=lambda spec: spec.arrival_s)
        records: list[RequestRecord] = []
        for first in range(0, len(ordered), batch_size):
            records.extend(self.run_batch(ordered[first : first + batch_size]))
            if time.perf_counter() > deadline:
                raise BenchTimeoutError(f"transformers run of {len(requests)} requests exceeded {time_limit_s:.0f} s")
        return records

    @torch.inference_mode()
    def run_batch(self, batch: list[RequestSpec]) -> list[RequestRecord]:
        """Generate for `batch` in one `generate()` call; every request is sent at the call's start."""
        max_new_tokens = max(spec.max_tokens for spec in batch)
        longest = max(len(spec.prompt_token_ids) for spec in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, spec in enumerate(batch):
            length = len(spec.prompt_token_ids)
            input_ids[row, longest - length :] = torch.tensor(spec.prompt_token_ids, dtype=torch.long)
            attention_mask[row, longest - length :] = 1

        timer = TokenTimer()
        sent = time.perf_counter()
        self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_token_id,
            streamer=timer,
        )
        records = []
        for row, spec in enumerate(batch):
            record = RequestRecord(spec=spec, sent_time=sent)
            for when, token_ids in list(zip(timer.times, timer.token_ids))[: spec.max_tokens]:
                record.add_token(when, token_ids[row])
            records.append(record)
        return records

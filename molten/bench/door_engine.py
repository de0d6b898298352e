"""The engine door: Molten's `LLMEngine` called in-process, with no serving layer in between."""

from __future__ import annotations

import itertools
import time

from molten.bench.metrics import RequestRecord, RequestSpec
from molten.config import EngineConfig
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams

WARM_UP_PROMPT = list(range(1000, 1016))
WARM_UP_TOKENS = 4


class BenchTimeoutError(TimeoutError):
    """A benchmark run did not finish within its time limit."""


def benchmark_params(max_tokens: int) -> SamplingParams:
    """Greedy decoding of exactly `max_tokens` tokens: EOS is ignored, so every system does the same work."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class EngineDoor:
    """Runs request lists through one `LLMEngine`, adding each request at its arrival time."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._request_ids = itertools.count()

    @classmethod
    def build(cls, config: EngineConfig, loaded_model) -> EngineDoor:
        door = cls(LLMEngine(config, loaded_model))
        door.warm_up()
        return door

    def warm_up(self) -> None:
        """Run one short request so one-time costs (first kernel calls, allocations) are not measured."""
        self.run([RequestSpec(WARM_UP_PROMPT, WARM_UP_TOKENS)], time_limit_s=600)

    def run(self, requests: list[RequestSpec], time_limit_s: float) -> list[RequestRecord]:
        """Run `requests` to completion and return their records, in the order given.

        Token times are taken when `step()` returns, which is when a caller of the engine
        could first see the token. Raises BenchTimeoutError past `time_limit_s`; the
        engine is left empty either way.
        """
        order = sorted(range(len(requests)), key=lambda index: requests[index].arrival_s)
        records: list[RequestRecord | None] = [None] * len(requests)
        by_request_id: dict[str, RequestRecord] = {}
        start = time.perf_counter()
        deadline = start + time_limit_s
        try:
            while order or self.engine.has_unfinished():
                now = time.perf_counter()
                if now > deadline:
                    raise BenchTimeoutError(f"engine run of {len(requests)} requests exceeded {time_limit_s:.0f} s")
                while order and start + requests[order[0]].arrival_s <= now:
                    index = order.pop(0)
                    request_id, record = self._add(requests[index])
                    records[index] = record
                    by_request_id[request_id] = record
                if not self.engine.has_unfinished():
                    time.sleep(max(0.0, start + requests[order[0]].arrival_s - time.perf_counter()))
                    continue
                events = self.engine.step()
                stepped = time.perf_counter()
                for event in events:
                    record = by_request_id[event.request_id]
                    record.add_token(stepped, event.token_id)
                    if event.index == 0:
                        record.num_cached_prompt_tokens = event.num_cached_prompt_tokens
        finally:
            for request_id in by_request_id:
                self.engine.abort_request(request_id)
        return [record for record in records if record is not None]

    def _add(self, spec: RequestSpec) -> tuple[str, RequestRecord]:
        request_id = f"bench-{next(self._request_ids)}"
        sent = time.perf_counter()
        self.engine.add_request(request_id, spec.prompt_token_ids, benchmark_params(spec.max_tokens))
        return request_id, RequestRecord(spec=spec, sent_time=sent)

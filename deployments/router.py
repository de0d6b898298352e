"""Request routing from the ingress to the engine workers, with prefill -> decode handoff.

`RequestRouter` turns one prepared request into a stream of `TokenEvent`s. In
disaggregated mode it awaits the prefill worker (first token plus a KV handoff
reference) and then streams from the decode worker. In co-located mode it streams from
the single worker. Requests with `n > 1` fan out into `n` engine requests whose streams
are merged; sequence i uses seed + i so seeded requests stay reproducible.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from molten.engine.events import TokenEvent
from molten.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0
    arrival_time: float = dataclasses.field(default_factory=time.time)


class RequestRouter:
    def __init__(
        self,
        *,
        prefill: DeploymentHandle | None = None,
        decode: DeploymentHandle | None = None,
        colocated: DeploymentHandle | None = None,
    ):
        if colocated is None and (prefill is None or decode is None):
            raise ValueError("a router needs a co-located worker, or both a prefill and a decode worker")
        self.prefill = prefill
        self.decode = decode
        self.colocated = colocated

    @property
    def mode(self) -> str:
        return "colocated" if self.colocated is not None else "disaggregated"

    @property
    def workers(self) -> list[DeploymentHandle]:
        return [self.colocated] if self.colocated is not None else [self.prefill, self.decode]

    async def stream(self, request: PreparedRequest) -> AsyncIterator[TokenEvent]:
        n = request.sampling_params.n
        if n == 1:
            async for event in self._stream_one(request, 0):
                yield event
            return
        async for event in self._merge([self._stream_one(request, i) for i in range(n)]):
            yield event

    async def _stream_one(self, request: PreparedRequest, seq_index: int) -> AsyncIterator[TokenEvent]:
        params = request.sampling_params
        if params.n > 1:
            seed = None if params.seed is None else params.seed + seq_index
            params = dataclasses.replace(params, n=1, seed=seed)
        request_id = request.request_id if request.sampling_params.n == 1 else f"{request.request_id}-{seq_index}"
        args = (request_id, request.prompt_token_ids, params, request.priority, request.arrival_time)

        if self.colocated is not None:
            source = self.colocated.options(stream=True).generate.remote(*args)
            async for event in _cancel_on_exit(source):
                event.seq_index = seq_index
                yield event
            return

        result = await self.prefill.prefill.remote(*args)
        first: TokenEvent = result["event"]
        first.seq_index = seq_index
        yield first
        if result["handoff"] is None:
            return
        source = self.decode.options(stream=True).decode.remote(result["handoff"])
        async for event in _cancel_on_exit(source):
            event.seq_index = seq_index
            yield event

    async def _merge(self, streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[TokenEvent]:
        """Interleave several event streams in arrival order; cancel the rest if one fails."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(stream: AsyncIterator[TokenEvent]) -> None:
            try:
                async for event in stream:
                    await queue.put(event)
                await queue.put(done)
            except BaseException as exc:
                await queue.put(exc)

        tasks = [asyncio.create_task(pump(s)) for s in streams]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()


async def _cancel_on_exit(source) -> AsyncIterator[TokenEvent]:
    """Iterate a Serve streaming response, cancelling it if the consumer stops early."""
    finished = False
    try:
        async for event in source:
            yield event
        finished = True
    finally:
        if not finished:
            source.cancel()

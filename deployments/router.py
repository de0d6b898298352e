"""Request routing from the ingress to the engine workers, with prefill -> decode handoff.

`RequestRouter` turns one prepared request into a stream of `TokenEvent`s. In
disaggregated mode it awaits the prefill worker (first token plus a KV handoff
reference) and then streams from the decode worker. In co-located mode it streams from
the single worker. A co-located request with `n > 1` stays one engine request: the
engine forks its `n` sequences off the computed prompt, sharing the prompt's KV blocks,
and gives sequence i the seed + i. In disaggregated mode `n > 1` fans out into `n`
requests with those same seeds, whose streams are merged.
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
        if n == 1 or self.colocated is not None:
            async for event in self._stream_one(request, 0):
                yield event
            return
        # NOTE: a prefill-only engine takes one sequence per request, so in disaggregated
        # mode each of the n sequences is a request of its own on both workers, and they
        # share prompt KV only through the prefix cache, not through the engine's fork.
        async for event in self._merge([self._stream_one(request, i) for i in range(n)]):
            yield event

    async def _stream_one(self, request: PreparedRequest, seq_index: int) -> AsyncIterator[TokenEvent]:
        params = request.sampling_params
        if self.colocated is not None:
            # The engine runs all n sequences and sets each event's seq_index itself.
            args = (request.request_id, request.prompt_token_ids, params, request.priority, request.arrival_time)
            source = self.colocated.options(stream=True).generate.remote(*args)
            async for event in _cancel_on_exit(source):
                yield event
            return

        if params.n > 1:
            seed = None if params.seed is None else params.seed + seq_index
            params = dataclasses.replace(params, n=1, seed=seed)
        request_id = request.request_id if request.sampling_params.n == 1 else f"{request.request_id}-{seq_index}"
        args = (request_id, request.prompt_token_ids, params, request.priority, request.arrival_time)

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


MIN_COMPARE_MODELS = 2
MAX_COMPARE_MODELS = 4


def _compare_error(message: str, param: str = "models") -> dict:
    return {
        "type": "error",
        "index": None,
        "error": {"status": 400, "message": message, "type": "invalid_request_error", "param": param},
    }


async def compare_streams(stream_events, body: dict) -> AsyncIterator[dict]:
    """Send one prompt to 2-4 models at once and yield their items merged in arrival order.

    `stream_events(kind, body)` is the ingress's per-request event stream. Items are
    {"type": "start" | "token" | "error" | "done", "index", "model", ...}; a "done" item
    carries the model's text and timings measured here: time to first token, end to end,
    and decode tokens per second. A body that is invalid as a whole yields one "error"
    item whose index is None.
    """
    models = body.get("models") if isinstance(body, dict) else None
    if not isinstance(models, list) or not all(isinstance(model, str) and model for model in models):
        yield _compare_error("models must be a list of model ids")
        return
    if not MIN_COMPARE_MODELS <= len(models) <= MAX_COMPARE_MODELS:
        yield _compare_error(f"models must name {MIN_COMPARE_MODELS} to {MAX_COMPARE_MODELS} models, got {len(models)}")
        return
    if "messages" in body:
        kind = "chat"
    elif "prompt" in body:
        kind = "completions"
    else:
        yield _compare_error("send either messages (chat) or prompt (completions)", param="messages")
        return
    shared = {key: value for key, value in body.items() if key not in ("models", "stream", "n")}

    queue: asyncio.Queue = asyncio.Queue()
    started = time.perf_counter()

    async def run_one(index: int, model: str) -> None:
        text: list[str] = []
        first_token_at = None
        num_tokens = 0
        finish_reason = None
        try:
            async for kind_of_item, payload in stream_events(kind, {**shared, "model": model}):
                now = time.perf_counter()
                if kind_of_item == "error":
                    error = payload.get("error", payload)
                    await queue.put({"type": "error", "index": index, "model": model, "error": error})
                    return
                if kind_of_item == "start":
                    await queue.put({"type": "start", "index": index, "model": model, **payload, "requested": model})
                    continue
                event: TokenEvent = payload
                first_token_at = first_token_at or now
                num_tokens += 1
                text.append(event.text)
                finish_reason = event.finish_reason or finish_reason
                await queue.put({
                    "type": "token",
                    "index": index,
                    "model": model,
                    "text": event.text,
                    "time_ms": round((now - started) * 1000, 2),
                    "step_id": event.step_id,
                    "batch_size": event.batch_size,
                })
            end = time.perf_counter()
            ttft_ms = None if first_token_at is None else round((first_token_at - started) * 1000, 2)
            decode_s = 0.0 if first_token_at is None else end - first_token_at
            decode_rate = round((num_tokens - 1) / decode_s, 2) if num_tokens > 1 and decode_s > 0 else None
            await queue.put({
                "type": "done",
                "index": index,
                "model": model,
                "text": "".join(text),
                "num_tokens": num_tokens,
                "finish_reason": finish_reason,
                "ttft_ms": ttft_ms,
                "e2e_ms": round((end - started) * 1000, 2),
                "decode_tokens_per_s": decode_rate,
            })
        except Exception as exc:
            logger.exception("compare stream for model %s failed", model)
            error = {"status": 500, "message": str(exc)}
            await queue.put({"type": "error", "index": index, "model": model, "error": error})
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(run_one(index, model)) for index, model in enumerate(models)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()

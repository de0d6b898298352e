"""The engine protocol between serving code and `LLMEngine`.

`AsyncEngine` owns one `LLMEngine` and runs its step loop on a dedicated thread, so an
asyncio server (a Ray Serve replica, a test) stays responsive while torch computes.
Every engine mutation happens on that thread: callers submit commands through a queue
and await a future for the result.

Streaming and error contract:
- `generate()` and `decode_imported()` yield `TokenEvent`s for one request; the last
  event of each of its sequences (`n` of them, told apart by `seq_index`) has
  `finish_reason` set. Admission errors (`EmptyPromptError`,
  `PromptTooLongError`, `QueueFullError`, `MemoryError`) are raised by the first
  `__anext__`, before any event.
- If the consumer stops early (client disconnect, `aclose()`, task cancellation), the
  request is aborted and its KV blocks are freed within one engine step.
- If a step raises, every in-flight stream receives that exception and the loop keeps
  running for new requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from molten.engine.events import HandoffStats, TokenEvent
from molten.engine.llm_engine import KVHandoff, LLMEngine
from molten.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class PrefillResult:
    """The first token of a prefill-only request, and its KV handoff unless it already finished."""

    event: TokenEvent
    handoff: KVHandoff | None


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: TokenEvent | BaseException) -> bool:
        """Hand `item` to the consumer's event loop. Returns False if that loop is closed."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # asyncio raises RuntimeError("Event loop is closed")
            return False
        return True


class AsyncEngine:
    def __init__(self, engine: LLMEngine, name: str = "engine"):
        self.engine = engine
        self.name = name
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._stopped = False
        self.step_listeners: list[Callable[[LLMEngine, list[TokenEvent], float], None]] = []
        """Called on the engine thread after each non-empty step with (engine, events, step seconds)."""
        self._thread = threading.Thread(target=self._run, name=f"molten-{name}-loop", daemon=True)
        self._thread.start()

    # -- commands executed on the engine thread ------------------------------------------

    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        self._wakeup.set()
        return future

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` on the engine thread between steps and return its result."""
        return await asyncio.wrap_future(self._submit(lambda: fn(self.engine)))

    def _drain_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the awaiting caller
                future.set_exception(exc)

    def _run(self) -> None:
        logger.info("%s step loop started", self.name)
        while not self._stopped:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            started = time.perf_counter()
            try:
                events = self.engine.step()
            except Exception as exc:
                logger.exception("%s step failed; failing %d in-flight requests", self.name, len(self._streams))
                self._fail_all(exc)
                continue
            finished_request_ids: set[str] = set()
            for event in events:
                stream = self._streams.get(event.request_id)
                if stream is not None and not stream.put(event):
                    # No one can read this stream any more. Raising here would end the
                    # step loop and hang every other request.
                    logger.warning(
                        "%s: the event loop of request %s is closed, so the request is aborted", self.name, event.request_id
                    )
                    self._streams.pop(event.request_id, None)
                    self.engine.abort_request(event.request_id)
                    continue
                if event.finish_reason is not None:
                    finished_request_ids.add(event.request_id)
            # After routing the whole step: sibling sequences (n > 1) can finish in one step.
            for request_id in finished_request_ids:
                if request_id not in self.engine.sequences:
                    self._streams.pop(request_id, None)
            elapsed = time.perf_counter() - started
            for listener in self.step_listeners:
                try:
                    listener(self.engine, events, elapsed)
                except Exception:
                    logger.exception("step listener failed")
        logger.info("%s step loop stopped", self.name)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.put(exc)
        self._streams.clear()

    # -- public API (call from an asyncio loop) ---------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> AsyncIterator[TokenEvent]:
        stream = _Stream(asyncio.get_running_loop())

        def add() -> None:
            self.engine.add_request(
                request_id, prompt_token_ids, sampling_params, priority=priority, arrival_time=arrival_time
            )
            self._streams[request_id] = stream

        await self._admit(add, request_id, stream)
        async for event in self._consume(request_id, stream, sampling_params.n):
            yield event

    async def prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> PrefillResult:
        """Compute the prompt, sample the first token and export the KV blocks."""
        stream = _Stream(asyncio.get_running_loop())

        def add() -> None:
            self.engine.add_request(
                request_id,
                prompt_token_ids,
                sampling_params,
                priority=priority,
                arrival_time=arrival_time,
                prefill_only=True,
            )
            self._streams[request_id] = stream

        await self._admit(add, request_id, stream)
        try:
            item = await stream.queue.get()
        except BaseException:
            self._submit(lambda: self.engine.abort_request(request_id))
            self._streams.pop(request_id, None)
            raise
        if isinstance(item, BaseException):
            raise item
        self._streams.pop(request_id, None)
        if item.finish_reason is not None:
            return PrefillResult(item, None)
        handoff = await self.call(lambda engine: engine.export_sequence(request_id))
        return PrefillResult(item, handoff)

    async def decode_imported(self, handoff: KVHandoff) -> AsyncIterator[TokenEvent]:
        """Import a prefilled sequence's KV blocks and stream its remaining tokens.

        The first event carries the `HandoffStats` of the import.
        """
        stream = _Stream(asyncio.get_running_loop())

        def add() -> HandoffStats:
            stats = self.engine.import_sequence(handoff)
            self._streams[handoff.request_id] = stream
            return stats

        stats = await self._admit(add, handoff.request_id, stream)
        first = True
        async for event in self._consume(handoff.request_id, stream):
            if first:
                event.handoff = stats
                first = False
            yield event

    async def _admit(self, add: Callable[[], Any], request_id: str, stream: _Stream) -> Any:
        """Run `add` on the engine thread and return its result.

        If the caller is cancelled while waiting, `add` may already have run, and no one
        would read the stream or abort the request. So the cancellation queues an abort
        that runs after `add` and removes the request if `add` registered this stream.
        """
        try:
            return await asyncio.wrap_future(self._submit(add))
        except asyncio.CancelledError:

            def abort_if_admitted() -> None:
                if self._streams.get(request_id) is stream:
                    del self._streams[request_id]
                    self.engine.abort_request(request_id)

            self._submit(abort_if_admitted)
            raise

    async def _consume(self, request_id: str, stream: _Stream, num_seqs: int = 1) -> AsyncIterator[TokenEvent]:
        """Yield the request's events until each of its `num_seqs` sequences has finished."""
        finished = False
        num_unfinished = num_seqs
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    num_unfinished -= 1
                    finished = num_unfinished == 0
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._streams.pop(request_id, None)
                self._submit(lambda: self.engine.abort_request(request_id))

    async def abort(self, request_id: str) -> bool:
        self._streams.pop(request_id, None)
        return await self.call(lambda engine: engine.abort_request(request_id))

    @property
    def is_running(self) -> bool:
        """Whether the step loop thread is alive (used by Serve health checks)."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)

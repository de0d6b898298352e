"""The served doors: a Ray Serve deployment handle, and HTTP with server-sent events.

`ServeSession` starts Ray and Serve bound to 127.0.0.1 and deploys one Molten
application at a time (co-located or disaggregated). Both doors send the same
`/v1/completions` body (token-id prompt, greedy, `ignore_eos`) to the ingress: the
handle door calls its `stream_events` method, the HTTP door posts to
`http://127.0.0.1:<port>/v1/completions` with `stream: true`.

Ray is imported inside functions only, so importing this module never starts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from molten.bench.door_engine import WARM_UP_PROMPT, WARM_UP_TOKENS, BenchTimeoutError
from molten.bench.metrics import HandoffRecord, RequestRecord, RequestSpec
from molten.config import CacheConfig

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
APP_NAME = "molten-bench"
HEALTH_TIMEOUT_S = 600.0
HTTP_TIMEOUT_S = 600.0


class ServeRequestError(RuntimeError):
    """The ingress returned an error for a benchmark request."""


@dataclass(frozen=True)
class StreamedToken:
    """One token as a served door receives it."""

    token_id: int
    index: int
    num_cached_prompt_tokens: int | None = None
    handoff: HandoffRecord | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def completion_body(model_id: str, spec: RequestSpec, *, stream: bool) -> dict[str, Any]:
    return {
        "model": model_id,
        "prompt": list(spec.prompt_token_ids),
        "max_tokens": spec.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": stream,
    }


class ServeSession:
    """Ray and Serve on 127.0.0.1 with one Molten application deployed at a time."""

    def __init__(
        self, model: str, dtype: str, max_model_len: int | None, kv_cache_memory_mib: int, num_threads: int
    ):
        self.model = model
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.kv_cache_memory_mib = kv_cache_memory_mib
        self.num_threads = num_threads
        self.http_port = free_port()
        self.dashboard_port = free_port()
        self.mode: str | None = None
        self.settings = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def deploy(self, mode: str):
        """Deploy the application in `mode` (replacing the other one) and wait until /health returns 200."""
        from ray import serve

        from molten.deployments.app import run_app
        from molten.deployments.settings import ServeSettings

        if self.mode == mode:
            return self.settings
        if self.mode is not None:
            serve.delete(APP_NAME)
            self.mode = None
        # Co-located runs one engine on every thread; disaggregated splits them between prefill and decode.
        threads = self.num_threads if mode == "colocated" else max(1, self.num_threads // 2)
        settings = ServeSettings(
            model=self.model,
            dtype=self.dtype,
            mode=mode,
            host=HOST,
            http_port=self.http_port,
            dashboard_port=self.dashboard_port,
            ui_port=0,
            worker_num_threads=threads,
            max_model_len=self.max_model_len,
            cache=CacheConfig(kv_cache_memory_mib=self.kv_cache_memory_mib),
            app_name=APP_NAME,
        )
        run_app(settings)
        wait_healthy(self.base_url, HEALTH_TIMEOUT_S)
        self.mode = mode
        self.settings = settings
        return settings

    def close(self) -> None:
        from molten.deployments.app import shutdown

        shutdown()


def wait_healthy(base_url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/health", timeout=10, trust_env=False)
            if response.status_code == 200:
                return
            last_error = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last_error = repr(exc)
        time.sleep(1)
    raise BenchTimeoutError(f"{base_url}/health did not return 200 within {timeout_s:.0f} s: {last_error}")


class AsyncDoor:
    """Sends each request at its arrival time from one asyncio loop and records its token stream."""

    name = "async"

    def __init__(self, model_id: str):
        self.model_id = model_id

    def warm_up(self) -> None:
        self.run([RequestSpec(WARM_UP_PROMPT, WARM_UP_TOKENS)], time_limit_s=600)

    def run(self, requests: list[RequestSpec], time_limit_s: float) -> list[RequestRecord]:
        """Run `requests` and return their records in the order given. Raises BenchTimeoutError past the limit."""
        return asyncio.run(self._run(requests, time_limit_s))

    async def _run(self, requests: list[RequestSpec], time_limit_s: float) -> list[RequestRecord]:
        async with self.connect() as connection:
            start = time.perf_counter()
            runs = [self._run_one(connection, spec, start) for spec in requests]
            try:
                return await asyncio.wait_for(asyncio.gather(*runs), time_limit_s)
            except TimeoutError:
                raise BenchTimeoutError(
                    f"{self.name} run of {len(requests)} requests exceeded {time_limit_s:.0f} s"
                ) from None

    async def _run_one(self, connection: Any, spec: RequestSpec, start: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + spec.arrival_s - time.perf_counter()))
        record = RequestRecord(spec=spec, sent_time=time.perf_counter())
        async for token in self.stream(connection, spec):
            record.add_token(time.perf_counter(), token.token_id)
            if token.num_cached_prompt_tokens is not None:
                record.num_cached_prompt_tokens = token.num_cached_prompt_tokens
            if token.handoff is not None:
                record.handoff = token.handoff
        return record

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        yield None

    def stream(self, connection: Any, spec: RequestSpec) -> AsyncIterator[StreamedToken]:
        raise NotImplementedError


class HandleDoor(AsyncDoor):
    """Calls the ingress's `stream_events` through a Serve deployment handle from this process."""

    name = "handle"

    def __init__(self, model_id: str, settings):
        super().__init__(model_id)
        self.settings = settings

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        from molten.deployments.app import ingress_handle

        yield ingress_handle(self.settings).options(stream=True)

    async def stream(self, connection: Any, spec: RequestSpec) -> AsyncIterator[StreamedToken]:
        body = completion_body(self.model_id, spec, stream=False)
        async for kind, payload in connection.stream_events.remote("completions", body):
            if kind == "error":
                raise ServeRequestError(f"ingress rejected a benchmark request: {payload}")
            if kind != "event":
                continue
            handoff = None
            if payload.handoff is not None:
                handoff = HandoffRecord(payload.handoff.num_bytes, payload.handoff.total_ms)
            yield StreamedToken(
                token_id=payload.token_id,
                index=payload.index,
                num_cached_prompt_tokens=payload.num_cached_prompt_tokens if payload.index == 0 else None,
                handoff=handoff,
            )


class HttpDoor(AsyncDoor):
    """Posts streaming completions to the Serve HTTP proxy on 127.0.0.1 and reads the SSE chunks."""

    name = "http"

    def __init__(self, model_id: str, base_url: str):
        super().__init__(model_id)
        if not base_url.startswith(f"http://{HOST}:"):
            raise ValueError(f"the HTTP door only sends to {HOST}, got {base_url}")
        self.base_url = base_url

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Any]:
        import httpx

        # trust_env=False: no proxy from the environment may redirect loopback requests.
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(
            base_url=self.base_url, timeout=HTTP_TIMEOUT_S, limits=limits, trust_env=False
        ) as client:
            yield client

    async def stream(self, connection: Any, spec: RequestSpec) -> AsyncIterator[StreamedToken]:
        body = completion_body(self.model_id, spec, stream=True)
        async with connection.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise ServeRequestError(f"POST /v1/completions returned HTTP {response.status_code}: {text[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ServeRequestError(f"stream failed: {chunk['error']}")
                if chunk.get("choices"):
                    yield parse_token_chunk(chunk)


def parse_token_chunk(chunk: dict[str, Any]) -> StreamedToken:
    """Read a token's id, index, cached prompt tokens and handoff cost from a chunk's `molten` object."""
    timing = chunk["molten"]
    handoff = timing.get("handoff")
    return StreamedToken(
        token_id=timing["token_id"],
        index=timing["index"],
        num_cached_prompt_tokens=timing.get("num_cached_prompt_tokens"),
        handoff=HandoffRecord(handoff["bytes"], handoff["total_ms"]) if handoff else None,
    )

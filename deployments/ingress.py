"""The HTTP ingress: OpenAI-compatible routes on Ray Serve, plus Molten's own under /v1/molten.

The ingress validates and tokenizes (it loads only tokenizers, no weights), so a
client mistake gets a 400 before any worker is involved. Every error leaves
as an OpenAI-style body; nothing a client sends produces a 500.

Which workers serve a model is the model manager's decision (`molten.deployments.manager`):
before each request the ingress takes a lease from the manager, which resolves aliases
and A/B weights and counts the request as in flight until the stream ends, so an unload
or swap can wait for it.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request`
# annotation on the class-based routes that Serve wraps.
import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from molten.engine.events import TokenEvent
from molten.engine.llm_engine import EmptyPromptError, PromptTooLongError
from molten.engine.scheduler import QueueFullError
from molten.protocol.openai import (
    SSE_DONE,
    APIError,
    ChatChunkEncoder,
    ChatCompletionRequest,
    CompletionChunkEncoder,
    CompletionRequest,
    RequestValidationError,
    build_chat_completion,
    build_completion,
    build_model_list,
    format_sse,
    internal_error,
    new_completion_id,
    overloaded_error,
    parse_json_body,
    payload_too_large_error,
    unix_time,
)
from molten.tokenization.chat import ChatFormatError, render_chat, validate_messages

from molten.deployments.router import PreparedRequest, RequestRouter, compare_streams
from molten.deployments.telemetry import read_peaks, read_telemetry, register_with_telemetry

logger = logging.getLogger(__name__)

app = FastAPI(title="Molten", description="OpenAI-compatible API of the Molten inference playground.")


@app.exception_handler(StarletteHTTPException)
async def http_error_in_openai_shape(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Return an OpenAI-style error body for unknown routes and wrong methods, in place of FastAPI's default."""
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 404 and "/v1/" not in request.url.path:
        message += ". The API routes are under /v1, for example POST /v1/chat/completions"
    error = APIError(message, status=exc.status_code, error_type="invalid_request_error")
    return JSONResponse(error.to_dict(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

RETRY_AFTER_S = 1


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status, headers=error.headers)


def engine_error_to_api_error(exc: BaseException, prompt_param: str) -> APIError | None:
    """Map an exception raised by a worker to the API error a client should see, if it is a client-facing one."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, QueueFullError):
        return overloaded_error(f"server is at capacity: {cause}; retry later", retry_after_s=RETRY_AFTER_S, status=429)
    if isinstance(cause, MemoryError):
        return overloaded_error(f"not enough KV cache memory: {cause}; retry later", retry_after_s=RETRY_AFTER_S)
    if isinstance(cause, EmptyPromptError):
        return RequestValidationError(str(cause), param=prompt_param)
    if isinstance(cause, PromptTooLongError):
        return RequestValidationError(str(cause), param=prompt_param)
    return None


def add_utilizations(models: list[dict], peaks: dict) -> None:
    """Set each step's `bandwidth_utilization` (MBU) and `flop_utilization` (MFU): achieved / peak, None without a peak."""
    peak_bandwidth = peaks.get("bandwidth_bytes_per_s")
    peak_flops = peaks.get("flops_per_s")
    for model in models:
        for steps in model["workers"].values():
            for step in steps:
                step["bandwidth_utilization"] = (
                    step["achieved_bandwidth_bytes_per_s"] / peak_bandwidth if peak_bandwidth else None
                )
                step["flop_utilization"] = step["achieved_flops_per_s"] / peak_flops if peak_flops else None


def manager_error_to_api_error(error: dict) -> APIError:
    """Turn the manager's {"status", "message", "code", "param", "retry_after_s"} error into an API error."""
    status = error["status"]
    if status == 503:
        return overloaded_error(error["message"], retry_after_s=error.get("retry_after_s") or RETRY_AFTER_S)
    if status == 400:
        return RequestValidationError(error["message"], param=error.get("param"), code=error.get("code"))
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return APIError(error["message"], status=status, error_type=error_type, param=error.get("param"), code=error.get("code"))


class Lease:
    """A route to one model's workers, held by one request until its stream ends."""

    def __init__(self, route: dict, router: RequestRouter, tokenizer):
        self.lease_id: str = route["lease_id"]
        self.model_id: str = route["model_id"]
        self.max_model_len: int = route["max_model_len"]
        self.router = router
        self.tokenizer = tokenizer

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class MoltenIngress:
    def __init__(
        self,
        manager: DeploymentHandle,
        default_model_id: str,
        max_body_bytes: int,
        default_max_tokens: int | None,
    ):
        self.manager = manager
        self.model_id = default_model_id
        """The model `molten serve` loaded at start; /health and the playground's header show it."""
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self._routers: dict[str, tuple[int, RequestRouter]] = {}
        """Model id → (generation, router); a new generation (a reload) replaces the router."""
        self._tokenizers: dict[str, Any] = {}
        self._releases: set[asyncio.Task] = set()
        self.router: RequestRouter | None = None
        """Router of the default model (or the first ready one), refreshed by `routes()`."""
        logger.info("ingress ready; default model %s", default_model_id)
        register_with_telemetry("molten:ingress")

    # -- routing through the model manager ----------------------------------------------

    def _router_for(self, route: dict) -> RequestRouter:
        cached = self._routers.get(route["model_id"])
        if cached is not None and cached[0] == route["generation"]:
            return cached[1]
        handles = {
            role: serve.get_deployment_handle(names["deployment_name"], app_name=names["app_name"])
            for role, names in route["deployments"].items()
        }
        router = RequestRouter(**handles)
        self._routers[route["model_id"]] = (route["generation"], router)
        return router

    async def _tokenizer(self, spec: str):
        """Load (once) the tokenizer of a model spec, off the event loop."""
        from molten.models import load_tokenizer

        if spec not in self._tokenizers:
            self._tokenizers[spec] = await asyncio.to_thread(load_tokenizer, spec)
        return self._tokenizers[spec]

    async def routes(self) -> dict[str, RequestRouter]:
        """Return a router for every ready model, and refresh `self.router` (the default model's)."""
        table = await self.manager.routing_table.remote()
        routers = {model_id: self._router_for(route) for model_id, route in table.items()}
        self.router = routers.get(self.model_id) or next(iter(routers.values()), None)
        return routers

    async def worker_handles(self) -> list[tuple[str, str, DeploymentHandle]]:
        """Return (model id, role, handle) for every worker of every ready model."""
        handles = []
        for model_id, router in (await self.routes()).items():
            roles = ["colocated"] if router.mode == "colocated" else ["prefill", "decode"]
            handles.extend((model_id, role, handle) for role, handle in zip(roles, router.workers))
        return handles

    async def acquire(self, model: str) -> Lease:
        """Take a lease on the workers serving `model`. Raises APIError (404, or 503 while it loads)."""
        route = await self.manager.acquire.remote(model, os.getpid())
        if "error" in route:
            raise manager_error_to_api_error(route["error"])
        # BaseException: a client disconnect cancels this coroutine while the tokenizer
        # loads, and the lease must still be released or the model never drains.
        try:
            tokenizer = await self._tokenizer(route["spec"])
            return Lease(route, self._router_for(route), tokenizer)
        except BaseException:
            self.release(route["lease_id"])
            raise

    def release(self, lease_id: str) -> None:
        """Tell the manager a request ended; runs as its own task so a cancelled stream still releases."""
        task = asyncio.ensure_future(self._release(lease_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, lease_id: str) -> None:
        try:
            await self.manager.release.remote(lease_id)
        except Exception:
            logger.exception("releasing lease %s failed; the model's in-flight count stays one too high", lease_id)

    async def _leased_stream(self, lease: Lease, stream: AsyncIterator[TokenEvent]) -> AsyncIterator[TokenEvent]:
        try:
            async for event in stream:
                yield event
        finally:
            try:
                await stream.aclose()
            finally:
                self.release(lease.lease_id)

    # -- request preparation ----------------------------------------------------------

    async def _read_body(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise payload_too_large_error(int(length), self.max_body_bytes)
        raw = await request.body()
        return parse_json_body(raw, self.max_body_bytes)

    async def prepare(
        self, kind: str, body: Any, arrival_time: float | None = None
    ) -> tuple[ChatCompletionRequest | CompletionRequest, PreparedRequest, Lease]:
        """Validate a body, take a lease on its model, tokenize the prompt and build the engine request.

        Raises APIError. On success the caller owns the lease and must release it, which
        `_first_and_rest`'s stream does when it ends.
        """
        if kind == "chat":
            parsed = ChatCompletionRequest.from_body(body)
        elif kind == "completions":
            parsed = CompletionRequest.from_body(body)
        else:
            raise ValueError(f"unknown endpoint kind {kind!r}")
        lease = await self.acquire(parsed.model)
        try:
            prompt_token_ids = self._tokenize(kind, parsed, lease.tokenizer)
            params = parsed.to_sampling_params(
                max_model_len=lease.max_model_len,
                num_prompt_tokens=len(prompt_token_ids),
                default_max_tokens=self.default_max_tokens,
            )
        except BaseException:
            self.release(lease.lease_id)
            raise
        prepared = PreparedRequest(
            request_id=f"{kind}-{uuid.uuid4().hex[:16]}",
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            priority=parsed.priority,
            arrival_time=arrival_time if arrival_time is not None else time.time(),
        )
        return parsed, prepared, lease

    @staticmethod
    def _tokenize(kind: str, parsed, tokenizer) -> list[int]:
        if kind == "chat":
            try:
                messages = validate_messages(parsed.message_dicts())
                return render_chat(tokenizer, messages)
            except ChatFormatError as exc:
                raise RequestValidationError(str(exc), param=exc.field) from None
        if isinstance(parsed.prompt, str):
            return tokenizer.encode(parsed.prompt, add_special_tokens=False)
        prompt_token_ids = list(parsed.prompt)
        vocab_size = len(tokenizer)
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestValidationError(
                f"prompt contains token id {bad[0]}, outside the vocabulary of {vocab_size} tokens",
                param="prompt",
            )
        return prompt_token_ids

    # -- responses --------------------------------------------------------------------

    async def _first_and_rest(self, prepared: PreparedRequest, prompt_param: str, lease: Lease):
        """Start the stream and wait for its first event, so admission errors become proper HTTP errors.

        The returned stream releases `lease` when it ends or is closed.
        """
        stream = self._leased_stream(lease, lease.router.stream(prepared))
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise internal_error() from None
        except Exception as exc:
            await stream.aclose()
            api_error = engine_error_to_api_error(exc, prompt_param)
            if api_error is None:
                logger.exception("request %s failed before its first token", prepared.request_id)
                raise internal_error() from None
            raise api_error from None
        return first, stream

    async def handle(self, kind: str, request: Request):
        # Latency metrics count from here, the HTTP arrival, as a client's clock does.
        arrival_time = time.time()
        try:
            body = await self._read_body(request)
            parsed, prepared, lease = await self.prepare(kind, body, arrival_time)
            prompt_param = "messages" if kind == "chat" else "prompt"
            first, stream = await self._first_and_rest(prepared, prompt_param, lease)
        except APIError as exc:
            return error_response(exc)

        encoder_type = ChatChunkEncoder if kind == "chat" else CompletionChunkEncoder
        completion_id = new_completion_id("chatcmpl" if kind == "chat" else "cmpl")
        created = unix_time()
        logprobs = prepared.sampling_params.logprobs
        n = prepared.sampling_params.n

        if parsed.stream:
            encoder = encoder_type(
                completion_id=completion_id,
                created=created,
                model=lease.model_id,
                num_prompt_tokens=len(prepared.prompt_token_ids),
                n=n,
                logprobs=logprobs,
                include_usage=parsed.include_usage,
                decode_token=lease.decode_token,
            )
            return StreamingResponse(
                self._sse(first, stream, encoder, prepared.request_id),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        events = [first]
        try:
            async for event in stream:
                events.append(event)
        except Exception:
            logger.exception("request %s failed mid-generation", prepared.request_id)
            return error_response(internal_error())
        finally:
            await stream.aclose()
        builder = build_chat_completion if kind == "chat" else build_completion
        body = builder(
            completion_id=completion_id,
            created=created,
            model=lease.model_id,
            events=events,
            n=n,
            num_prompt_tokens=len(prepared.prompt_token_ids),
            logprobs=logprobs,
            decode_token=lease.decode_token,
        )
        return JSONResponse(body)

    async def _sse(self, first: TokenEvent, stream: AsyncIterator[TokenEvent], encoder, request_id: str):
        try:
            yield format_sse(encoder.encode(first))
            async for event in stream:
                yield format_sse(encoder.encode(event))
        except asyncio.CancelledError:
            logger.info("client disconnected from request %s; aborting it", request_id)
            raise
        except Exception:
            logger.exception("request %s failed mid-stream", request_id)
            yield format_sse(internal_error().to_dict())
            yield SSE_DONE
            return
        finally:
            await stream.aclose()
        usage = encoder.build_usage_chunk()
        if usage is not None:
            yield format_sse(usage)
        yield SSE_DONE

    # -- routes -----------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self.handle("chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self.handle("completions", request)

    @app.get("/v1/models")
    async def models(self):
        return JSONResponse(build_model_list(await self.manager.served_model_ids.remote()))

    @app.get("/health")
    async def health(self):
        """Report the default model (or the first ready one); 503 with Retry-After while none is ready."""
        table = await self.manager.routing_table.remote()
        route = table.get(self.model_id) or next(iter(table.values()), None)
        if route is None:
            return error_response(overloaded_error("no model is ready yet; retry later", retry_after_s=RETRY_AFTER_S))
        return {
            "status": "ok",
            "model": route["model_id"],
            "mode": route["mode"],
            "max_model_len": route["max_model_len"],
            "models": sorted(table),
        }

    async def _per_model(self, method: str) -> dict:
        """Call `method` on every worker of every ready model. Top-level keys describe the default model."""
        routers = await self.routes()
        results = {}
        for model_id, router in routers.items():
            calls = (getattr(worker, method).remote() for worker in router.workers)
            results[model_id] = {"model": model_id, "mode": router.mode, "workers": list(await asyncio.gather(*calls))}
        primary = results.get(self.model_id) or next(iter(results.values()), {"model": None, "mode": None, "workers": []})
        return {**primary, "models": list(results.values())}

    @app.get("/v1/molten/info")
    async def info(self):
        return await self._per_model("info")

    @app.get("/v1/molten/kv")
    async def kv_state(self):
        return await self._per_model("kv_state")

    # -- telemetry and the step trace -------------------------------------------------

    async def telemetry(self, since: float | None = None) -> dict:
        """Telemetry samples taken after `since` (unix seconds), from the `molten:telemetry` actor."""
        return await read_telemetry(since)

    async def steps(self, since_step: int | None = None) -> dict:
        """Step records of every worker with a step id above `since_step`, and the roofline peaks.

        `workers` holds the default model's workers by role; `models` lists every ready model.
        """
        routers = await self.routes()
        models = []
        for model_id, router in routers.items():
            replies = await asyncio.gather(*(worker.steps.remote(since_step) for worker in router.workers))
            models.append({"model": model_id, "mode": router.mode, "workers": {r["role"]: r["steps"] for r in replies}})
        peaks = await read_peaks()
        add_utilizations(models, peaks)
        primary = next((m for m in models if m["model"] == self.model_id), models[0] if models else None)
        return {
            "peaks": peaks,
            "model": primary["model"] if primary else None,
            "workers": primary["workers"] if primary else {},
            "models": models,
        }

    @app.get("/v1/molten/telemetry")
    async def telemetry_route(self, since: float | None = None):
        return await self.telemetry(since)

    @app.get("/v1/molten/steps")
    async def steps_route(self, since_step: int | None = None):
        return await self.steps(since_step)

    # -- model manager routes ---------------------------------------------------------

    async def _manager_call(self, method: str, *args, **kwargs):
        """Call a manager method; a returned {"error": ...} becomes an OpenAI-style error response."""
        result = await getattr(self.manager, method).remote(*args, **kwargs)
        if isinstance(result, dict) and "error" in result and isinstance(result["error"], dict):
            return error_response(manager_error_to_api_error(result["error"]))
        return JSONResponse(result)

    async def _manager_body(self, request: Request, required: tuple[str, ...]) -> dict:
        body = await self._read_body(request)
        for name in required:
            if not isinstance(body.get(name), str) or not body[name].strip():
                raise RequestValidationError(f"{name} is required and must be a non-empty string", param=name)
        for name in ("mode", "precision"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise RequestValidationError(f"{name} must be a string", param=name)
        if "wait" in body and not isinstance(body["wait"], bool):
            raise RequestValidationError("wait must be true or false", param="wait")
        return body

    @app.get("/v1/molten/models")
    async def manager_status(self):
        return await self._manager_call("status")

    @app.post("/v1/molten/models/load")
    async def load_model(self, request: Request):
        """Load a model: {"model", "mode"?, "precision"?, "wait"?}. 202 while loading, 200 when ready."""
        try:
            body = await self._manager_body(request, ("model",))
        except APIError as exc:
            return error_response(exc)
        response = await self._manager_call(
            "load", body["model"], mode=body.get("mode"), precision=body.get("precision"), wait=body.get("wait", False)
        )
        if response.status_code == 200 and json.loads(response.body).get("state") == "loading":
            response.status_code = 202
        return response

    @app.post("/v1/molten/models/unload")
    async def unload_model(self, request: Request):
        """Unload a model: {"model", "wait"?}; running streams finish first (up to the drain timeout)."""
        try:
            body = await self._manager_body(request, ("model",))
        except APIError as exc:
            return error_response(exc)
        return await self._manager_call("unload", body["model"], wait=body.get("wait", True))

    @app.post("/v1/molten/models/swap")
    async def swap_model(self, request: Request):
        """Swap models: {"old", "new", "mode"?, "precision"?}; returns when `new` is ready or failed."""
        try:
            body = await self._manager_body(request, ("old", "new"))
        except APIError as exc:
            return error_response(exc)
        return await self._manager_call("swap", body["old"], body["new"], mode=body.get("mode"), precision=body.get("precision"))

    @app.put("/v1/molten/models/budget")
    async def set_memory_budget(self, request: Request):
        """Set the memory budget: {"memory_budget_mib": 2048}, or null to remove it."""
        try:
            body = await self._read_body(request)
        except APIError as exc:
            return error_response(exc)
        return await self._manager_call("set_memory_budget", body.get("memory_budget_mib"))

    @app.put("/v1/molten/models/aliases/{alias}")
    async def set_alias(self, alias: str, request: Request):
        """Point an alias at models with weights: {"targets": {"model-a": 0.9, "model-b": 0.1}}."""
        try:
            body = await self._read_body(request)
        except APIError as exc:
            return error_response(exc)
        return await self._manager_call("set_alias", alias, body.get("targets"))

    @app.delete("/v1/molten/models/aliases/{alias}")
    async def delete_alias(self, alias: str):
        return await self._manager_call("delete_alias", alias)

    @app.get("/v1/molten/models/{model_id:path}")
    async def model_status(self, model_id: str):
        return await self._manager_call("model_status", model_id)

    async def manager_request(self, method: str, *args, **kwargs):
        """Python API for the playground: call a manager method and return its result as is."""
        return await getattr(self.manager, method).remote(*args, **kwargs)

    # -- compare: one prompt, several models ------------------------------------------

    @app.post("/v1/molten/compare")
    async def compare(self, request: Request):
        """Send one prompt to 2-4 models at once. Body: {"models": [...], plus a chat or completions body}.

        With "stream": true the response is SSE: one event per token {"index", "model", "type": "token",
        "text", "time_ms"} and a final {"type": "done"} per model with its timings; otherwise one JSON
        object with each model's text and timings.
        """
        try:
            body = await self._read_body(request)
        except APIError as exc:
            return error_response(exc)
        if body.get("stream") is True:
            async def sse():
                async for item in compare_streams(self.stream_events, body):
                    yield format_sse(item)
                yield SSE_DONE

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results: list[dict] = []
        async for item in compare_streams(self.stream_events, body):
            if item["type"] == "error" and item.get("index") is None:
                return JSONResponse({"error": item["error"]}, status_code=item["error"].get("status", 400))
            if item["type"] in ("done", "error"):
                results.append(item)
        return JSONResponse({"results": sorted(results, key=lambda item: item["index"])})

    async def compare_events(self, body: dict):
        """Python API for the playground: the compare route's items as dicts."""
        async for item in compare_streams(self.stream_events, body):
            yield item

    # -- Python API for the playground (called through a deployment handle) ------------

    async def stream_events(self, kind: str, body: dict):
        """Yield ("event", TokenEvent) items for a request body, or one ("error", error body) item."""
        arrival_time = time.time()
        try:
            _, prepared, lease = await self.prepare(kind, body, arrival_time)
            first, stream = await self._first_and_rest(prepared, "messages" if kind == "chat" else "prompt", lease)
        except APIError as exc:
            yield ("error", exc.to_dict())
            return
        yield (
            "start",
            {
                "request_id": prepared.request_id,
                "num_prompt_tokens": len(prepared.prompt_token_ids),
                "model": lease.model_id,
            },
        )
        yield ("event", first)
        try:
            async for event in stream:
                yield ("event", event)
        finally:
            await stream.aclose()

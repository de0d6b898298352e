"""The HTTP ingress: OpenAI-compatible routes on Ray Serve, plus Molten's own under /v1/molten.

The ingress validates and tokenizes (it loads only the tokenizer, no weights), so a
client mistake gets a 400 before any worker is involved. Every error leaves
as an OpenAI-style body; nothing a client sends produces a 500.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request`
# annotation on the class-based routes that Serve wraps.
import asyncio
import json
import logging
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
    model_not_found_error,
    new_completion_id,
    overloaded_error,
    parse_json_body,
    payload_too_large_error,
    unix_time,
)
from molten.tokenization.chat import ChatFormatError, render_chat, validate_messages

from molten.deployments.router import PreparedRequest, RequestRouter

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


@serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class MoltenIngress:
    def __init__(
        self,
        model_id: str,
        model_spec: str,
        max_body_bytes: int,
        default_max_tokens: int | None,
        prefill: DeploymentHandle | None = None,
        decode: DeploymentHandle | None = None,
        colocated: DeploymentHandle | None = None,
    ):
        from molten.models import load_tokenizer

        self.model_id = model_id
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.router = RequestRouter(prefill=prefill, decode=decode, colocated=colocated)
        self.tokenizer = load_tokenizer(model_spec)
        self._worker_info: dict | None = None
        logger.info("ingress ready for model %s in %s mode", model_id, self.router.mode)

    async def worker_info(self) -> dict:
        if self._worker_info is None:
            self._worker_info = await self.router.workers[0].info.remote()
        return self._worker_info

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # -- request preparation ----------------------------------------------------------

    async def _read_body(self, request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise payload_too_large_error(int(length), self.max_body_bytes)
        raw = await request.body()
        return parse_json_body(raw, self.max_body_bytes)

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise model_not_found_error(model, [self.model_id])

    async def prepare(self, kind: str, body: Any) -> tuple[ChatCompletionRequest | CompletionRequest, PreparedRequest]:
        """Validate a body, tokenize its prompt and build the engine request. Raises APIError."""
        if kind == "chat":
            parsed = ChatCompletionRequest.from_body(body)
            self._check_model(parsed.model)
            try:
                messages = validate_messages(parsed.message_dicts())
                prompt_token_ids = render_chat(self.tokenizer, messages)
            except ChatFormatError as exc:
                raise RequestValidationError(str(exc), param=exc.field) from None
        elif kind == "completions":
            parsed = CompletionRequest.from_body(body)
            self._check_model(parsed.model)
            if isinstance(parsed.prompt, str):
                prompt_token_ids = self.tokenizer.encode(parsed.prompt, add_special_tokens=False)
            else:
                prompt_token_ids = list(parsed.prompt)
                vocab_size = len(self.tokenizer)
                bad = [t for t in prompt_token_ids if not 0 <= t < vocab_size]
                if bad:
                    raise RequestValidationError(
                        f"prompt contains token id {bad[0]}, outside the vocabulary of {vocab_size} tokens",
                        param="prompt",
                    )
        else:
            raise ValueError(f"unknown endpoint kind {kind!r}")

        info = await self.worker_info()
        params = parsed.to_sampling_params(
            max_model_len=info["max_model_len"],
            num_prompt_tokens=len(prompt_token_ids),
            default_max_tokens=self.default_max_tokens,
        )
        prepared = PreparedRequest(
            request_id=f"{kind}-{uuid.uuid4().hex[:16]}",
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            priority=parsed.priority,
        )
        return parsed, prepared

    # -- responses --------------------------------------------------------------------

    async def _first_and_rest(self, prepared: PreparedRequest, prompt_param: str):
        """Start the stream and wait for its first event, so admission errors become proper HTTP errors."""
        stream = self.router.stream(prepared)
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
        try:
            body = await self._read_body(request)
            parsed, prepared = await self.prepare(kind, body)
            prompt_param = "messages" if kind == "chat" else "prompt"
            first, stream = await self._first_and_rest(prepared, prompt_param)
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
                model=self.model_id,
                num_prompt_tokens=len(prepared.prompt_token_ids),
                n=n,
                logprobs=logprobs,
                include_usage=parsed.include_usage,
                decode_token=self.decode_token,
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
        builder = build_chat_completion if kind == "chat" else build_completion
        body = builder(
            completion_id=completion_id,
            created=created,
            model=self.model_id,
            events=events,
            n=n,
            num_prompt_tokens=len(prepared.prompt_token_ids),
            logprobs=logprobs,
            decode_token=self.decode_token,
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
        return JSONResponse(build_model_list([self.model_id]))

    @app.get("/health")
    async def health(self):
        info = await self.worker_info()
        return {"status": "ok", "model": self.model_id, "mode": self.router.mode, "max_model_len": info["max_model_len"]}

    @app.get("/v1/molten/info")
    async def info(self):
        infos = await asyncio.gather(*(w.info.remote() for w in self.router.workers))
        return {"model": self.model_id, "mode": self.router.mode, "workers": infos}

    @app.get("/v1/molten/kv")
    async def kv_state(self):
        states = await asyncio.gather(*(w.kv_state.remote() for w in self.router.workers))
        return {"model": self.model_id, "mode": self.router.mode, "workers": states}

    # -- Python API for the playground (called through a deployment handle) ------------

    async def stream_events(self, kind: str, body: dict):
        """Yield ("event", TokenEvent) items for a request body, or one ("error", error body) item."""
        try:
            _, prepared = await self.prepare(kind, body)
            first, stream = await self._first_and_rest(prepared, "messages" if kind == "chat" else "prompt")
        except APIError as exc:
            yield ("error", exc.to_dict())
            return
        yield ("start", {"request_id": prepared.request_id, "num_prompt_tokens": len(prepared.prompt_token_ids)})
        yield ("event", first)
        try:
            async for event in stream:
                yield ("event", event)
        finally:
            await stream.aclose()

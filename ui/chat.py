"""One chat turn of the playground: build the OpenAI body, stream TokenEvents from the ingress, track figures.

`chat_turn` is a plain async generator over a Serve deployment handle, so it can be
driven by Gradio or by a test without a browser.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from molten.engine.events import TokenEvent
from molten.protocol.request_models import DEFAULT_CHAT_MAX_TOKENS

from molten.ui.stats import ReplyStats

logger = logging.getLogger(__name__)

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
"""Terminal color codes, which Ray puts in its error messages."""

DEFAULT_ITEM_TIMEOUT_S = 300.0
"""Maximum wait for the next streamed item before the turn fails with a timeout error.
The first item includes queueing and prefill, so this is generous."""


@dataclass
class ChatParams:
    """Decoding controls of the playground, named as in the OpenAI request body."""

    max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    """The API's default for chat, as the playground's slider starts there."""
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    """0 disables the top-k filter."""
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    system_prompt: str = ""
    """Sent as a leading system message when not blank."""


def parse_stop_strings(text: str) -> list[str]:
    """Parse one stop string per line, where `\\n` and `\\t` stand for a newline and a tab and `\\\\` for a backslash.

    Blank lines are skipped, but spaces inside a line are kept because they are part of the stop string.
    """
    stops = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        stops.append(_unescape(line))
    return stops


def _unescape(line: str) -> str:
    escapes = {"n": "\n", "t": "\t", "\\": "\\"}
    output = []
    index = 0
    while index < len(line):
        char = line[index]
        if char == "\\" and index + 1 < len(line) and line[index + 1] in escapes:
            output.append(escapes[line[index + 1]])
            index += 2
            continue
        output.append(char)
        index += 1
    return "".join(output)


def message_text(content: Any) -> str:
    """Return the text of a chat message's content: a string, or Gradio's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, Sequence):
        return "\n".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def history_to_messages(history: Sequence[dict]) -> list[dict[str, str]]:
    """Convert Gradio chat history into OpenAI messages, dropping the playground's own notes.

    A message with a `metadata` title (how the playground marks error notes) is not part
    of the conversation and is skipped.
    """
    messages = []
    for message in history:
        metadata = message.get("metadata") or {}
        if metadata.get("title"):
            continue
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            continue
        messages.append({"role": role, "content": message_text(message.get("content"))})
    return messages


def build_chat_body(model: str, message: str, history: Sequence[dict], params: ChatParams) -> dict[str, Any]:
    """Build the OpenAI chat completion body for one turn: earlier history, then the new user message."""
    messages: list[dict[str, str]] = []
    if params.system_prompt.strip():
        messages.append({"role": "system", "content": params.system_prompt})
    messages += history_to_messages(history)
    messages.append({"role": "user", "content": message})
    return {
        "model": model,
        "messages": messages,
        "stream": True,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "seed": params.seed,
        "stop": list(params.stop) or None,
    }


@dataclass
class TurnUpdate:
    """State of a chat turn after one streamed item."""

    text: str
    """Reply text so far."""
    stats: ReplyStats
    error: dict | None = None
    """The OpenAI-style error object ({"message", "type", "param", "code"}) when the turn failed."""
    request_id: str | None = None
    done: bool = False


def error_object(message: str, error_type: str = "server_error", param: str | None = None) -> dict:
    return {"message": message, "type": error_type, "param": param, "code": None}


def summarize_exception(exc: BaseException) -> str:
    """Return the exception's type and the first line of its message (Ray errors append whole tracebacks).

    A Ray task error is replaced by the exception raised in the remote task (its `cause`),
    because its own first line only names the actor.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        exc = cause
    lines = ANSI_ESCAPE.sub("", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


async def chat_turn(
    handle,
    message: str,
    history: Sequence[dict],
    params: ChatParams,
    *,
    model: str,
    item_timeout_s: float = DEFAULT_ITEM_TIMEOUT_S,
) -> AsyncIterator[TurnUpdate]:
    """Stream one reply from the ingress's `stream_events` and yield a TurnUpdate per item.

    `handle` is the ingress's Serve deployment handle. The last update has `done=True`.
    It carries `error` when the server rejected the request (its ("error", body) item),
    when the stream failed, or when no item arrived within `item_timeout_s`. Exceptions
    (but not cancellation) are logged and returned as errors instead of raised, so a
    server failure reaches the UI as a message. If the consumer stops early (Gradio's Stop button cancels the task),
    the Serve request is cancelled too, which aborts the generation on the workers.
    """
    body = build_chat_body(model, message, history, params)
    stats = ReplyStats()
    text = ""
    request_id = None
    try:
        stream = handle.options(stream=True).stream_events.remote("chat", body)
    except Exception as exc:
        logger.exception("could not start a chat request on the ingress handle")
        yield TurnUpdate(text, stats, error_object(f"could not reach the Molten ingress: {summarize_exception(exc)}"), done=True)
        return

    finished = False
    try:
        while True:
            try:
                item = await asyncio.wait_for(stream.__anext__(), timeout=item_timeout_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                logger.error("request %s: no streamed item within %.0f s", request_id, item_timeout_s)
                error = error_object(f"timed out: no token within {item_timeout_s:.0f} s", "timeout")
                yield TurnUpdate(text, stats, error, request_id, done=True)
                return
            kind, payload = item
            if kind == "error":
                finished = True
                error = payload.get("error", payload) if isinstance(payload, dict) else error_object(str(payload))
                yield TurnUpdate(text, stats, error, request_id, done=True)
                return
            if kind == "start":
                request_id = payload.get("request_id")
                if stats.num_prompt_tokens is None:
                    stats.num_prompt_tokens = payload.get("num_prompt_tokens")
                continue
            event: TokenEvent = payload
            stats.add_event(event)
            text += event.text
            yield TurnUpdate(text, stats, None, request_id)
        finished = True
    except Exception as exc:
        finished = True
        logger.exception("request %s failed while streaming", request_id)
        yield TurnUpdate(text, stats, error_object(f"the server failed while streaming: {summarize_exception(exc)}"), request_id, done=True)
        return
    finally:
        if not finished:
            stream.cancel()
    yield TurnUpdate(text, stats, None, request_id, done=True)

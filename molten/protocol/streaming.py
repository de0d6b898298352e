"""Server-sent event chunks for streamed chat and completion responses.

One TokenEvent becomes exactly one chunk, so the client's time to first event is the
engine's time to first token, and each chunk's top-level `molten` object carries that
token's timings. The chat role (`"role": "assistant"`) rides on a sequence's first
chunk instead of a chunk of its own sent before any token. `finish_reason` rides on a
sequence's last chunk, and under speculative decoding so does the sequence's
`molten.spec_stats` (its acceptance statistics). With `stream_options.include_usage`,
one more chunk with empty `choices` carries the usage and the request summary, and
every other chunk has `"usage": null`, as OpenAI's API does.

Typical use::

    encoder = ChatChunkEncoder(completion_id=..., created=..., model=..., num_prompt_tokens=...)
    for event in events:
        yield format_sse(encoder.encode(event))
    if (usage_chunk := encoder.build_usage_chunk()) is not None:
        yield format_sse(usage_chunk)
    yield SSE_DONE

An error after the stream started can be sent as `format_sse(api_error.to_dict())`
before SSE_DONE, since the HTTP status is already sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from molten.engine.events import TokenEvent
from molten.protocol.responses import (
    TokenTextDecoder,
    build_chat_logprob_entry,
    build_completion_logprobs,
    build_request_summary,
    build_token_timing,
    build_usage,
)

SSE_DONE = "data: [DONE]\n\n"
"""The event that ends every OpenAI stream."""


def format_sse(payload: Mapping[str, Any]) -> str:
    """Write one server-sent event: `data: <compact JSON>` and a blank line.

    Raises ValueError for NaN or infinite numbers, which JSON cannot encode.
    """
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n\n"


class _ChunkEncoder:
    """Chunk building shared by both endpoints. Keeps the events of one request to report usage."""

    object_type: ClassVar[str]

    def __init__(
        self,
        *,
        completion_id: str,
        created: int,
        model: str,
        num_prompt_tokens: int,
        n: int = 1,
        logprobs: bool = False,
        include_usage: bool = False,
        decode_token: TokenTextDecoder | None = None,
    ):
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.num_prompt_tokens = num_prompt_tokens
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.decode_token = decode_token
        self._events_by_sequence: list[list[TokenEvent]] = [[] for _ in range(n)]
        self._text_length_by_sequence = [0] * n

    def encode(self, event: TokenEvent) -> dict[str, Any]:
        """Build the chunk for one event. Events of one sequence must arrive in order."""
        if not 0 <= event.seq_index < len(self._events_by_sequence):
            raise ValueError(
                f"event of request {event.request_id} has seq_index {event.seq_index}, "
                f"expected 0..{len(self._events_by_sequence) - 1}"
            )
        previous_events = self._events_by_sequence[event.seq_index]
        choice = self._build_choice(
            event, is_first=not previous_events, text_offset=self._text_length_by_sequence[event.seq_index]
        )
        previous_events.append(event)
        self._text_length_by_sequence[event.seq_index] += len(event.text)

        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": self.object_type,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            chunk["usage"] = None
        chunk["molten"] = build_token_timing(event)
        return chunk

    def build_usage_chunk(self) -> dict[str, Any] | None:
        """Build the final usage chunk, or return None when the request did not ask for usage.

        Its `molten` object is the request summary (see build_request_summary) without
        the per-token records, which the earlier chunks already carried.
        """
        if not self.include_usage:
            return None
        summary = build_request_summary(self._events_by_sequence, self.num_prompt_tokens)
        del summary["tokens"]
        num_completion_tokens = sum(len(events) for events in self._events_by_sequence)
        return {
            "id": self.completion_id,
            "object": self.object_type,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": build_usage(self.num_prompt_tokens, num_completion_tokens, summary["num_cached_prompt_tokens"]),
            "molten": summary,
        }

    def _build_choice(self, event: TokenEvent, *, is_first: bool, text_offset: int) -> dict[str, Any]:
        """Build the chunk's one choice. `text_offset` is the length of the sequence's text so far."""
        raise NotImplementedError


class ChatChunkEncoder(_ChunkEncoder):
    """Builds `chat.completion.chunk` objects from one request's TokenEvents."""

    object_type: ClassVar[str] = "chat.completion.chunk"

    def _build_choice(self, event: TokenEvent, *, is_first: bool, text_offset: int) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": event.text}
        if is_first:
            delta = {"role": "assistant", **delta}
        choice_logprobs = None
        if self.logprobs:
            choice_logprobs = {"content": [build_chat_logprob_entry(event, self.decode_token)]}
        return {
            "index": event.seq_index,
            "delta": delta,
            "logprobs": choice_logprobs,
            "finish_reason": event.finish_reason,
        }


class CompletionChunkEncoder(_ChunkEncoder):
    """Builds streamed `text_completion` objects from one request's TokenEvents."""

    object_type: ClassVar[str] = "text_completion"

    def _build_choice(self, event: TokenEvent, *, is_first: bool, text_offset: int) -> dict[str, Any]:
        choice_logprobs = None
        if self.logprobs:
            choice_logprobs = build_completion_logprobs([event], self.decode_token, text_offset)
        return {
            "index": event.seq_index,
            "text": event.text,
            "logprobs": choice_logprobs,
            "finish_reason": event.finish_reason,
        }

"""Non-streaming response bodies in OpenAI's shapes, built from the engine's TokenEvents.

Each body also carries a top-level `molten` object with the request's timings. OpenAI
clients ignore unknown fields (the official Python client keeps them as extra
attributes), so the bodies stay compatible.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from molten.engine.events import TokenEvent
from molten.engine.spec_decode.stats import SpecDecodeStats

TokenTextDecoder = Callable[[int], str]
"""Returns the text of one token id, as the tokenizer writes it (for logprobs output)."""

UNLIKELY_LOGPROB = -9999.0
"""OpenAI's logprob for a token outside the top alternatives. Used in place of -inf and
NaN, which JSON cannot encode."""


def new_completion_id(prefix: str) -> str:
    """Return a unique response id such as `chatcmpl-<32 hex digits>` (prefix `chatcmpl` or `cmpl`)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def unix_time() -> int:
    """Return the `created` timestamp: whole seconds since the Unix epoch."""
    return int(time.time())


def finite_logprob(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else UNLIKELY_LOGPROB


def token_text(event: TokenEvent, decode_token: TokenTextDecoder | None) -> str:
    """Return the text of the event's own token, for logprobs.

    `event.text` is the visible text delta, which may be empty (half of a UTF-8
    character) or include held-back text, so it is only the last resort after
    `decode_token` and the event's own entry among its top alternatives.
    """
    if decode_token is not None:
        return decode_token(event.token_id)
    for token_id, text, _ in event.top_logprobs or ():
        if token_id == event.token_id:
            return text
    return event.text


def _required_logprob(event: TokenEvent) -> float:
    if event.logprob is None:
        raise ValueError(
            f"request {event.request_id} asked for logprobs but token {event.index} of sequence "
            f"{event.seq_index} has none; the engine must set TokenEvent.logprob"
        )
    return finite_logprob(event.logprob)


def build_chat_logprob_entry(event: TokenEvent, decode_token: TokenTextDecoder | None = None) -> dict[str, Any]:
    """Build one item of a chat choice's `logprobs.content`: token, logprob, bytes, top_logprobs."""
    text = token_text(event, decode_token)
    return {
        "token": text,
        "logprob": _required_logprob(event),
        # NOTE: a token that is part of a multi-byte character decodes to U+FFFD, so
        # these bytes are the replacement character's, not the token's raw bytes.
        "bytes": list(text.encode("utf-8")),
        "top_logprobs": [
            {"token": alt_text, "logprob": finite_logprob(alt_logprob), "bytes": list(alt_text.encode("utf-8"))}
            for _, alt_text, alt_logprob in event.top_logprobs or ()
        ],
    }


def build_completion_logprobs(
    events: Sequence[TokenEvent],
    decode_token: TokenTextDecoder | None = None,
    text_offset: int = 0,
) -> dict[str, Any]:
    """Build a completion choice's `logprobs`: tokens, token_logprobs, top_logprobs, text_offset.

    Each `top_logprobs` dict maps token text to logprob for the alternatives plus the
    sampled token, as OpenAI's legacy API does, so `logprobs: 0` still reports the
    sampled token's. Alternatives with the same text collapse into one key.
    `text_offset` is the position of the first event's text in the generated text
    (the prompt is not echoed, so a whole response starts at 0).
    """
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for event in events:
        text = token_text(event, decode_token)
        logprob = _required_logprob(event)
        alternatives = {alt_text: finite_logprob(alt_logprob) for _, alt_text, alt_logprob in event.top_logprobs or ()}
        alternatives.setdefault(text, logprob)

        tokens.append(text)
        token_logprobs.append(logprob)
        top_logprobs.append(alternatives)
        offsets.append(text_offset)
        text_offset += len(event.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def build_usage(
    num_prompt_tokens: int, num_completion_tokens: int, num_cached_prompt_tokens: int | None = None
) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }
    if num_cached_prompt_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": num_cached_prompt_tokens}
    return usage


def build_token_timing(event: TokenEvent) -> dict[str, Any]:
    """Build the `molten` timings of one token: what it cost and which engine step produced it.

    The first token of a sequence also carries the prompt token counts, and the first
    token a decode worker streams after a KV handoff carries the handoff's cost. The
    last token of a sequence that verified drafts carries its acceptance statistics
    (`spec_stats`, see SpecDecodeStats.to_dict).
    """
    timing: dict[str, Any] = {
        "choice": event.seq_index,
        "index": event.index,
        "token_id": event.token_id,
        "time_since_arrival_ms": round(event.time_since_arrival_ms, 3),
        "step_id": event.step_id,
        "batch_size": event.batch_size,
        "origin": event.origin,
    }
    if event.index == 0:
        timing["num_prompt_tokens"] = event.num_prompt_tokens
        timing["num_cached_prompt_tokens"] = event.num_cached_prompt_tokens
    if event.handoff is not None:
        timing["handoff"] = event.handoff.to_dict()
    if event.spec_stats is not None:
        timing["spec_stats"] = event.spec_stats.to_dict()
    return timing


def merge_spec_stats(events: Iterable[TokenEvent]) -> SpecDecodeStats | None:
    """Add up the acceptance statistics of a request's sequences, or return None without speculation.

    Each sequence's statistics ride on its last event, so every event is checked.
    """
    merged: SpecDecodeStats | None = None
    for event in events:
        if event.spec_stats is None:
            continue
        if merged is None:
            merged = SpecDecodeStats(event.spec_stats.num_speculative_tokens)
        merged.merge(event.spec_stats)
    return merged


def group_by_sequence(events: Iterable[TokenEvent], n: int) -> list[list[TokenEvent]]:
    """Split a request's events into its `n` sequences, each ordered by token index.

    Raises ValueError when a sequence has no events or its last event has no
    finish_reason, because a finished response needs every sequence complete.
    """
    sequences: list[list[TokenEvent]] = [[] for _ in range(n)]
    for event in events:
        if not 0 <= event.seq_index < n:
            raise ValueError(
                f"event of request {event.request_id} has seq_index {event.seq_index}, expected 0..{n - 1}"
            )
        sequences[event.seq_index].append(event)
    for seq_index, sequence in enumerate(sequences):
        sequence.sort(key=lambda event: event.index)
        if not sequence or sequence[-1].finish_reason is None:
            raise ValueError(
                f"sequence {seq_index} of the request is not finished: its last event has no finish_reason"
            )
    return sequences


def build_request_summary(
    sequences: Sequence[Sequence[TokenEvent]],
    num_prompt_tokens: int,
    num_cached_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """Build the response's `molten` object: the request's timings and per-token records.

    ttft_ms is the time of the first token of any sequence, and total_ms of the last.
    tokens_per_s divides all generated tokens by total_ms. mean_itl_ms averages the gaps
    between consecutive tokens of the same sequence, and is null without such a gap.
    handoff is the first KV handoff found, searching choice 0 first. spec_stats adds up
    the acceptance statistics of all sequences under speculative decoding, and is null
    when no sequence verified drafts.
    """
    all_events = [event for sequence in sequences for event in sequence]
    ttft_ms = min((sequence[0].time_since_arrival_ms for sequence in sequences if sequence), default=None)
    total_ms = max((event.time_since_arrival_ms for event in all_events), default=None)
    gaps_ms = [
        later.time_since_arrival_ms - earlier.time_since_arrival_ms
        for sequence in sequences
        for earlier, later in itertools.pairwise(sequence)
    ]
    if num_cached_prompt_tokens is None:
        num_cached_prompt_tokens = max((event.num_cached_prompt_tokens for event in all_events), default=0)
    handoff = next((event.handoff.to_dict() for event in all_events if event.handoff is not None), None)
    spec_stats = merge_spec_stats(all_events)

    return {
        "ttft_ms": _round_or_none(ttft_ms),
        "total_ms": _round_or_none(total_ms),
        "tokens_per_s": _round_or_none(len(all_events) / (total_ms / 1000.0) if total_ms else None),
        "mean_itl_ms": _round_or_none(sum(gaps_ms) / len(gaps_ms) if gaps_ms else None),
        "num_prompt_tokens": num_prompt_tokens,
        "num_cached_prompt_tokens": num_cached_prompt_tokens,
        "handoff": handoff,
        "spec_stats": spec_stats.to_dict() if spec_stats is not None else None,
        "tokens": [build_token_timing(event) for event in all_events],
    }


def _round_or_none(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _build_body(
    object_type: str,
    completion_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    summary: dict[str, Any],
) -> dict[str, Any]:
    num_completion_tokens = len(summary["tokens"])
    return {
        "id": completion_id,
        "object": object_type,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": build_usage(summary["num_prompt_tokens"], num_completion_tokens, summary["num_cached_prompt_tokens"]),
        "molten": summary,
    }


def build_chat_completion(
    *,
    completion_id: str,
    created: int,
    model: str,
    events: Iterable[TokenEvent],
    n: int,
    num_prompt_tokens: int,
    logprobs: bool = False,
    decode_token: TokenTextDecoder | None = None,
    num_cached_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """Build a `chat.completion` body from all events of a finished request."""
    sequences = group_by_sequence(events, n)
    choices = []
    for index, sequence in enumerate(sequences):
        choice_logprobs = None
        if logprobs:
            choice_logprobs = {"content": [build_chat_logprob_entry(event, decode_token) for event in sequence]}
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": "".join(event.text for event in sequence)},
                "logprobs": choice_logprobs,
                "finish_reason": sequence[-1].finish_reason,
            }
        )
    summary = build_request_summary(sequences, num_prompt_tokens, num_cached_prompt_tokens)
    return _build_body("chat.completion", completion_id, created, model, choices, summary)


def build_completion(
    *,
    completion_id: str,
    created: int,
    model: str,
    events: Iterable[TokenEvent],
    n: int,
    num_prompt_tokens: int,
    logprobs: bool = False,
    decode_token: TokenTextDecoder | None = None,
    num_cached_prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """Build a `text_completion` body from all events of a finished request."""
    sequences = group_by_sequence(events, n)
    choices = []
    for index, sequence in enumerate(sequences):
        choices.append(
            {
                "index": index,
                "text": "".join(event.text for event in sequence),
                "logprobs": build_completion_logprobs(sequence, decode_token) if logprobs else None,
                "finish_reason": sequence[-1].finish_reason,
            }
        )
    summary = build_request_summary(sequences, num_prompt_tokens, num_cached_prompt_tokens)
    return _build_body("text_completion", completion_id, created, model, choices, summary)


def build_model_list(model_ids: Iterable[str], created: int | None = None) -> dict[str, Any]:
    """Build the `GET /v1/models` body. `created` defaults to now."""
    created = unix_time() if created is None else created
    return {
        "object": "list",
        "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "molten"} for model_id in model_ids
        ],
    }

"""Acceptance statistics of speculative decoding in response bodies and stream chunks.

Each sequence's `SpecDecodeStats` rides on its last TokenEvent; the protocol puts it in
that token's `molten` record and adds up all sequences in the request summary.
The bodies must still validate as the openai client's own types.
"""

from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from molten.engine.events import TokenEvent
from molten.engine.spec_decode.stats import SpecDecodeStats
from molten.protocol.openai import (
    ChatChunkEncoder,
    CompletionChunkEncoder,
    build_chat_completion,
    build_completion,
)

MODEL = "smollm2-135m"
CREATED = 1_700_000_000


def spec_stats(accepted_lengths: list[int], k: int = 3) -> SpecDecodeStats:
    """Statistics of verifications that each carried k drafts and accepted the given counts."""
    stats = SpecDecodeStats(k)
    for accepted in accepted_lengths:
        stats.record(k, accepted, accepted + 1)
    return stats


def sequence_events(origins: list[str], *, seq_index: int = 0, stats: SpecDecodeStats | None = None):
    """One finished sequence with the given token origins; `stats` rides on its last event."""
    events = []
    for index, origin in enumerate(origins):
        is_last = index == len(origins) - 1
        events.append(
            TokenEvent(
                request_id="req-spec", seq_index=seq_index, token_id=10 + index, text=f"t{index}", logprob=None,
                top_logprobs=None, time_since_arrival_ms=40.0 + 5.0 * index, step_id=3 + index, batch_size=1,
                origin=origin, index=index, finish_reason="length" if is_last else None, num_prompt_tokens=9,
                spec_stats=stats if is_last else None,
            )
        )
    return events


ORIGINS = ["prefill", "draft-accepted", "draft-accepted", "recovered", "draft-accepted", "bonus"]


def test_last_token_record_carries_spec_stats():
    stats = spec_stats([2, 3])
    body = build_chat_completion(
        completion_id="chatcmpl-s", created=CREATED, model=MODEL,
        events=sequence_events(ORIGINS, stats=stats), n=1, num_prompt_tokens=9,
    )
    summary = ChatCompletion.model_validate(body).model_extra["molten"]
    records = summary["tokens"]
    assert [record["origin"] for record in records] == ORIGINS
    assert all("spec_stats" not in record for record in records[:-1])
    assert records[-1]["spec_stats"] == stats.to_dict()
    assert records[-1]["spec_stats"]["accepted_length_histogram"] == [0, 0, 1, 1]
    assert summary["spec_stats"]["acceptance_rate"] == round(5 / 6, 4)


def test_summary_adds_up_sequences():
    first, second = spec_stats([3, 0]), spec_stats([1])
    events = sequence_events(ORIGINS, stats=first) + sequence_events(["prefill", "recovered"], seq_index=1, stats=second)
    body = build_completion(
        completion_id="cmpl-s", created=CREATED, model=MODEL, events=events, n=2, num_prompt_tokens=9
    )
    summary = Completion.model_validate(body).model_extra["molten"]
    merged = summary["spec_stats"]
    assert merged["num_verifications"] == 3
    assert merged["num_draft_tokens"] == 9
    assert merged["num_accepted_tokens"] == 4
    assert merged["num_emitted_tokens"] == 7
    assert merged["accepted_length_histogram"] == [1, 1, 0, 1]
    assert merged["mean_accepted_length"] == round(4 / 3, 4)


def test_summary_without_speculation_has_null_spec_stats():
    body = build_chat_completion(
        completion_id="chatcmpl-s", created=CREATED, model=MODEL,
        events=sequence_events(["prefill", "decode"]), n=1, num_prompt_tokens=9,
    )
    summary = ChatCompletion.model_validate(body).model_extra["molten"]
    assert summary["spec_stats"] is None
    assert all("spec_stats" not in record for record in summary["tokens"])


def test_stream_last_chunk_carries_spec_stats():
    stats = spec_stats([1, 2, 3])
    encoder = ChatChunkEncoder(
        completion_id="chatcmpl-s", created=CREATED, model=MODEL, num_prompt_tokens=9, include_usage=True
    )
    chunks = [ChatCompletionChunk.model_validate(encoder.encode(event)) for event in sequence_events(ORIGINS, stats=stats)]
    usage_chunk = ChatCompletionChunk.model_validate(encoder.build_usage_chunk())
    assert [chunk.model_extra["molten"]["origin"] for chunk in chunks] == ORIGINS
    assert "spec_stats" not in chunks[0].model_extra["molten"]
    assert chunks[-1].model_extra["molten"]["spec_stats"] == stats.to_dict()
    assert chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.model_extra["molten"]["spec_stats"] == stats.to_dict()


def test_completion_stream_chunks_validate_with_spec_stats():
    stats = spec_stats([0])
    encoder = CompletionChunkEncoder(completion_id="cmpl-s", created=CREATED, model=MODEL, num_prompt_tokens=9, n=2)
    events = sequence_events(["prefill", "recovered"], stats=stats) + sequence_events(["prefill"], seq_index=1)
    chunks = [encoder.encode(event) for event in events]
    # The openai Completion type only accepts a finished choice, so only last chunks validate.
    last_of_first, last_of_second = Completion.model_validate(chunks[1]), Completion.model_validate(chunks[2])
    assert last_of_first.model_extra["molten"]["spec_stats"]["accepted_length_histogram"] == [1, 0, 0, 0]
    assert "spec_stats" not in chunks[0]["molten"]
    assert last_of_second.choices[0].index == 1
    assert "spec_stats" not in last_of_second.model_extra["molten"]

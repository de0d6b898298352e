"""Response bodies and stream chunks, checked against the official openai client's own types and parser."""

import json
import math

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from molten.engine.events import HandoffStats, TokenEvent
from molten.protocol.openai import (
    SSE_DONE,
    ChatChunkEncoder,
    ChatCompletionRequest,
    CompletionChunkEncoder,
    CompletionRequest,
    RequestValidationError,
    build_chat_completion,
    build_completion,
    build_model_list,
    format_sse,
    parse_json_body,
)

MODEL = "smollm2-135m"
CREATED = 1_700_000_000
VOCAB = {1: "Hel", 2: "lo", 3: " world", 4: "!", 5: "Hi", 6: " there"}


def make_events(texts, *, seq_index=0, finish_reason="stop", start_ms=50.0, logprobs=True, top=2, handoff=None):
    """Build one sequence's TokenEvents: token ids from VOCAB, 10 ms apart, alternatives from VOCAB."""
    ids = {text: token_id for token_id, text in VOCAB.items()}
    events = []
    for index, text in enumerate(texts):
        token_id = ids[text]
        alternatives = [(token_id, text, -0.1), (6 if token_id != 6 else 5, VOCAB[6 if token_id != 6 else 5], -2.5)][
            :top
        ]
        events.append(
            TokenEvent(
                request_id="req-1",
                seq_index=seq_index,
                token_id=token_id,
                text=text,
                logprob=-0.1 if logprobs else None,
                top_logprobs=alternatives if logprobs else None,
                time_since_arrival_ms=start_ms + 10.0 * index,
                step_id=7 + index,
                batch_size=3,
                origin="prefill" if index == 0 else "decode",
                index=index,
                finish_reason=finish_reason if index == len(texts) - 1 else None,
                num_prompt_tokens=12,
                num_cached_prompt_tokens=8,
                handoff=handoff if index == 1 else None,
            )
        )
    return events


HANDOFF = HandoffStats(num_bytes=4096, num_blocks=2, export_ms=0.5, transfer_ms=1.25, import_ms=0.25)


def decode_token(token_id):
    return VOCAB[token_id]


# --- non-streaming chat --------------------------------------------------------------------


def test_chat_completion_validates_as_openai_type():
    events = make_events(["Hel", "lo", " world", "!"], handoff=HANDOFF)
    body = build_chat_completion(
        completion_id="chatcmpl-1", created=CREATED, model=MODEL, events=events, n=1, num_prompt_tokens=12
    )
    completion = ChatCompletion.model_validate(body)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "Hello world!"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].logprobs is None
    assert completion.usage.prompt_tokens == 12
    assert completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == 16
    assert completion.usage.prompt_tokens_details.cached_tokens == 8


def test_chat_completion_molten_summary():
    events = make_events(["Hel", "lo", " world", "!"], handoff=HANDOFF)
    body = build_chat_completion(
        completion_id="chatcmpl-1", created=CREATED, model=MODEL, events=events, n=1, num_prompt_tokens=12
    )
    summary = ChatCompletion.model_validate(body).model_extra["molten"]
    assert summary["ttft_ms"] == 50.0
    assert summary["total_ms"] == 80.0
    assert summary["mean_itl_ms"] == 10.0
    assert summary["tokens_per_s"] == 50.0
    assert summary["num_prompt_tokens"] == 12
    assert summary["num_cached_prompt_tokens"] == 8
    assert summary["handoff"] == HANDOFF.to_dict()
    assert [token["token_id"] for token in summary["tokens"]] == [1, 2, 3, 4]
    assert summary["tokens"][0] == {
        "choice": 0,
        "index": 0,
        "token_id": 1,
        "time_since_arrival_ms": 50.0,
        "step_id": 7,
        "batch_size": 3,
        "origin": "prefill",
        "num_prompt_tokens": 12,
        "num_cached_prompt_tokens": 8,
    }
    assert summary["tokens"][1]["handoff"]["bytes"] == 4096


def test_chat_completion_logprobs_shape():
    events = make_events(["Hel", "lo"])
    body = build_chat_completion(
        completion_id="chatcmpl-1",
        created=CREATED,
        model=MODEL,
        events=events,
        n=1,
        num_prompt_tokens=12,
        logprobs=True,
        decode_token=decode_token,
    )
    content = ChatCompletion.model_validate(body).choices[0].logprobs.content
    assert [entry.token for entry in content] == ["Hel", "lo"]
    assert content[0].logprob == -0.1
    assert content[0].bytes == list(b"Hel")
    assert [alt.token for alt in content[0].top_logprobs] == ["Hel", " there"]
    assert content[0].top_logprobs[1].logprob == -2.5
    assert content[0].top_logprobs[1].bytes == list(b" there")


def test_chat_completion_with_n_orders_choices():
    events = make_events(["Hi", " there"], seq_index=1, finish_reason="length") + make_events(
        ["Hel", "lo"], seq_index=0
    )
    body = build_chat_completion(
        completion_id="chatcmpl-1", created=CREATED, model=MODEL, events=events, n=2, num_prompt_tokens=12
    )
    completion = ChatCompletion.model_validate(body)
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert completion.choices[0].message.content == "Hello"
    assert completion.choices[1].message.content == "Hi there"
    assert completion.choices[1].finish_reason == "length"
    assert completion.usage.completion_tokens == 4


def test_unfinished_sequence_rejected_by_builder():
    events = make_events(["Hel", "lo"], finish_reason=None)
    with pytest.raises(ValueError, match="not finished"):
        build_chat_completion(completion_id="c", created=CREATED, model=MODEL, events=events, n=1, num_prompt_tokens=1)


def test_missing_sequence_rejected_by_builder():
    with pytest.raises(ValueError, match="sequence 1"):
        build_chat_completion(
            completion_id="c", created=CREATED, model=MODEL, events=make_events(["Hi"]), n=2, num_prompt_tokens=1
        )


def test_missing_logprob_rejected_by_builder():
    events = make_events(["Hi"], logprobs=False)
    with pytest.raises(ValueError, match="TokenEvent.logprob"):
        build_chat_completion(
            completion_id="c", created=CREATED, model=MODEL, events=events, n=1, num_prompt_tokens=1, logprobs=True
        )


def test_infinite_logprob_written_as_unlikely():
    events = make_events(["Hi"])
    events[0].logprob = -math.inf
    events[0].top_logprobs = [(5, "Hi", -math.inf)]
    body = build_chat_completion(
        completion_id="c", created=CREATED, model=MODEL, events=events, n=1, num_prompt_tokens=1, logprobs=True
    )
    entry = body["choices"][0]["logprobs"]["content"][0]
    assert entry["logprob"] == -9999.0
    assert entry["top_logprobs"][0]["logprob"] == -9999.0
    json.dumps(body, allow_nan=False)


def test_token_text_falls_back_to_top_logprobs():
    events = make_events(["Hi"])
    events[0].text = ""  # held back by the detokenizer
    body = build_chat_completion(
        completion_id="c", created=CREATED, model=MODEL, events=events, n=1, num_prompt_tokens=1, logprobs=True
    )
    assert body["choices"][0]["logprobs"]["content"][0]["token"] == "Hi"


# --- non-streaming completions -------------------------------------------------------------


def test_completion_validates_as_openai_type():
    events = make_events(["Hel", "lo", " world"], finish_reason="length")
    body = build_completion(
        completion_id="cmpl-1",
        created=CREATED,
        model=MODEL,
        events=events,
        n=1,
        num_prompt_tokens=12,
        logprobs=True,
        decode_token=decode_token,
    )
    completion = Completion.model_validate(body)
    choice = completion.choices[0]
    assert completion.object == "text_completion"
    assert choice.text == "Hello world"
    assert choice.finish_reason == "length"
    assert choice.logprobs.tokens == ["Hel", "lo", " world"]
    assert choice.logprobs.token_logprobs == [-0.1, -0.1, -0.1]
    assert choice.logprobs.top_logprobs[0] == {"Hel": -0.1, " there": -2.5}
    assert choice.logprobs.text_offset == [0, 3, 5]
    assert completion.usage.completion_tokens == 3
    assert completion.model_extra["molten"]["ttft_ms"] == 50.0


def test_completion_logprobs_zero_still_reports_sampled_token():
    events = make_events(["Hi"], top=0)
    events[0].top_logprobs = []
    body = build_completion(
        completion_id="c",
        created=CREATED,
        model=MODEL,
        events=events,
        n=1,
        num_prompt_tokens=1,
        logprobs=True,
        decode_token=decode_token,
    )
    assert body["choices"][0]["logprobs"]["top_logprobs"] == [{"Hi": -0.1}]


def test_completion_without_logprobs_has_null():
    body = build_completion(
        completion_id="c", created=CREATED, model=MODEL, events=make_events(["Hi"]), n=1, num_prompt_tokens=1
    )
    assert body["choices"][0]["logprobs"] is None
    assert Completion.model_validate(body).choices[0].logprobs is None


def test_model_list_validates_as_openai_type():
    body = build_model_list(["smollm2-135m", "tiny-random-llama"], created=CREATED)
    assert body["object"] == "list"
    models = [Model.model_validate(entry) for entry in body["data"]]
    assert [model.id for model in models] == ["smollm2-135m", "tiny-random-llama"]
    assert all(model.owned_by == "molten" and model.object == "model" for model in models)


# --- streaming -------------------------------------------------------------------------------


def test_format_sse():
    assert format_sse({"a": "é", "b": [1, 2]}) == 'data: {"a":"é","b":[1,2]}\n\n'
    assert SSE_DONE == "data: [DONE]\n\n"


def test_format_sse_rejects_nan():
    with pytest.raises(ValueError):
        format_sse({"x": math.nan})


def test_chat_chunks_validate_as_openai_type():
    encoder = ChatChunkEncoder(
        completion_id="chatcmpl-1",
        created=CREATED,
        model=MODEL,
        num_prompt_tokens=12,
        logprobs=True,
        include_usage=True,
        decode_token=decode_token,
    )
    chunks = [ChatCompletionChunk.model_validate(encoder.encode(event)) for event in make_events(["Hel", "lo", "!"])]
    usage_chunk = ChatCompletionChunk.model_validate(encoder.build_usage_chunk())

    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == "Hel"
    assert chunks[1].choices[0].delta.role is None
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None, None, "stop"]
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[2].choices[0].logprobs.content[0].token == "!"
    assert chunks[2].choices[0].logprobs.content[0].top_logprobs[0].token == "!"
    assert chunks[1].model_extra["molten"]["step_id"] == 8
    assert chunks[1].model_extra["molten"]["origin"] == "decode"

    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == 12
    assert usage_chunk.usage.completion_tokens == 3
    assert usage_chunk.model_extra["molten"]["ttft_ms"] == 50.0
    assert "tokens" not in usage_chunk.model_extra["molten"]


def test_chat_chunks_without_usage():
    encoder = ChatChunkEncoder(completion_id="c", created=CREATED, model=MODEL, num_prompt_tokens=1)
    chunk = encoder.encode(make_events(["Hi"])[0])
    assert "usage" not in chunk
    assert chunk["choices"][0]["logprobs"] is None
    assert encoder.build_usage_chunk() is None


def test_chat_chunks_send_role_once_per_choice():
    encoder = ChatChunkEncoder(completion_id="c", created=CREATED, model=MODEL, num_prompt_tokens=1, n=2)
    first = make_events(["Hel", "lo"], seq_index=0)
    second = make_events(["Hi", " there"], seq_index=1)
    chunks = [encoder.encode(event) for event in (first[0], second[0], first[1], second[1])]
    roles = [chunk["choices"][0]["delta"].get("role") for chunk in chunks]
    assert roles == ["assistant", "assistant", None, None]
    assert [chunk["choices"][0]["index"] for chunk in chunks] == [0, 1, 0, 1]


def test_chunk_for_unknown_sequence_rejected():
    encoder = ChatChunkEncoder(completion_id="c", created=CREATED, model=MODEL, num_prompt_tokens=1, n=1)
    with pytest.raises(ValueError, match="seq_index 1"):
        encoder.encode(make_events(["Hi"], seq_index=1)[0])


def test_completion_chunks_carry_text_offsets():
    encoder = CompletionChunkEncoder(
        completion_id="cmpl-1",
        created=CREATED,
        model=MODEL,
        num_prompt_tokens=12,
        logprobs=True,
        include_usage=True,
        decode_token=decode_token,
    )
    chunks = [encoder.encode(event) for event in make_events(["Hel", "lo", " world"], finish_reason="length")]
    offsets = [chunk["choices"][0]["logprobs"]["text_offset"] for chunk in chunks]
    assert offsets == [[0], [3], [5]]
    # CompletionChoice requires a finish_reason, so only the last chunk validates as Completion;
    # the client parses the others without validation (see the stream tests below).
    last = Completion.model_validate(chunks[-1])
    assert last.choices[0].finish_reason == "length"
    assert last.choices[0].logprobs.tokens == [" world"]
    assert Completion.model_validate(encoder.build_usage_chunk()).usage.completion_tokens == 3


# --- the official openai client against recorded bodies ---------------------------------------


def make_client(handler) -> openai.OpenAI:
    """An OpenAI client whose HTTP requests go to `handler` instead of the network."""
    transport = httpx.MockTransport(handler)
    return openai.OpenAI(
        base_url="http://molten.test/v1", api_key="unused", http_client=httpx.Client(transport=transport)
    )


def sse_response(chunks) -> httpx.Response:
    payload = "".join(format_sse(chunk) for chunk in chunks) + SSE_DONE
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=payload.encode())


def test_client_request_validates_and_streams_chat():
    received = {}

    def handler(request: httpx.Request) -> httpx.Response:
        body = ChatCompletionRequest.from_body(parse_json_body(request.content))
        received["request"] = body
        encoder = ChatChunkEncoder(
            completion_id="chatcmpl-1",
            created=CREATED,
            model=body.model,
            num_prompt_tokens=12,
            logprobs=body.logprobs,
            include_usage=body.include_usage,
            decode_token=decode_token,
        )
        chunks = [encoder.encode(event) for event in make_events(["Hel", "lo", " world", "!"], handoff=HANDOFF)]
        return sse_response([*chunks, encoder.build_usage_chunk()])

    client = make_client(handler)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=2,
        max_completion_tokens=4,
        temperature=0.7,
        seed=3,
        stop=["\n\n"],
        extra_body={"top_k": 40, "min_p": 0.05},
    )
    chunks = list(stream)

    request = received["request"]
    assert request.top_k == 40
    assert request.max_completion_tokens == 4
    assert request.include_usage is True
    assert "".join(chunk.choices[0].delta.content for chunk in chunks if chunk.choices) == "Hello world!"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.total_tokens == 16
    assert chunks[1].molten["handoff"]["blocks"] == 2
    assert chunks[0].choices[0].logprobs.content[0].top_logprobs[1].token == " there"


def test_client_parses_chat_completion():
    def handler(request: httpx.Request) -> httpx.Response:
        body = ChatCompletionRequest.from_body(parse_json_body(request.content))
        response = build_chat_completion(
            completion_id="chatcmpl-1",
            created=CREATED,
            model=body.model,
            events=make_events(["Hi", " there"]),
            n=1,
            num_prompt_tokens=5,
        )
        return httpx.Response(200, json=response)

    completion = make_client(handler).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert completion.choices[0].message.content == "Hi there"
    assert completion.usage.total_tokens == 7
    assert completion.molten["ttft_ms"] == 50.0


def test_client_streams_completion():
    def handler(request: httpx.Request) -> httpx.Response:
        body = CompletionRequest.from_body(parse_json_body(request.content))
        encoder = CompletionChunkEncoder(
            completion_id="cmpl-1",
            created=CREATED,
            model=body.model,
            num_prompt_tokens=3,
            logprobs=body.logprobs is not None,
            decode_token=decode_token,
        )
        return sse_response([encoder.encode(event) for event in make_events(["Hel", "lo"], finish_reason="length")])

    stream = make_client(handler).completions.create(model=MODEL, prompt="Say", max_tokens=2, stream=True, logprobs=1)
    chunks = list(stream)
    assert "".join(chunk.choices[0].text for chunk in chunks) == "Hello"
    assert [chunk.choices[0].finish_reason for chunk in chunks] == [None, "length"]
    assert chunks[1].choices[0].logprobs.text_offset == [3]
    assert chunks[0].molten["time_since_arrival_ms"] == 50.0


def test_client_parses_completion_and_model_list():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json=build_model_list([MODEL], created=CREATED))
        body = CompletionRequest.from_body(parse_json_body(request.content))
        response = build_completion(
            completion_id="cmpl-1",
            created=CREATED,
            model=body.model,
            events=make_events(["Hel", "lo"]),
            n=1,
            num_prompt_tokens=3,
        )
        return httpx.Response(200, json=response)

    client = make_client(handler)
    assert client.completions.create(model=MODEL, prompt=["Say"]).choices[0].text == "Hello"
    assert [model.id for model in client.models.list()] == [MODEL]


def test_client_surfaces_error_body():
    def handler(request: httpx.Request) -> httpx.Response:
        try:
            ChatCompletionRequest.from_body(parse_json_body(request.content))
        except RequestValidationError as exc:
            return httpx.Response(exc.status, json=exc.to_dict())
        raise AssertionError("the request should be invalid")

    client = make_client(handler)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=5)
    assert caught.value.status_code == 400
    assert caught.value.param == "temperature"
    assert "temperature must be a number in [0, 2], got 5" in caught.value.message

"""Request validation of the OpenAI protocol models: field errors, defaults and the context window rule."""

import pytest

from molten.engine.sampling_params import SamplingParams
from molten.protocol.openai import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_N,
    ChatCompletionRequest,
    CompletionRequest,
    RequestValidationError,
    resolve_max_tokens,
)

MODEL = "smollm2-135m"
USER_MESSAGES = [{"role": "user", "content": "Hi"}]


def chat_body(**fields):
    return {"model": MODEL, "messages": USER_MESSAGES, **fields}


def completion_body(**fields):
    return {"model": MODEL, "prompt": "test", **fields}


def reject(request_cls, body) -> RequestValidationError:
    with pytest.raises(RequestValidationError) as caught:
        request_cls.from_body(body)
    return caught.value


# Both endpoints share the sampling fields, so each shared case runs against both.
ENDPOINTS = [(ChatCompletionRequest, chat_body), (CompletionRequest, completion_body)]


@pytest.fixture(params=ENDPOINTS, ids=["chat", "completions"])
def endpoint(request):
    return request.param


# --- C01: empty prompt ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "param"),
    [("", "prompt"), ([""], "prompt[0]"), ([], "prompt"), ([[]], "prompt[0]")],
)
def test_empty_prompt_rejected(prompt, param):
    error = reject(CompletionRequest, completion_body(prompt=prompt, max_tokens=20))
    assert error.status == 400
    assert error.param == param
    assert error.message == f"{param} must not be empty"


def test_zero_token_prompt_rejected_by_sampling_params():
    request = CompletionRequest.from_body(completion_body(prompt=" "))
    with pytest.raises(RequestValidationError) as caught:
        request.to_sampling_params(max_model_len=2048, num_prompt_tokens=0)
    assert caught.value.status == 400
    assert caught.value.param == "prompt"
    assert "must not be empty" in caught.value.message


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("Once upon", "Once upon"), (["Once upon"], "Once upon"), ([1, 2, 3], [1, 2, 3]), ([[4, 5]], [4, 5])],
)
def test_prompt_forms_normalized(prompt, expected):
    assert CompletionRequest.from_body(completion_body(prompt=prompt)).prompt == expected


def test_batch_prompt_rejected():
    error = reject(CompletionRequest, completion_body(prompt=["a", "b"]))
    assert error.status == 400
    assert error.param == "prompt"
    assert "batches of prompts are not supported" in error.message
    assert "2 prompts" in error.message


@pytest.mark.parametrize(
    ("prompt", "param", "shown"),
    [
        ([1, -2], "prompt[1]", "-2"),
        ([1, "b"], "prompt[1]", '"b"'),
        ([[1, 2.5]], "prompt[0][1]", "2.5"),
        ([True], "prompt[0]", "true"),
    ],
)
def test_invalid_token_id_rejected(prompt, param, shown):
    error = reject(CompletionRequest, completion_body(prompt=prompt))
    assert error.param == param
    assert "token id (an integer >= 0)" in error.message
    assert error.message.endswith(f"got {shown}")


@pytest.mark.parametrize("prompt", [5, {"text": "hi"}, None])
def test_prompt_of_wrong_type_rejected(prompt):
    error = reject(CompletionRequest, completion_body(prompt=prompt))
    assert error.param == "prompt"
    assert "must be a string, a list of token ids" in error.message


def test_missing_prompt_rejected():
    error = reject(CompletionRequest, {"model": MODEL})
    assert error.param == "prompt"
    assert error.message == "prompt is required"


# --- C02: null means "not set" -----------------------------------------------------------


def test_null_max_tokens_uses_completion_default():
    request = CompletionRequest.from_body(completion_body(max_tokens=None))
    params = request.to_sampling_params(max_model_len=2048, num_prompt_tokens=1)
    assert request.max_tokens is None
    assert params.max_tokens == DEFAULT_COMPLETION_MAX_TOKENS


def test_null_max_tokens_uses_chat_default():
    request = ChatCompletionRequest.from_body(chat_body(max_tokens=None, max_completion_tokens=None))
    params = request.to_sampling_params(max_model_len=8192, num_prompt_tokens=10)
    assert params.max_tokens == DEFAULT_CHAT_MAX_TOKENS


def test_default_max_tokens_argument_overrides_endpoint_default():
    request = CompletionRequest.from_body(completion_body())
    params = request.to_sampling_params(max_model_len=2048, num_prompt_tokens=1, default_max_tokens=100)
    assert params.max_tokens == 100


NULLABLE_FIELDS = [
    "stream",
    "stream_options",
    "n",
    "stop",
    "seed",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "stop_token_ids",
    "priority",
    "ignore_eos",
    "user",
    "logprobs",
]


def test_null_for_every_optional_field_means_default(endpoint):
    request_cls, make_body = endpoint
    request = request_cls.from_body(make_body(**{name: None for name in NULLABLE_FIELDS}))
    params = request.to_sampling_params(max_model_len=2048, num_prompt_tokens=4)
    defaults = SamplingParams()

    assert request.stream is False
    assert request.include_usage is False
    assert request.priority == 0
    assert params.n == 1
    assert params.stop == []
    assert params.seed is None
    assert params.temperature == defaults.temperature
    assert params.top_p == defaults.top_p
    assert params.top_k == defaults.top_k
    assert params.min_p == defaults.min_p
    assert params.repetition_penalty == defaults.repetition_penalty
    assert params.ignore_eos is False
    assert params.logprobs is False
    assert params.top_logprobs == 0


def test_null_for_chat_only_fields_means_default():
    body = chat_body(top_logprobs=None, max_completion_tokens=None, tools=None, response_format=None)
    body["messages"] = [{"role": "user", "content": "Hi", "name": None}]
    request = ChatCompletionRequest.from_body(body)
    assert request.top_logprobs is None
    assert request.messages[0].name is None


def test_null_for_required_field_rejected():
    error = reject(ChatCompletionRequest, chat_body(model=None))
    assert error.param == "model"
    assert error.message == "model must be a string naming a served model (see GET /v1/models), got null"


# --- C03: max_tokens ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"), [(0, "0"), (-5, "-5"), ("ten", '"ten"'), (1e9, "1000000000.0"), (16.0, "16.0"), (True, "true")]
)
def test_invalid_max_tokens_rejected(endpoint, value, shown):
    request_cls, make_body = endpoint
    error = reject(request_cls, make_body(max_tokens=value))
    assert error.status == 400
    assert error.param == "max_tokens"
    assert error.message == f"max_tokens must be an integer >= 1, got {shown}"
    assert error.to_dict() == {
        "error": {"message": error.message, "type": "invalid_request_error", "param": "max_tokens", "code": None}
    }


def test_huge_max_tokens_clamped_to_context_window(endpoint):
    request_cls, make_body = endpoint
    request = request_cls.from_body(make_body(max_tokens=10**12))
    params = request.to_sampling_params(max_model_len=2048, num_prompt_tokens=48)
    assert params.max_tokens == 2000


def test_max_completion_tokens_used_as_max_tokens():
    request = ChatCompletionRequest.from_body(chat_body(max_completion_tokens=7))
    assert request.to_sampling_params(max_model_len=2048, num_prompt_tokens=4).max_tokens == 7


def test_invalid_max_completion_tokens_rejected():
    error = reject(ChatCompletionRequest, chat_body(max_completion_tokens="ten"))
    assert error.param == "max_completion_tokens"
    assert error.message == 'max_completion_tokens must be an integer >= 1, got "ten"'


def test_conflicting_max_tokens_fields_rejected():
    error = reject(ChatCompletionRequest, chat_body(max_tokens=5, max_completion_tokens=6))
    assert error.param == "max_completion_tokens"
    assert "set only one of them" in error.message


def test_equal_max_tokens_fields_accepted():
    request = ChatCompletionRequest.from_body(chat_body(max_tokens=5, max_completion_tokens=5))
    assert request.to_sampling_params(max_model_len=2048, num_prompt_tokens=4).max_tokens == 5


# --- C04: wrong JSON types ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["false", "true", 0, 1, "no"])
def test_stream_must_be_boolean(endpoint, value):
    request_cls, make_body = endpoint
    error = reject(request_cls, make_body(stream=value))
    assert error.status == 400
    assert error.param == "stream"
    assert "stream must be a boolean (true or false)" in error.message


@pytest.mark.parametrize("value", [True, False])
def test_stream_boolean_accepted(endpoint, value):
    request_cls, make_body = endpoint
    assert request_cls.from_body(make_body(stream=value)).stream is value


def test_messages_string_rejected():
    error = reject(ChatCompletionRequest, chat_body(messages="hello"))
    assert error.status == 400
    assert error.param == "messages"
    assert error.message == 'messages must be a non-empty list of message objects, got "hello"'


def test_temperature_string_rejected(endpoint):
    request_cls, make_body = endpoint
    error = reject(request_cls, make_body(temperature="hot"))
    assert error.status == 400
    assert error.param == "temperature"
    assert error.message == 'temperature must be a number in [0, 2], got "hot"'


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("model", 7, "a string"),
        ("n", "2", "an integer in [1, 16]"),
        ("n", 2.0, "an integer in [1, 16]"),
        ("seed", "42", "an integer"),
        ("top_p", True, "a number in (0, 1]"),
        ("top_k", 40.0, "an integer >= 1, or 0 or -1"),
        ("min_p", "0.1", "a number in [0, 1]"),
        ("repetition_penalty", "1.1", "a number > 0"),
        ("priority", "high", "an integer"),
        ("ignore_eos", "yes", "a boolean (true or false)"),
        ("stop_token_ids", 2, "a list of token ids"),
        ("stream_options", "usage", "an object"),
    ],
)
def test_wrong_type_names_field_and_type(endpoint, field, value, expected):
    request_cls, make_body = endpoint
    body = make_body(**{field: value})
    if field == "stream_options":
        body["stream"] = True
    error = reject(request_cls, body)
    assert error.param == field
    assert error.message.startswith(f"{field} must be {expected}")


def test_nested_wrong_type_names_path():
    error = reject(ChatCompletionRequest, chat_body(stream=True, stream_options={"include_usage": "yes"}))
    assert error.param == "stream_options.include_usage"
    assert error.message == 'stream_options.include_usage must be a boolean (true or false), got "yes"'


def test_stop_token_id_element_names_index(endpoint):
    request_cls, make_body = endpoint
    error = reject(request_cls, make_body(stop_token_ids=[2, -1]))
    assert error.param == "stop_token_ids[1]"
    assert "token id" in error.message


# --- C06: ranges -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("top_p", 0, "a number in (0, 1]"),
        ("top_p", 1.5, "a number in (0, 1]"),
        ("top_p", -0.1, "a number in (0, 1]"),
        ("temperature", -1, "a number in [0, 2]"),
        ("temperature", 2.5, "a number in [0, 2]"),
        ("top_k", -3, "an integer >= 1, or 0 or -1 to disable the filter"),
        ("n", 0, f"an integer in [1, {MAX_N}]"),
        ("n", MAX_N + 1, f"an integer in [1, {MAX_N}]"),
        ("min_p", 1.5, "a number in [0, 1]"),
        ("repetition_penalty", 0, "a number > 0 (1 disables it)"),
        ("seed", 2**64, f"an integer in [{-(2**63)}, {2**64 - 1}]"),
        ("priority", 2**40, f"an integer in [{-(2**31)}, {2**31 - 1}]"),
    ],
)
def test_out_of_range_rejected(endpoint, field, value, expected):
    request_cls, make_body = endpoint
    error = reject(request_cls, make_body(**{field: value}))
    assert error.status == 400
    assert error.param == field
    assert error.message.startswith(f"{field} must be {expected}, got ")


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_number_rejected(endpoint, field, value):
    request_cls, make_body = endpoint
    error = reject(request_cls, make_body(**{field: value}))
    assert error.param == field


def test_range_edges_accepted(endpoint):
    request_cls, make_body = endpoint
    body = make_body(top_p=1, temperature=0, top_k=0, min_p=1, n=MAX_N, seed=-(2**63), repetition_penalty=0.01)
    params = request_cls.from_body(body).to_sampling_params(max_model_len=64, num_prompt_tokens=1)
    assert params.top_p == 1.0
    assert params.greedy
    assert params.n == MAX_N
    assert params.seed == -(2**63)


def test_integer_temperature_accepted_as_float(endpoint):
    request_cls, make_body = endpoint
    assert request_cls.from_body(make_body(temperature=1)).temperature == 1.0


@pytest.mark.parametrize(("value", "expected"), [(-1, 0), (0, 0), (40, 40)])
def test_top_k_minus_one_means_disabled(endpoint, value, expected):
    request_cls, make_body = endpoint
    params = request_cls.from_body(make_body(top_k=value)).to_sampling_params(max_model_len=64, num_prompt_tokens=1)
    assert params.top_k == expected


# --- C07: context window -----------------------------------------------------------------


def test_prompt_one_short_of_window_gets_one_token():
    request = CompletionRequest.from_body(completion_body(max_tokens=20))
    params = request.to_sampling_params(max_model_len=2048, num_prompt_tokens=2047)
    assert params.max_tokens == 1


@pytest.mark.parametrize("num_prompt_tokens", [2048, 2049])
def test_prompt_filling_window_rejected(num_prompt_tokens):
    request = CompletionRequest.from_body(completion_body(max_tokens=20))
    with pytest.raises(RequestValidationError) as caught:
        request.to_sampling_params(max_model_len=2048, num_prompt_tokens=num_prompt_tokens)
    assert caught.value.status == 400
    assert caught.value.param == "prompt"
    assert f"prompt is {num_prompt_tokens} tokens, the context window is 2048" in caught.value.message


def test_chat_prompt_filling_window_names_messages():
    request = ChatCompletionRequest.from_body(chat_body())
    with pytest.raises(RequestValidationError) as caught:
        request.to_sampling_params(max_model_len=512, num_prompt_tokens=600)
    assert caught.value.param == "messages"
    assert "prompt is 600 tokens, the context window is 512" in caught.value.message


@pytest.mark.parametrize(
    ("requested", "num_prompt_tokens", "expected"),
    [(None, 10, 256), (None, 1900, 148), (100, 10, 100), (5000, 10, 2038), (1, 2047, 1)],
)
def test_resolve_max_tokens(requested, num_prompt_tokens, expected):
    result = resolve_max_tokens(
        requested, max_model_len=2048, num_prompt_tokens=num_prompt_tokens, default_max_tokens=256
    )
    assert result == expected


# --- C11: chat messages ------------------------------------------------------------------


def test_empty_messages_rejected():
    error = reject(ChatCompletionRequest, chat_body(messages=[]))
    assert error.status == 400
    assert error.param == "messages"
    assert error.message == "messages must be a non-empty list of message objects, got []"


def test_unknown_role_rejected():
    error = reject(
        ChatCompletionRequest,
        chat_body(messages=[{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]),
    )
    assert error.status == 400
    assert error.param == "messages[1].role"
    assert (
        error.message
        == 'messages[1].role must be one of "system", "developer", "user", "assistant", "tool", got "wizard"'
    )


def test_missing_content_rejected():
    error = reject(ChatCompletionRequest, chat_body(messages=[{"role": "user"}]))
    assert error.status == 400
    assert error.param == "messages[0].content"
    assert error.message == "messages[0].content is required"


def test_null_content_rejected():
    error = reject(ChatCompletionRequest, chat_body(messages=[{"role": "assistant", "content": None}]))
    assert error.param == "messages[0].content"
    assert error.message == "messages[0].content must be a string or a list of text parts, got null"


def test_missing_role_rejected():
    error = reject(ChatCompletionRequest, chat_body(messages=[{"content": "hi"}]))
    assert error.param == "messages[0].role"
    assert error.message == "messages[0].role is required"


def test_message_not_object_rejected():
    error = reject(ChatCompletionRequest, chat_body(messages=["hello"]))
    assert error.param == "messages[0]"
    assert error.message.startswith("messages[0] must be a message object")


def test_missing_messages_rejected():
    error = reject(ChatCompletionRequest, {"model": MODEL})
    assert error.param == "messages"
    assert error.message == "messages is required"


@pytest.mark.parametrize(
    ("content", "param", "fragment"),
    [
        (
            [{"type": "image_url", "image_url": {"url": "x"}}],
            "messages[0].content[0].type",
            'is "image_url"; only text parts',
        ),
        ([], "messages[0].content", "must contain at least one text part"),
        (["hi"], "messages[0].content[0]", "must be an object"),
        ([{"type": "text", "text": 5}], "messages[0].content[0].text", "must be a string, got 5"),
        (42, "messages[0].content", "must be a string or a list of text parts, got 42"),
    ],
)
def test_invalid_content_parts_rejected(content, param, fragment):
    error = reject(ChatCompletionRequest, chat_body(messages=[{"role": "user", "content": content}]))
    assert error.param == param
    assert fragment in error.message


def test_message_dicts_join_text_parts():
    request = ChatCompletionRequest.from_body(
        chat_body(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hello,"}, {"type": "text", "text": "there"}],
                    "name": "ann",
                },
            ]
        )
    )
    assert request.message_dicts() == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hello,\nthere", "name": "ann"},
    ]


def test_tool_calls_rejected():
    message = {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function"}]}
    error = reject(ChatCompletionRequest, chat_body(messages=[message]))
    assert error.param == "messages[0].tool_calls"
    assert "tool calling" in error.message


# --- stop, logprobs, stream_options ------------------------------------------------------


def test_stop_string_becomes_list(endpoint):
    request_cls, make_body = endpoint
    params = request_cls.from_body(make_body(stop="\n")).to_sampling_params(max_model_len=64, num_prompt_tokens=1)
    assert params.stop == ["\n"]


@pytest.mark.parametrize(
    ("stop", "param", "fragment"),
    [
        (["a", "b", "c", "d", "e"], "stop", "at most 4 strings, got 5"),
        (["a", ""], "stop[1]", "must not be an empty string"),
        ("", "stop", "must not be an empty string"),
        (["a", 3], "stop[1]", "must be a string, got 3"),
        (3, "stop", "must be a string or a list of up to 4 strings"),
    ],
)
def test_invalid_stop_rejected(endpoint, stop, param, fragment):
    request_cls, make_body = endpoint
    error = reject(request_cls, make_body(stop=stop))
    assert error.param == param
    assert fragment in error.message


def test_chat_logprobs_settings():
    request = ChatCompletionRequest.from_body(chat_body(logprobs=True, top_logprobs=3))
    params = request.to_sampling_params(max_model_len=64, num_prompt_tokens=1)
    assert params.logprobs is True
    assert params.top_logprobs == 3


def test_chat_top_logprobs_requires_logprobs():
    error = reject(ChatCompletionRequest, chat_body(top_logprobs=3))
    assert error.param == "top_logprobs"
    assert 'requires "logprobs": true' in error.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ({"logprobs": 1}, "logprobs"),
    ],
)
def test_invalid_chat_logprobs_rejected(fields, param):
    error = reject(ChatCompletionRequest, chat_body(**fields))
    assert error.param == param


@pytest.mark.parametrize(("value", "expected"), [(0, (True, 0)), (5, (True, 5)), (None, (False, 0))])
def test_completion_logprobs_settings(value, expected):
    params = CompletionRequest.from_body(completion_body(logprobs=value)).to_sampling_params(
        max_model_len=64, num_prompt_tokens=1
    )
    assert (params.logprobs, params.top_logprobs) == expected


@pytest.mark.parametrize("value", [6, -1, True, "3"])
def test_invalid_completion_logprobs_rejected(value):
    error = reject(CompletionRequest, completion_body(logprobs=value))
    assert error.param == "logprobs"
    assert error.message.startswith("logprobs must be an integer in [0, 5]")


def test_include_usage_requires_stream(endpoint):
    request_cls, make_body = endpoint
    error = reject(request_cls, make_body(stream_options={"include_usage": True}))
    assert error.param == "stream_options"
    assert 'only allowed with "stream": true' in error.message


def test_include_usage_read_from_stream_options(endpoint):
    request_cls, make_body = endpoint
    request = request_cls.from_body(make_body(stream=True, stream_options={"include_usage": True}))
    assert request.include_usage is True


# --- unknown and unsupported fields ------------------------------------------------------


def test_unknown_fields_ignored(endpoint):
    request_cls, make_body = endpoint
    request = request_cls.from_body(make_body(metadata={"a": "b"}, store=False, service_tier="auto", x_custom=[1, {}]))
    assert request.model == MODEL


@pytest.mark.parametrize(
    ("request_cls", "body", "param"),
    [
        (ChatCompletionRequest, chat_body(presence_penalty=0.5), "presence_penalty"),
        (CompletionRequest, completion_body(frequency_penalty=-1), "frequency_penalty"),
        (ChatCompletionRequest, chat_body(logit_bias={"50256": -100}), "logit_bias"),
        (ChatCompletionRequest, chat_body(tools=[{"type": "function"}]), "tools"),
        (ChatCompletionRequest, chat_body(response_format={"type": "json_object"}), "response_format"),
        (CompletionRequest, completion_body(echo=True), "echo"),
        (CompletionRequest, completion_body(suffix="end"), "suffix"),
        (CompletionRequest, completion_body(best_of=3), "best_of"),
    ],
)
def test_unsupported_feature_rejected(request_cls, body, param):
    error = reject(request_cls, body)
    assert error.status == 400
    assert error.param == param
    assert "not supported" in error.message


def test_neutral_values_of_unsupported_fields_accepted():
    chat = chat_body(
        presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tools=[], response_format={"type": "text"}
    )
    assert ChatCompletionRequest.from_body(chat).model == MODEL
    completion = completion_body(echo=False, suffix=None, best_of=2, n=2)
    assert CompletionRequest.from_body(completion).n == 2


def test_engine_extensions_reach_sampling_params(endpoint):
    request_cls, make_body = endpoint
    body = make_body(
        top_k=40, min_p=0.05, repetition_penalty=1.1, ignore_eos=True, seed=7, stop_token_ids=[2], n=3, priority=-2
    )
    request = request_cls.from_body(body)
    params = request.to_sampling_params(max_model_len=64, num_prompt_tokens=1)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (40, 0.05, 1.1)
    assert params.ignore_eos is True
    assert params.seed == 7
    assert params.stop_token_ids == [2]
    assert params.n == 3
    assert request.priority == -2

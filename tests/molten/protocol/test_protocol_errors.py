"""Request body parsing and the OpenAI-style error bodies."""

import json

import pytest

from molten.protocol.openai import (
    DEFAULT_MAX_BODY_BYTES,
    APIError,
    RequestValidationError,
    internal_error,
    model_not_found_error,
    overloaded_error,
    parse_json_body,
)


def test_valid_object_parsed():
    assert parse_json_body(b'{"model": "m", "prompt": "caf\xc3\xa9"}') == {"model": "m", "prompt": "café"}


@pytest.mark.parametrize("raw", [b"", b"   \n"])
def test_empty_body_rejected(raw):
    with pytest.raises(RequestValidationError) as caught:
        parse_json_body(raw)
    assert caught.value.status == 400
    assert caught.value.param is None
    assert caught.value.message.startswith("request body is empty")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"model=m&prompt=hi", "request body is not valid JSON: Expecting value at line 1 column 1"),
        (b'{"model": "m",', "request body is not valid JSON"),
        (b'{"temperature": NaN}', "NaN is not valid JSON"),
        (b'{"temperature": -Infinity}', "-Infinity is not valid JSON"),
        (b'{"prompt": "\xff"}', "request body is not valid UTF-8"),
        (b"[" * 100_000, "nested too deeply"),
    ],
)
def test_invalid_json_rejected(raw, fragment):
    with pytest.raises(RequestValidationError) as caught:
        parse_json_body(raw)
    assert caught.value.status == 400
    assert fragment in caught.value.message


@pytest.mark.parametrize(
    ("raw", "type_name"),
    [(b"[1, 2]", "an array"), (b'"hi"', "a string"), (b"42", "a number"), (b"null", "null"), (b"true", "a boolean")],
)
def test_non_object_json_rejected(raw, type_name):
    with pytest.raises(RequestValidationError) as caught:
        parse_json_body(raw)
    assert caught.value.status == 400
    assert caught.value.message == f"request body must be a JSON object, got {type_name}"


def test_oversized_body_gets_413():
    raw = json.dumps({"model": "m", "prompt": "x" * (50 * 1024 * 1024)}).encode()
    with pytest.raises(APIError) as caught:
        parse_json_body(raw)
    error = caught.value
    assert error.status == 413
    assert f"the limit is {DEFAULT_MAX_BODY_BYTES} bytes" in error.message
    assert error.to_dict()["error"]["code"] == "payload_too_large"


def test_body_at_limit_accepted():
    raw = b'{"a": "' + b"x" * 100 + b'"}'
    assert parse_json_body(raw, max_bytes=len(raw)) == {"a": "x" * 100}
    with pytest.raises(APIError):
        parse_json_body(raw, max_bytes=len(raw) - 1)


def test_validation_error_body_shape():
    error = RequestValidationError("max_tokens must be an integer >= 1, got 0", "max_tokens")
    assert error.status == 400
    assert error.to_dict() == {
        "error": {
            "message": "max_tokens must be an integer >= 1, got 0",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": None,
        }
    }


def test_model_not_found_lists_served_models():
    error = model_not_found_error("no-such-model", ["smollm2-135m", "tiny-random-llama"])
    body = error.to_dict()["error"]
    assert error.status == 404
    assert body["type"] == "invalid_request_error"
    assert body["code"] == "model_not_found"
    assert body["param"] == "model"
    assert "no-such-model" in body["message"]
    assert "smollm2-135m, tiny-random-llama" in body["message"]


def test_model_not_found_without_models():
    error = model_not_found_error("x", [])
    assert error.status == 404
    assert "no model is loaded" in error.message


def test_overload_errors_carry_retry_after():
    busy = overloaded_error("the server is at capacity; retry later", retry_after_s=2.4)
    limited = overloaded_error("too many requests", retry_after_s=0, status=429)
    assert busy.status == 503
    assert busy.headers == {"Retry-After": "2"}
    assert busy.to_dict()["error"]["type"] == "server_error"
    assert limited.status == 429
    assert limited.headers == {"Retry-After": "1"}
    assert limited.to_dict()["error"]["type"] == "rate_limit_error"


def test_overload_status_must_be_429_or_503():
    with pytest.raises(ValueError, match="429 or 503"):
        overloaded_error("busy", retry_after_s=1, status=500)


def test_internal_error_shape():
    error = internal_error()
    assert error.status == 500
    assert error.to_dict()["error"]["type"] == "server_error"

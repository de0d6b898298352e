"""OpenAI-style API errors, and turning raw request bodies and pydantic errors into them.

Every error the HTTP layer returns has the body OpenAI's API uses::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

`param` is the path of the offending request field (`messages[0].role`, `max_tokens`) or
null when the whole body is at fault.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
"""Largest request body accepted, in bytes. A prompt that fills a 128k-token context
window is well under 1 MiB of text, so this leaves room for long chats."""

CUSTOM_ERROR_TYPE = "molten_invalid"
"""pydantic error type raised by the request models' own validators. Its context carries
`detail`, the message after the field path, and `subpath`, a path below the validated
field such as `[0]`."""


class APIError(Exception):
    """An error the HTTP layer returns to the client as an OpenAI-style error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_type: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        """Extra HTTP response headers, such as Retry-After on overload errors."""

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, param={self.param!r}, message={self.message!r})"


class RequestValidationError(APIError):
    """A client mistake in the request: HTTP 400 unless `status` sets another code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message, status=status, error_type="invalid_request_error", param=param, code=code)


def model_not_found_error(model: str, served_model_ids: Sequence[str]) -> APIError:
    """Build the 404 for a request naming a model that is not served, listing the ones that are."""
    if served_model_ids:
        served = ", ".join(served_model_ids)
        message = f"model {describe_value(model)} is not served here; served models: {served}"
    else:
        message = f"model {describe_value(model)} is not served here; no model is loaded yet"
    return APIError(message, status=404, error_type="invalid_request_error", param="model", code="model_not_found")


def payload_too_large_error(num_bytes: int, max_bytes: int) -> APIError:
    return APIError(
        f"request body is {num_bytes} bytes, the limit is {max_bytes} bytes; send a smaller request",
        status=413,
        error_type="invalid_request_error",
        code="payload_too_large",
    )


def overloaded_error(message: str, *, retry_after_s: int, status: int = 503) -> APIError:
    """Build a 429 (too many requests from this client) or 503 (server at capacity) error.

    Both carry a Retry-After header in whole seconds.
    """
    if status not in (429, 503):
        raise ValueError(f"overload status must be 429 or 503, got {status}")
    if status == 429:
        error_type, code = "rate_limit_error", "rate_limit_exceeded"
    else:
        error_type, code = "server_error", "overloaded"
    retry_after_s = max(1, int(retry_after_s))
    return APIError(
        message, status=status, error_type=error_type, code=code, headers={"Retry-After": str(retry_after_s)}
    )


def internal_error(message: str = "internal server error; the request was not completed") -> APIError:
    return APIError(message, status=500, error_type="server_error")


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> dict[str, Any]:
    """Parse a request body as a JSON object.

    Raises APIError 413 when `raw` is longer than `max_bytes`, and RequestValidationError
    (400) for an empty body, invalid UTF-8 or JSON (including NaN and Infinity, which
    Python's json module would otherwise accept), or JSON that is not an object.
    """
    if len(raw) > max_bytes:
        raise payload_too_large_error(len(raw), max_bytes)
    if not raw.strip():
        raise RequestValidationError('request body is empty; send a JSON object such as {"model": ..., ...}')

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestValidationError(
            f"request body is not valid UTF-8 (byte {exc.start}); send UTF-8 encoded JSON"
        ) from None
    try:
        body = json.loads(text, parse_constant=_reject_json_constant)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise RequestValidationError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestValidationError("request body is not valid JSON: it is nested too deeply") from None

    if not isinstance(body, dict):
        raise RequestValidationError(f"request body must be a JSON object, got {_json_type_name(body)}")
    return body


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def format_param(loc: Sequence[str | int]) -> str | None:
    """Write a pydantic error location as a request field path: ('messages', 0, 'role') -> messages[0].role."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif path:
            path += f".{part}"
        else:
            path = part
    return path or None


def describe_value(value: Any, max_chars: int = 80) -> str:
    """Render a request value as the client wrote it (JSON), shortened for error messages."""
    if isinstance(value, float) and not math.isfinite(value):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    if len(text) > max_chars:
        text = text[: max_chars - 3] + "..."
    return text


def _field_pattern(loc: Sequence[str | int]) -> str:
    """Path with list indices blanked, used to look up a field's expected value: messages[].role."""
    return re.sub(r"\[\d+\]", "[]", format_param(loc) or "")


def request_error_from_validation(exc: ValidationError, expectations: Mapping[str, str]) -> RequestValidationError:
    """Turn the first error of a pydantic ValidationError into a RequestValidationError.

    `expectations` maps a field pattern (list indices written as `[]`, as in
    `messages[].role`) to a phrase describing a valid value ("an integer >= 1"), so the
    message reads 'max_tokens must be an integer >= 1, got "ten"'. Errors raised by the
    request models' own validators (CUSTOM_ERROR_TYPE) read '<path> <detail>'.
    """
    error = exc.errors(include_url=False)[0]
    loc = tuple(error["loc"])
    context = error.get("ctx") or {}

    if error["type"] == CUSTOM_ERROR_TYPE:
        param = (format_param(loc) or "") + context.get("subpath", "")
        return RequestValidationError(f"{param} {context['detail']}", param=param)

    param = format_param(loc)
    if error["type"] == "missing":
        return RequestValidationError(f"{param} is required", param=param)

    expected = expectations.get(_field_pattern(loc))
    if expected is None:
        # A field without a registered phrase: fall back to pydantic's own wording.
        return RequestValidationError(
            f"{param} is invalid: {error['msg']}, got {describe_value(error['input'])}", param=param
        )
    return RequestValidationError(f"{param} must be {expected}, got {describe_value(error['input'])}", param=param)

"""The OpenAI-compatible HTTP protocol in one import: request models, errors, response and stream builders.

- request_models: validated bodies of `/v1/chat/completions` and `/v1/completions`, and
  the context window rule (`resolve_max_tokens`).
- errors: OpenAI-style error bodies, `parse_json_body`, pydantic errors turned into 400s.
- responses: non-streaming bodies and `GET /v1/models`.
- streaming: chunk encoders and server-sent event formatting.
"""

from molten.protocol.errors import (
    DEFAULT_MAX_BODY_BYTES,
    APIError,
    RequestValidationError,
    internal_error,
    model_not_found_error,
    overloaded_error,
    parse_json_body,
    payload_too_large_error,
    request_error_from_validation,
)
from molten.protocol.request_models import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_CHAT_TOP_LOGPROBS,
    MAX_COMPLETION_LOGPROBS,
    MAX_N,
    MAX_STOP_SEQUENCES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
    resolve_max_tokens,
)
from molten.protocol.responses import (
    TokenTextDecoder,
    build_chat_completion,
    build_completion,
    build_model_list,
    build_usage,
    new_completion_id,
    unix_time,
)
from molten.protocol.streaming import SSE_DONE, ChatChunkEncoder, CompletionChunkEncoder, format_sse

__all__ = [
    "DEFAULT_CHAT_MAX_TOKENS",
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_CHAT_TOP_LOGPROBS",
    "MAX_COMPLETION_LOGPROBS",
    "MAX_N",
    "MAX_STOP_SEQUENCES",
    "SSE_DONE",
    "APIError",
    "ChatChunkEncoder",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionChunkEncoder",
    "CompletionRequest",
    "RequestValidationError",
    "StreamOptions",
    "TokenTextDecoder",
    "build_chat_completion",
    "build_completion",
    "build_model_list",
    "build_usage",
    "format_sse",
    "internal_error",
    "model_not_found_error",
    "overloaded_error",
    "parse_json_body",
    "payload_too_large_error",
    "request_error_from_validation",
    "new_completion_id",
    "resolve_max_tokens",
    "unix_time",
]

"""Request bodies of `POST /v1/chat/completions` and `POST /v1/completions`, validated strictly.

Types are strict, so a JSON string never becomes a number or a boolean ("false" for
`stream` and "hot" for `temperature` are errors) and a float never becomes an integer
(`1e9` for `max_tokens` is an error). `null` for an optional field means "not set", so
the field's default applies. Unknown fields are ignored, because clients send fields
from newer API versions. Fields OpenAI defines but Molten does not implement are
accepted only at their neutral value (`presence_penalty: 0`, `echo: false`, no tools),
so a request never silently loses a feature it asked for.

`to_sampling_params` then applies the context window rule once the prompt is tokenized:
see `resolve_max_tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from molten.engine.sampling_params import SamplingParams, SamplingParamsError
from molten.protocol.errors import (
    CUSTOM_ERROR_TYPE,
    RequestValidationError,
    describe_value,
    request_error_from_validation,
)

MAX_N = 16
"""Most sequences one request may ask for. Each one holds its own KV blocks, so a large
`n` on a small KV pool would starve every other request."""
MAX_STOP_SEQUENCES = 4
"""OpenAI's limit on the number of stop strings."""
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
"""OpenAI's limits on alternatives per position, for chat (`top_logprobs`) and for
completions (`logprobs`)."""
DEFAULT_CHAT_MAX_TOKENS = 512
"""Generated tokens when a chat request sets no max_tokens (less if the context window is
shorter). OpenAI allows up to the whole window, but a bound keeps a rambling small model
from occupying the engine for minutes."""
DEFAULT_COMPLETION_MAX_TOKENS = 16
"""Generated tokens when a completion request sets no max_tokens: OpenAI's documented
default for the legacy completions API."""
MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1
"""Seed range: what torch.Generator.manual_seed accepts (checked with torch 2.13)."""
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1

ChatRole = Literal["system", "developer", "user", "assistant", "tool"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)


def _invalid(detail: str, subpath: str = "") -> PydanticCustomError:
    """Build a validation error whose message is '<field path><subpath> <detail>'."""
    return PydanticCustomError(CUSTOM_ERROR_TYPE, "{detail}", {"detail": detail, "subpath": subpath})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _StrictModel(BaseModel):
    """Strict types, unknown fields ignored, and null for an optional field treated as absent."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _drop_null_optional_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            key: value
            for key, value in data.items()
            if not (value is None and key in cls.model_fields and not cls.model_fields[key].is_required())
        }


class StreamOptions(_StrictModel):
    include_usage: bool = False
    """Send one more chunk before `[DONE]` with empty `choices` and the request's usage."""


class ChatMessage(_StrictModel):
    """One message of a chat. Content is a string or a list of text parts."""

    role: ChatRole
    content: Annotated[str | list[dict[str, Any]], Field(description="A string or a list of {type: text, text} parts.")]
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: Any = None

    @field_validator("content", mode="plain")
    @classmethod
    def _check_content(cls, value: Any) -> str | list[dict[str, Any]]:
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise _invalid(f"must be a string or a list of text parts, got {describe_value(value)}")
        if not value:
            raise _invalid("must contain at least one text part")
        for i, part in enumerate(value):
            if not isinstance(part, dict):
                raise _invalid(
                    f'must be an object such as {{"type": "text", "text": "..."}}, got {describe_value(part)}', f"[{i}]"
                )
            if part.get("type") != "text":
                raise _invalid(
                    f'is {describe_value(part.get("type"))}; only text parts ("type": "text") are supported',
                    f"[{i}].type",
                )
            if not isinstance(part.get("text"), str):
                raise _invalid(f"must be a string, got {describe_value(part.get('text'))}", f"[{i}].text")
        return value

    @field_validator("tool_calls", mode="plain")
    @classmethod
    def _reject_tool_calls(cls, value: Any) -> Any:
        if value not in (None, []):
            raise _invalid("is not supported: Molten does not implement tool calling")
        return None

    @property
    def text(self) -> str:
        """The content as one string, text parts joined by newlines as molten.tokenization.chat does."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part["text"] for part in self.content)


_COMMON_EXPECTATIONS: dict[str, str] = {
    "model": "a string naming a served model (see GET /v1/models)",
    "stream": "a boolean (true or false)",
    "stream_options": 'an object such as {"include_usage": true}',
    "stream_options.include_usage": "a boolean (true or false)",
    "n": f"an integer in [1, {MAX_N}]",
    "seed": f"an integer in [{MIN_SEED}, {MAX_SEED}]",
    "max_tokens": "an integer >= 1",
    "temperature": "a number in [0, 2]",
    "top_p": "a number in (0, 1]",
    "top_k": "an integer >= 1, or 0 or -1 to disable the filter",
    "min_p": "a number in [0, 1]",
    "repetition_penalty": "a number > 0 (1 disables it)",
    "presence_penalty": "a number in [-2, 2]",
    "frequency_penalty": "a number in [-2, 2]",
    "stop_token_ids": "a list of token ids (integers >= 0)",
    "stop_token_ids[]": "a token id (an integer >= 0)",
    "priority": f"an integer in [{MIN_PRIORITY}, {MAX_PRIORITY}]",
    "ignore_eos": "a boolean (true or false)",
    "user": "a string",
}


class _GenerationRequest(_StrictModel):
    """Fields shared by chat and completion requests."""

    field_expectations: ClassVar[Mapping[str, str]] = _COMMON_EXPECTATIONS
    """Field pattern -> phrase describing a valid value, used in error messages."""
    default_max_tokens: ClassVar[int]
    prompt_param: ClassVar[str]
    """The request field the prompt comes from, named in context window errors."""

    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: list[str] = Field(default_factory=list, description="A string or a list of up to 4 strings.")
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, description="Keep the k most likely tokens. 0 or -1 disables the filter.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: Any = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    priority: int = Field(
        0, ge=MIN_PRIORITY, le=MAX_PRIORITY, description="Scheduling priority, passed to the scheduler."
    )
    ignore_eos: bool = False
    user: str | None = None

    @field_validator("stream_options")
    @classmethod
    def _require_stream_for_options(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and info.data.get("stream") is not True:
            raise _invalid('is only allowed with "stream": true')
        return value

    @field_validator("stop", mode="plain")
    @classmethod
    def _check_stop(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            if value == "":
                raise _invalid("must not be an empty string")
            return [value]
        if not isinstance(value, list):
            raise _invalid(
                f"must be a string or a list of up to {MAX_STOP_SEQUENCES} strings, got {describe_value(value)}"
            )
        if len(value) > MAX_STOP_SEQUENCES:
            raise _invalid(f"must contain at most {MAX_STOP_SEQUENCES} strings, got {len(value)}")
        for i, item in enumerate(value):
            subpath = f"[{i}]"
            if not isinstance(item, str):
                raise _invalid(f"must be a string, got {describe_value(item)}", subpath)
            if item == "":
                raise _invalid("must not be an empty string", subpath)
        return list(value)

    @field_validator("top_k")
    @classmethod
    def _map_disabled_top_k(cls, value: int) -> int:
        # vLLM and its clients write -1 for "no top-k filter", and SamplingParams writes 0.
        return 0 if value == -1 else value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _reject_nonzero_penalty(cls, value: float) -> float:
        if value != 0.0:
            raise _invalid(f"is not supported (only 0), got {value}; use repetition_penalty instead")
        return value

    @field_validator("logit_bias", mode="plain")
    @classmethod
    def _reject_logit_bias(cls, value: Any) -> None:
        if value not in (None, {}):
            raise _invalid("is not supported; leave it unset")
        return None

    @classmethod
    def from_body(cls, body: Any) -> Self:
        """Validate a parsed JSON body, raising RequestValidationError that names the first invalid field."""
        try:
            return cls.model_validate(body)
        except ValidationError as exc:
            raise request_error_from_validation(exc, cls.field_expectations) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs_settings(self) -> tuple[bool, int]:
        """(report logprobs, number of alternatives per position)."""
        raise NotImplementedError

    def to_sampling_params(
        self,
        *,
        max_model_len: int,
        num_prompt_tokens: int,
        default_max_tokens: int | None = None,
    ) -> SamplingParams:
        """Build the engine's SamplingParams once the prompt is tokenized.

        `default_max_tokens` replaces the endpoint's default (DEFAULT_CHAT_MAX_TOKENS or
        DEFAULT_COMPLETION_MAX_TOKENS) for a request without max_tokens. Raises
        RequestValidationError for an empty prompt, a prompt that does not fit the
        context window, or settings SamplingParams rejects.
        """
        max_tokens = resolve_max_tokens(
            self.requested_max_tokens,
            max_model_len=max_model_len,
            num_prompt_tokens=num_prompt_tokens,
            default_max_tokens=self.default_max_tokens if default_max_tokens is None else default_max_tokens,
            prompt_param=self.prompt_param,
        )
        logprobs, top_logprobs = self._logprobs_settings()
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                seed=self.seed,
                stop=list(self.stop),
                stop_token_ids=list(self.stop_token_ids),
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                n=self.n,
            )
        except SamplingParamsError as exc:
            raise RequestValidationError(str(exc), param=exc.field) from None


class ChatCompletionRequest(_GenerationRequest):
    """Body of `POST /v1/chat/completions`."""

    field_expectations: ClassVar[Mapping[str, str]] = {
        **_COMMON_EXPECTATIONS,
        "messages": "a non-empty list of message objects",
        "messages[]": 'a message object such as {"role": "user", "content": "Hello"}',
        "messages[].role": "one of " + ", ".join(f'"{role}"' for role in CHAT_ROLES),
        "messages[].name": "a string",
        "messages[].tool_call_id": "a string",
        "logprobs": "a boolean (true or false)",
        "top_logprobs": f"an integer in [0, {MAX_CHAT_TOP_LOGPROBS}]",
        "max_completion_tokens": "an integer >= 1",
    }
    default_max_tokens: ClassVar[int] = DEFAULT_CHAT_MAX_TOKENS
    prompt_param: ClassVar[str] = "messages"

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: Any = None
    functions: Any = None
    response_format: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _require_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("logprobs") is not True:
            raise _invalid('requires "logprobs": true')
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _check_same_as_max_tokens(cls, value: int | None, info: ValidationInfo) -> int | None:
        max_tokens = info.data.get("max_tokens")
        if value is not None and max_tokens is not None and value != max_tokens:
            raise _invalid(f"is {value} but max_tokens is {max_tokens}; set only one of them")
        return value

    @field_validator("tools", "functions", mode="plain")
    @classmethod
    def _reject_tools(cls, value: Any) -> None:
        if value not in (None, []):
            raise _invalid("is not supported: Molten does not implement tool calling")
        return None

    @field_validator("response_format", mode="plain")
    @classmethod
    def _check_response_format(cls, value: Any) -> None:
        if value is None or (isinstance(value, dict) and value.get("type") == "text"):
            return None
        raise _invalid(f'is not supported except {{"type": "text"}}, got {describe_value(value)}')

    @property
    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name for max_tokens. Validation made them equal if both are set.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs_settings(self) -> tuple[bool, int]:
        return self.logprobs, self.top_logprobs or 0

    def message_dicts(self) -> list[dict[str, str]]:
        """Return the messages as plain {role, content[, name]} dicts, content parts joined into one string."""
        result = []
        for message in self.messages:
            entry = {"role": message.role, "content": message.text}
            if message.name is not None:
                entry["name"] = message.name
            result.append(entry)
        return result


class CompletionRequest(_GenerationRequest):
    """Body of `POST /v1/completions`.

    `prompt` is validated into one prompt: a string or a list of token ids. Batches of
    several prompts are rejected, so every response choice belongs to the same prompt.
    """

    field_expectations: ClassVar[Mapping[str, str]] = {
        **_COMMON_EXPECTATIONS,
        "logprobs": f"an integer in [0, {MAX_COMPLETION_LOGPROBS}] (the number of alternatives per token)",
        "echo": "a boolean (true or false)",
    }
    default_max_tokens: ClassVar[int] = DEFAULT_COMPLETION_MAX_TOKENS
    prompt_param: ClassVar[str] = "prompt"

    prompt: Annotated[str | list[int], Field(description="A string, a list of token ids, or a list of one of either.")]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _check_prompt(cls, value: Any) -> str | list[int]:
        if isinstance(value, str):
            if value == "":
                raise _invalid("must not be empty")
            return value
        if not isinstance(value, list):
            raise _invalid(
                f"must be a string, a list of token ids, or a list of one string, got {describe_value(value)}"
            )
        if not value:
            raise _invalid("must not be empty")

        if len(value) == 1 and isinstance(value[0], (str, list)):
            return _check_single_prompt(value[0], "[0]")
        if all(isinstance(item, (str, list)) for item in value):
            raise _invalid(
                f"contains {len(value)} prompts; batches of prompts are not supported, send one prompt per request"
            )
        return _check_token_ids(value, "")

    @field_validator("echo")
    @classmethod
    def _reject_echo(cls, value: bool) -> bool:
        if value:
            raise _invalid("is not supported; Molten returns only the generated text")
        return value

    @field_validator("suffix", mode="plain")
    @classmethod
    def _reject_suffix(cls, value: Any) -> None:
        if value not in (None, ""):
            raise _invalid("is not supported (no fill-in-the-middle); leave it unset")
        return None

    @field_validator("best_of", mode="plain")
    @classmethod
    def _check_best_of(cls, value: Any, info: ValidationInfo) -> None:
        n = info.data.get("n", 1)
        if value is not None and not (_is_int(value) and value == n):
            raise _invalid(f"is not supported unless it equals n ({n}); leave it unset, got {describe_value(value)}")
        return None

    def _logprobs_settings(self) -> tuple[bool, int]:
        if self.logprobs is None:
            return False, 0
        return True, self.logprobs


def _check_single_prompt(prompt: str | list[Any], subpath: str) -> str | list[int]:
    if not prompt:
        raise _invalid("must not be empty", subpath)
    if isinstance(prompt, str):
        return prompt
    return _check_token_ids(prompt, subpath)


def _check_token_ids(token_ids: list[Any], subpath: str) -> list[int]:
    # NOTE: ids are not checked against the vocabulary size, which only the loaded
    # tokenizer knows. The caller must check them before they reach the model.
    for i, token_id in enumerate(token_ids):
        if not _is_int(token_id) or token_id < 0:
            raise _invalid(f"must be a token id (an integer >= 0), got {describe_value(token_id)}", f"{subpath}[{i}]")
    return list(token_ids)


def resolve_max_tokens(
    requested: int | None,
    *,
    max_model_len: int,
    num_prompt_tokens: int,
    default_max_tokens: int,
    prompt_param: str = "prompt",
) -> int:
    """Return how many tokens a request may generate within the context window.

    With a prompt of N tokens and a window of W (`max_model_len`): N = 0 or N >= W is an
    error naming `prompt_param`. Otherwise the result is `requested`, or
    `default_max_tokens` when unset, clamped to the W - N positions left, so a request
    that asks for more ends early with finish_reason "length".
    """
    if num_prompt_tokens < 1:
        raise RequestValidationError(
            f"{prompt_param} must not be empty (it produced 0 prompt tokens)", param=prompt_param
        )
    if num_prompt_tokens >= max_model_len:
        raise RequestValidationError(
            f"prompt is {num_prompt_tokens} tokens, the context window is {max_model_len} tokens; "
            f"shorten the {prompt_param} to at most {max_model_len - 1} tokens so one token can be generated",
            param=prompt_param,
        )
    num_free_positions = max_model_len - num_prompt_tokens
    max_tokens = default_max_tokens if requested is None else requested
    return min(max_tokens, num_free_positions)

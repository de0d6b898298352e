"""Chat messages to prompt token ids, through the tokenizer's own chat template."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jinja2

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatFormatError(ValueError):
    """Invalid chat messages. `field` is the request field to fix, such as "messages[2].role"."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate OpenAI-style chat messages and return copies with string content.

    Content may be a string or a non-empty list of {"type": "text", "text": ...} parts.
    The parts' texts are joined with newlines. An assistant message that carries
    `tool_calls` may have missing or None content, which becomes "". Keys other than
    `content` are copied unchanged, so templates that read `name` or `tool_calls` see them.

    Raises:
        ChatFormatError: names the first invalid field.
    """
    if not isinstance(messages, list):
        raise ChatFormatError("messages", f"messages must be a list of message objects, got {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("messages", "messages must contain at least one message")
    return [_validate_message(index, message) for index, message in enumerate(messages)]


def _validate_message(index: int, message: Any) -> dict[str, Any]:
    field = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ChatFormatError(field, f"{field} must be an object with 'role' and 'content', got {type(message).__name__}")

    role = message.get("role")
    if role not in CHAT_ROLES:
        allowed = ", ".join(CHAT_ROLES)
        if role is None:
            raise ChatFormatError(f"{field}.role", f"{field}.role is missing. Expected one of: {allowed}")
        raise ChatFormatError(f"{field}.role", f"{field}.role {role!r} is invalid. Expected one of: {allowed}")

    content = message.get("content")
    if content is None:
        if role == "assistant" and message.get("tool_calls"):
            content = ""
        else:
            raise ChatFormatError(f"{field}.content", f"{field}.content is missing")
    elif isinstance(content, list):
        content = _join_text_parts(f"{field}.content", content)
    elif not isinstance(content, str):
        raise ChatFormatError(
            f"{field}.content",
            f"{field}.content must be a string or a list of text parts, got {type(content).__name__}",
        )

    return {**message, "content": content}


def _join_text_parts(field: str, parts: list[Any]) -> str:
    if not parts:
        raise ChatFormatError(field, f"{field} must contain at least one text part")
    texts = []
    for part_index, part in enumerate(parts):
        part_field = f"{field}[{part_index}]"
        if not isinstance(part, dict):
            raise ChatFormatError(
                part_field, f'{part_field} must be an object {{"type": "text", "text": ...}}, got {type(part).__name__}'
            )
        if part.get("type") != "text":
            raise ChatFormatError(
                f"{part_field}.type", f"{part_field}.type {part.get('type')!r} is not supported. Only 'text' parts are accepted"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatFormatError(f"{part_field}.text", f"{part_field}.text must be a string, got {type(text).__name__}")
        texts.append(text)
    return "\n".join(texts)


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
) -> str:
    """Validate the messages and render them as prompt text, special tokens included.

    Uses the tokenizer's chat template. "developer" messages are rendered as "system",
    because many open models' templates predate the developer role, and some reject
    roles they do not know.
    A tokenizer without a chat template gets a plain format, one "role: content" line
    per message followed by "assistant:" when `add_generation_prompt` is set. Base
    models have no template, and this format at least marks the turns.

    Raises:
        ChatFormatError: invalid messages, or the template rejected them (for example
            when its roles must alternate user/assistant).
    """
    normalized = validate_messages(messages)
    for message in normalized:
        if message["role"] == "developer":
            message["role"] = "system"

    if not has_chat_template(tokenizer):
        logger.debug("tokenizer %s has no chat template, so the plain 'role: content' format is used", tokenizer.name_or_path)
        return _render_plain(normalized, add_generation_prompt)

    try:
        text = tokenizer.apply_chat_template(normalized, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        raise ChatFormatError("messages", f"the model's chat template rejected the messages: {error}") from error
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = True,
) -> list[int]:
    """Validate the messages, render them with the chat template and return prompt token ids.

    The rendered text already contains the template's special tokens (its BOS, if it
    writes one), so it is encoded without the tokenizer's own special tokens. A BOS is
    prepended only when the tokenizer normally adds one and the text does not start
    with it, so BOS is never doubled and never dropped.

    Raises:
        ChatFormatError: invalid messages, or the template rejected them.
    """
    text = render_chat_text(tokenizer, messages, add_generation_prompt)
    token_ids = tokenizer.encode(text, add_special_tokens=False)

    bos_token_id = _added_bos_token_id(tokenizer)
    if bos_token_id is not None and token_ids[:1] != [bos_token_id]:
        token_ids = [bos_token_id, *token_ids]
    return token_ids


def _render_plain(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    lines = [f"{message['role']}: {message['content']}\n" for message in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "".join(lines)


def _added_bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """Return the BOS id if encoding with special tokens prepends it, else None.

    The tokenizer's behavior is probed because tokenizers signal it differently
    (an `add_bos_token` flag, a post-processor template, or neither).
    """
    bos_token_id = tokenizer.bos_token_id
    if bos_token_id is None:
        return None
    with_special_tokens = tokenizer.encode("a", add_special_tokens=True)
    without_special_tokens = tokenizer.encode("a", add_special_tokens=False)
    if with_special_tokens[:1] == [bos_token_id] and without_special_tokens[:1] != [bos_token_id]:
        return bos_token_id
    return None

"""Tokenizer-side pieces of serving: chat rendering, incremental detokenization, stop strings."""

from molten.tokenization.chat import (
    CHAT_ROLES,
    ChatFormatError,
    has_chat_template,
    render_chat,
    render_chat_text,
    validate_messages,
)
from molten.tokenization.detokenizer import IncrementalDetokenizer
from molten.tokenization.stop import StopStringMatcher

__all__ = [
    "CHAT_ROLES",
    "ChatFormatError",
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "has_chat_template",
    "render_chat",
    "render_chat_text",
    "validate_messages",
]

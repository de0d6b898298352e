"""Incremental detokenization: turn a stream of generated token ids into text deltas.

Decoding one token at a time goes wrong in two ways. A byte-level BPE token may hold
only part of a UTF-8 character (emoji and CJK characters often span two or three
tokens), and decoding it alone gives U+FFFD. Tokenizers whose decoder drops the leading
space of the first token (SentencePiece's Metaspace, for example) lose the space
between words if each token is decoded alone.

`IncrementalDetokenizer` therefore decodes a short window of tokens twice per step:
the tokens up to the last released position (the prefix) and the same tokens plus
the new ones. The text the new tokens add is the difference between the two decodes,
so decoder effects at the start of a window cancel out. The window slides forward
whenever the text is complete, which keeps the cost per token independent of the
output length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
"""U+FFFD, the character decoders produce for bytes that are not (yet) valid UTF-8."""

NUM_PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded before the first generated token. One token is enough to keep
the first token's leading space. The others cover prompts ending in special tokens
that decode to nothing when skipped (a chat template's `<|im_start|>assistant\\n`)."""

MAX_HELD_TOKENS = 32
"""Maximum number of tokens held while the text ends in U+FFFD. A UTF-8 character needs
at most four bytes, so a real partial character completes within a few tokens. A longer
run is invalid byte output, which is released so that the window stops growing."""


class IncrementalDetokenizer:
    """Text deltas for one sequence's generated tokens, one `add_token` call per token.

    The deltas concatenate to the text the generated tokens add after the prompt. For
    byte-level BPE tokenizers (GPT-2 style, such as SmolLM2's) that is exactly
    `tokenizer.decode(generated_ids, skip_special_tokens=...)` once the output ends on a
    complete character. For tokenizers whose decoder strips the first token's leading
    space, the first delta keeps the space the prompt implies ("is" + " Paris"), so it
    may start with one space more than decoding the generated ids alone. Call `flush()`
    after the last token to release text still held back.

    NOTE: byte-fallback decoders (SentencePiece models such as Llama 2) turn every byte
    of a run of byte tokens into U+FFFD when the run contains invalid UTF-8. On such
    output, characters released earlier in the run may differ from decode(). Valid
    UTF-8 output is unaffected.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens

        # Window layout over self._token_ids (prompt context, then generated tokens):
        #   [prefix_offset, read_offset)  tokens whose text was already released, kept
        #                                 as context for the decoder
        #   [read_offset, end)            tokens whose text is not complete yet
        # _released_end is how many characters of decode(token_ids[prefix_offset:])
        # have been released. It starts at the prefix text's length and grows inside a
        # window when text before an unfinished character is released early.
        num_context_tokens = min(len(prompt_token_ids), NUM_PROMPT_CONTEXT_TOKENS)
        self._token_ids: list[int] = list(prompt_token_ids[len(prompt_token_ids) - num_context_tokens :])
        self._num_context_tokens = num_context_tokens
        self._prefix_offset = 0
        self._read_offset = num_context_tokens
        self._released_end = 0
        self._measure_prefix()

    @property
    def num_generated_tokens(self) -> int:
        return len(self._token_ids) - self._num_context_tokens

    def add_token(self, token_id: int) -> str:
        """Append one generated token and return the text it makes visible.

        The delta is empty while the text ends in U+FFFD, because the next token may
        complete the character. Text before that tail is released at once.
        """
        self._token_ids.append(token_id)
        window_text = self._decode(self._token_ids[self._prefix_offset :])

        num_held_tokens = len(self._token_ids) - self._read_offset
        if window_text.endswith(REPLACEMENT_CHAR) and num_held_tokens <= MAX_HELD_TOKENS:
            stable_end = len(window_text.rstrip(REPLACEMENT_CHAR))
            if stable_end <= self._released_end:
                return ""
            delta = window_text[self._released_end : stable_end]
            self._released_end = stable_end
            return delta

        delta = window_text[self._released_end :]
        self._slide_window()
        return delta

    def flush(self) -> str:
        """Release text still held back (an unfinished character decodes as U+FFFD).

        Call it once when the sequence ends. Tokens added after a flush continue the
        text, but a character left unfinished at the flush stays U+FFFD.
        """
        if self._read_offset == len(self._token_ids):
            return ""
        window_text = self._decode(self._token_ids[self._prefix_offset :])
        delta = window_text[self._released_end :]
        self._slide_window()
        return delta

    def _slide_window(self) -> None:
        """Mark every token so far as released; the tokens just read become the prefix."""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        self._measure_prefix()

    def _measure_prefix(self) -> None:
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        # A prefix that ends inside a character (a prompt cut mid-character, or a
        # flushed or force-released tail) would be completed by the next tokens, and
        # its U+FFFD would turn into a character that was never released. Dropping
        # the prefix makes those bytes decode on their own, as they do in
        # tokenizer.decode(generated_ids).
        if prefix_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            prefix_text = ""
        self._released_end = len(prefix_text)

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

"""IncrementalDetokenizer against SmolLM2's byte-level BPE tokenizer and a Llama-style one."""

from __future__ import annotations

import random

import pytest

from molten.tokenization import IncrementalDetokenizer
from molten.tokenization.detokenizer import MAX_HELD_TOKENS, REPLACEMENT_CHAR

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 42 degrees, isn't it?",
    "accented": "Crème brûlée, naïve café, Ærøskøbing, São Paulo, Tiếng Việt có dấu, Łódź",
    "chinese": "我们今天去公园散步，天气非常好。机器学习很有意思！",
    "japanese": "東京は日本の首都です。ひらがなとカタカナ、そして漢字。",
    "korean": "안녕하세요, 만나서 반갑습니다. 한국어 텍스트입니다.",
    "emoji": "😀🎉🚀 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️‍🔥 🫠",
    "mixed": "Hello 世界! Café ☕ costs €3.50 — 😀 naïve 日本語 mixed with English.",
    "code": "def f(x):\n    return {'a': [1, 2, 3]}  # ← arrow\n\n\tif x != 0:\n        pass\n",
    "scripts": "مرحبا بالعالم שלום עולם नमस्ते दुनिया Привет, мир Γειά σου κόσμε",
    "symbols": "∀x ∈ ℝ: x² ≥ 0, ∑ᵢ aᵢ ≤ ∞, 𝔽𝕠𝕟𝕥 𝒮𝒸𝓇𝒾𝓅𝓉 ♠♣♥♦",
    "whitespace": "  leading and trailing spaces   \n\n\n tabs\t\there \r\n end ",
}


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    return [detokenizer.add_token(token_id) for token_id in token_ids]


def decode(tokenizer, token_ids: list[int], skip_special_tokens: bool = True) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_deltas_join_to_decoded_text(smollm2_tokenizer, name):
    token_ids = smollm2_tokenizer.encode(TEXTS[name])
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[])

    deltas = stream(detokenizer, token_ids)

    assert "".join(deltas) == decode(smollm2_tokenizer, token_ids)
    assert "".join(deltas) == TEXTS[name]
    assert detokenizer.flush() == ""
    assert detokenizer.num_generated_tokens == len(token_ids)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_deltas_never_hold_partial_characters(smollm2_tokenizer, name):
    token_ids = smollm2_tokenizer.encode(TEXTS[name])
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[])

    for index, delta in enumerate(stream(detokenizer, token_ids)):
        assert REPLACEMENT_CHAR not in delta, f"delta {index} is {delta!r}"


def test_emoji_split_across_tokens_is_held(smollm2_tokenizer):
    token_ids = smollm2_tokenizer.encode("😀")
    assert len(token_ids) == 3, "SmolLM2 splits this emoji into three byte tokens"

    deltas = stream(IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[]), token_ids)

    assert deltas == ["", "", "😀"]


def test_text_before_partial_character_is_released(smollm2_tokenizer):
    # " 日" encodes as " \xe6" + "\x97" + "\xa5": the first token carries the space
    # and the first byte of the character.
    token_ids = smollm2_tokenizer.encode(" 日")
    assert smollm2_tokenizer.convert_ids_to_tokens(token_ids)[0].startswith("Ġ")

    deltas = stream(IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[]), token_ids)

    assert deltas[0] == " "
    assert "".join(deltas) == " 日"


def test_leading_spaces_kept_between_tokens(smollm2_tokenizer):
    token_ids = smollm2_tokenizer.encode(" Hello world, how are you")

    deltas = stream(IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[]), token_ids)

    assert deltas == [" Hello", " world", ",", " how", " are", " you"]


def test_prompt_context_does_not_leak_into_output(smollm2_tokenizer):
    prompt_ids = smollm2_tokenizer.encode("The capital of France is")
    generated_ids = smollm2_tokenizer.encode(" Paris. 日本 😀")

    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt_ids)
    deltas = stream(detokenizer, generated_ids)

    assert deltas[0] == " Paris"
    assert "".join(deltas) == " Paris. 日本 😀"


def test_prompt_ending_mid_character_is_not_completed(smollm2_tokenizer):
    # The prompt contains the first two of the emoji's three tokens, so the generated
    # third byte is a lone continuation byte, as tokenizer.decode sees it too.
    emoji_ids = smollm2_tokenizer.encode("😀")
    generated_ids = emoji_ids[2:] + smollm2_tokenizer.encode(" ok")

    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=emoji_ids[:2])
    text = "".join(stream(detokenizer, generated_ids)) + detokenizer.flush()

    assert text == decode(smollm2_tokenizer, generated_ids)
    assert text == REPLACEMENT_CHAR + " ok"


def test_flush_releases_unfinished_character(smollm2_tokenizer):
    token_ids = smollm2_tokenizer.encode("ab 😀")[:-1]
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[])

    streamed = "".join(stream(detokenizer, token_ids))
    flushed = detokenizer.flush()

    assert streamed == "ab "
    assert flushed == REPLACEMENT_CHAR
    assert streamed + flushed == decode(smollm2_tokenizer, token_ids)
    assert detokenizer.flush() == ""


def test_tokens_after_flush_continue_text(smollm2_tokenizer):
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[])
    first_ids = smollm2_tokenizer.encode("Hello")
    second_ids = smollm2_tokenizer.encode(" world 日本")

    first = "".join(stream(detokenizer, first_ids)) + detokenizer.flush()
    second = "".join(stream(detokenizer, second_ids)) + detokenizer.flush()

    assert first == "Hello"
    assert second == " world 日本"


def test_special_tokens_skipped_by_default(smollm2_tokenizer):
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    token_ids = smollm2_tokenizer.encode("Hi 日") + [im_end] + smollm2_tokenizer.encode(" there")

    deltas = stream(IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[]), token_ids)

    assert "".join(deltas) == "Hi 日 there"
    assert "".join(deltas) == decode(smollm2_tokenizer, token_ids)


def test_special_tokens_kept_when_requested(smollm2_tokenizer):
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    token_ids = smollm2_tokenizer.encode("Hi") + [im_end]

    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[], skip_special_tokens=False)
    deltas = stream(detokenizer, token_ids)

    assert deltas == ["Hi", "<|im_end|>"]


def test_chat_prompt_ending_in_special_tokens(smollm2_tokenizer):
    prompt_ids = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = smollm2_tokenizer.encode(prompt_ids, add_special_tokens=False)
    generated_ids = smollm2_tokenizer.encode("Hello! 👋 How can I help?")

    deltas = stream(IncrementalDetokenizer(smollm2_tokenizer, prompt_ids), generated_ids)

    assert "".join(deltas) == "Hello! 👋 How can I help?"


class DecodeSpy:
    """Wrap a tokenizer and record how many ids each decode call receives."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, token_ids, **kwargs):
        self.window_sizes.append(len(token_ids))
        return self._tokenizer.decode(token_ids, **kwargs)


def test_decode_window_stays_small(smollm2_tokenizer):
    text = " ".join(TEXTS.values()) * 4
    token_ids = smollm2_tokenizer.encode(text)
    assert len(token_ids) > 1000
    spy = DecodeSpy(smollm2_tokenizer)

    detokenizer = IncrementalDetokenizer(spy, prompt_token_ids=token_ids[:50])
    deltas = stream(detokenizer, token_ids)

    assert "".join(deltas) == text
    # Prefix tokens plus tokens of one unfinished character (at most four bytes).
    assert max(spy.window_sizes) <= 8
    assert len(spy.window_sizes) <= 2 * len(token_ids) + 2


def test_invalid_byte_run_is_released_and_bounded(smollm2_tokenizer):
    # 218 is a lone UTF-8 continuation byte in SmolLM2's vocabulary, so every such
    # token decodes to U+FFFD and the text never ends on a complete character.
    continuation_byte = smollm2_tokenizer.encode("😀")[-1]
    token_ids = [continuation_byte] * 200 + smollm2_tokenizer.encode(" done")
    spy = DecodeSpy(smollm2_tokenizer)

    detokenizer = IncrementalDetokenizer(spy, prompt_token_ids=[])
    text = "".join(stream(detokenizer, token_ids)) + detokenizer.flush()

    assert text == decode(smollm2_tokenizer, token_ids)
    assert text == REPLACEMENT_CHAR * 200 + " done"
    assert max(spy.window_sizes) <= 2 * (MAX_HELD_TOKENS + 1)


def random_token_sequences(tokenizer, num_sequences: int, seed: int) -> list[list[int]]:
    """Slices of real encoded text, so they may start or end inside a character."""
    rng = random.Random(seed)
    encoded = [tokenizer.encode(text) for text in TEXTS.values()]
    sequences = []
    for _ in range(num_sequences):
        pieces = rng.sample(encoded, k=rng.randint(1, 3))
        token_ids = [token_id for piece in pieces for token_id in piece]
        start = rng.randrange(len(token_ids))
        end = rng.randint(start + 1, min(len(token_ids), start + 60))
        sequences.append(token_ids[start:end])
    return sequences


def test_random_sequences_match_decode(smollm2_tokenizer):
    for token_ids in random_token_sequences(smollm2_tokenizer, num_sequences=400, seed=1234):
        expected = decode(smollm2_tokenizer, token_ids)
        detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[])

        deltas = stream(detokenizer, token_ids)
        flushed = detokenizer.flush()

        assert "".join(deltas) + flushed == expected, token_ids
        if not expected.endswith(REPLACEMENT_CHAR):
            assert flushed == "", token_ids
        if REPLACEMENT_CHAR not in expected:
            assert all(REPLACEMENT_CHAR not in delta for delta in deltas), token_ids


def test_random_sequences_with_prompt_match_decode(smollm2_tokenizer):
    sequences = random_token_sequences(smollm2_tokenizer, num_sequences=400, seed=99)
    special_ids = smollm2_tokenizer.all_special_ids
    rng = random.Random(7)
    for prompt_ids, generated_ids in zip(sequences[::2], sequences[1::2]):
        # Special tokens between ordinary ones must decode to nothing, wherever they fall.
        generated_ids = list(generated_ids)
        generated_ids.insert(rng.randrange(len(generated_ids) + 1), rng.choice(special_ids))
        expected = decode(smollm2_tokenizer, generated_ids)
        detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt_ids)

        text = "".join(stream(detokenizer, generated_ids)) + detokenizer.flush()

        assert text == expected, (prompt_ids, generated_ids)


def test_llama_style_leading_space_follows_prompt(llama_style_tokenizer):
    prompt_ids = llama_style_tokenizer.encode("the answer is", add_special_tokens=False)
    # The normalizer prepends "▁", so "Paris" encodes as the model would emit it
    # after a word: "▁", "P", "a", ...
    generated_ids = llama_style_tokenizer.encode("Paris", add_special_tokens=False)

    detokenizer = IncrementalDetokenizer(llama_style_tokenizer, prompt_ids)
    text = "".join(stream(detokenizer, generated_ids))

    full_text = decode(llama_style_tokenizer, prompt_ids + generated_ids)
    assert text == " Paris"
    assert full_text == "the answer is" + text
    # Decoding the generated ids alone drops that space, because the decoder strips
    # the first token's leading space.
    assert decode(llama_style_tokenizer, generated_ids) == "Paris"


@pytest.mark.parametrize("name", ["english", "accented", "chinese", "emoji", "mixed"])
def test_llama_style_without_prompt_matches_decode(llama_style_tokenizer, name):
    # Byte fallback writes each unknown character as one token per UTF-8 byte, and a
    # partial run of byte tokens decodes to one U+FFFD per byte.
    token_ids = llama_style_tokenizer.encode(TEXTS[name], add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(llama_style_tokenizer, prompt_token_ids=[])

    deltas = stream(detokenizer, token_ids)

    assert "".join(deltas) == decode(llama_style_tokenizer, token_ids)
    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)
    assert detokenizer.flush() == ""


def test_llama_style_random_sequences_match_decode(llama_style_tokenizer):
    # Only valid UTF-8 is compared. The byte-fallback decoder turns every byte of a
    # run into U+FFFD when the run holds an invalid sequence, so text already
    # released can differ from decode() on invalid byte streams.
    sequences = random_token_sequences(llama_style_tokenizer, num_sequences=300, seed=5)
    valid_sequences = [ids for ids in sequences if REPLACEMENT_CHAR not in decode(llama_style_tokenizer, ids)]
    assert len(valid_sequences) >= 100

    for token_ids in valid_sequences:
        detokenizer = IncrementalDetokenizer(llama_style_tokenizer, prompt_token_ids=[])

        deltas = stream(detokenizer, token_ids)

        assert "".join(deltas) == decode(llama_style_tokenizer, token_ids), token_ids
        assert detokenizer.flush() == "", token_ids

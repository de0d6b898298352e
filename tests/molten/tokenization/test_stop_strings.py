"""StopStringMatcher on hand-picked and random splittings of text into deltas."""

from __future__ import annotations

import random

import pytest

from molten.tokenization import IncrementalDetokenizer, StopStringMatcher


def run_matcher(stop: list[str], deltas: list[str]) -> tuple[list[str], bool, str]:
    """Feed deltas until a stop string matches, then return (chunks, stopped, flushed text)."""
    matcher = StopStringMatcher(stop)
    chunks = []
    for delta in deltas:
        chunk, stopped = matcher.feed(delta)
        chunks.append(chunk)
        if stopped:
            return chunks, True, matcher.flush()
    return chunks, False, matcher.flush()


def expected_output(text: str, stop: list[str]) -> str:
    """Text before the stop string a character-by-character stream would see first.

    That is the match that ends first. On a tie the longer stop string, which starts
    earlier, wins.
    """
    best = None
    for stop_string in stop:
        start = text.find(stop_string)
        if start >= 0:
            candidate = (start + len(stop_string), start)
            best = candidate if best is None else min(best, candidate)
    return text if best is None else text[: best[1]]


def test_alphabet_stop_spanning_single_letter_deltas():
    # The prompt "Here is the English alphabet: ABC" is not fed to the matcher: stop
    # strings are matched on generated text only.
    matcher = StopStringMatcher(["DEFGHIJ"])
    results = [matcher.feed(letter) for letter in "DEFGHIJ"]

    assert results[:-1] == [("", False)] * 6
    assert results[-1] == ("", True)
    assert matcher.matched_stop == "DEFGHIJ"
    assert matcher.feed("K") == ("", True)
    assert matcher.flush() == ""


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([])

    assert matcher.feed("Hello") == ("Hello", False)
    assert matcher.feed("") == ("", False)
    assert matcher.feed(" world") == (" world", False)
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_stop_string_at_very_start():
    chunks, stopped, flushed = run_matcher(["Hello"], ["Hello world"])

    assert chunks == [""]
    assert stopped
    assert flushed == ""


def test_stop_string_split_at_very_start():
    chunks, stopped, _ = run_matcher(["Hello"], ["He", "l", "lo", " world"])

    assert chunks == ["", "", ""]
    assert stopped


def test_text_before_stop_is_released():
    chunks, stopped, _ = run_matcher(["</answer>"], ["The answer is 4.</ans", "wer> and more"])

    assert chunks == ["The answer is 4.", ""]
    assert stopped


def test_partial_match_released_when_broken():
    matcher = StopStringMatcher(["STOP"])

    assert matcher.feed("ST") == ("", False)
    assert matcher.held_text == "ST"
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("P?") == ("", True)

    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("STO") == ("", False)
    assert matcher.feed("RM") == ("STORM", False)
    assert matcher.held_text == ""


def test_flush_releases_held_text():
    matcher = StopStringMatcher(["\n\nUser:"])

    assert matcher.feed("Done.\n") == ("Done.", False)
    assert matcher.feed("\nUs") == ("", False)
    assert matcher.flush() == "\n\nUs"
    assert not matcher.stopped


def test_overlapping_candidate_restarts_inside_held_text():
    # After "aaa" the matcher must hold "aa", the longest suffix that starts "aab",
    # so that the final "b" completes the match at index 1.
    chunks, stopped, _ = run_matcher(["aab"], ["a", "a", "a", "b"])

    assert "".join(chunks) == "a"
    assert stopped


def test_self_overlapping_stop_string():
    chunks, stopped, _ = run_matcher(["abab"], ["ab", "ab", "ab"])

    assert "".join(chunks) == ""
    assert stopped

    chunks, stopped, flushed = run_matcher(["abab"], ["aba", "c", "aba"])
    assert "".join(chunks) == "abac"
    assert not stopped
    assert flushed == "aba"


def test_earliest_ending_stop_string_wins():
    # "bc" completes before "abcd" could, so a character stream stops at "bc".
    chunks, stopped, _ = run_matcher(["abcd", "bc"], ["abcd"])
    assert "".join(chunks) == "a"
    assert stopped

    matcher = StopStringMatcher(["abcd", "bc"])
    matcher.feed("abcd")
    assert matcher.matched_stop == "bc"


def test_longer_stop_string_wins_tie():
    matcher = StopStringMatcher(["end", "the end"])

    chunk, stopped = matcher.feed("and that was the end!")

    assert chunk == "and that was "
    assert stopped
    assert matcher.matched_stop == "the end"


def test_multiple_stop_strings_first_in_text_wins():
    chunks, stopped, _ = run_matcher(["###", "\n\n"], ["Answer: 1", "\n", "\nMore ###"])

    assert "".join(chunks) == "Answer: 1"
    assert stopped


def test_non_ascii_stop_strings():
    chunks, stopped, _ = run_matcher(["。终", "🛑"], ["好的", "。", "终止", "🛑"])

    assert "".join(chunks) == "好的"
    assert stopped


def test_empty_deltas_change_nothing():
    matcher = StopStringMatcher(["xyz"])

    assert matcher.feed("") == ("", False)
    assert matcher.feed("x") == ("", False)
    assert matcher.feed("") == ("", False)
    assert matcher.held_text == "x"


def test_duplicate_stop_strings_accepted():
    chunks, stopped, _ = run_matcher(["END", "END"], ["a", "EN", "D"])

    assert "".join(chunks) == "a"
    assert stopped


@pytest.mark.parametrize("stop", [[""], ["ok", ""], [None], [3]])
def test_invalid_stop_strings_rejected(stop):
    with pytest.raises(ValueError, match="non-empty strings"):
        StopStringMatcher(stop)


def test_single_string_instead_of_list_rejected():
    with pytest.raises(TypeError, match="list of strings"):
        StopStringMatcher("STOP")


def random_splitting(text: str, rng: random.Random) -> list[str]:
    """Cut text at random places, sometimes into empty or single-character deltas."""
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, len(text) + 2)))
    bounds = [0, *cuts, len(text)]
    return [text[start:end] for start, end in zip(bounds, bounds[1:])]


def test_random_text_and_splittings_match_oracle():
    rng = random.Random(2024)
    alphabet = "abc d\n日"
    num_stopped = 0
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stop = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        expected = expected_output(text, stop)
        deltas = random_splitting(text, rng)

        matcher = StopStringMatcher(stop)
        emitted = ""
        stopped = False
        for delta in deltas:
            chunk, stopped = matcher.feed(delta)
            emitted += chunk
            # Emitted text is always a prefix of the expected output, so no chunk ever
            # contains a character of the stop string that later matches.
            assert expected.startswith(emitted), (text, stop, deltas)
            if stopped:
                break
        if not stopped:
            emitted += matcher.flush()

        assert emitted == expected, (text, stop, deltas)
        assert stopped == any(stop_string in text for stop_string in stop), (text, stop, deltas)
        num_stopped += stopped

    # The alphabet is small, so both outcomes must be well represented.
    assert 500 < num_stopped < 2500


def test_random_splittings_match_character_stream():
    rng = random.Random(77)
    text = "The alphabet: ABCDEFGHIJKLMNOP. Then the end of the story, THE END.\n\nUser: hi"
    stops = [["DEFGHIJ"], ["END", "the end"], ["\n\nUser:"], ["ory", "story, T"], ["zzz"], ["E"]]
    for stop in stops:
        expected = expected_output(text, stop)
        for _ in range(200):
            chunks, _, flushed = run_matcher(stop, random_splitting(text, rng))

            assert "".join(chunks) + flushed == expected, stop


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["😀 END"], "Answer: 日本語 "),
        (["語"], "Answer: 日本"),
        (["本語 😀"], "Answer: 日"),
        (["nowhere"], "Answer: 日本語 😀 END of text"),
    ],
)
def test_stop_on_detokenized_byte_tokens(smollm2_tokenizer, stop, expected):
    # CJK characters and the emoji span several byte-level tokens, so the stop
    # strings complete only once the detokenizer releases whole characters.
    token_ids = smollm2_tokenizer.encode("Answer: 日本語 😀 END of text")
    detokenizer = IncrementalDetokenizer(smollm2_tokenizer, prompt_token_ids=[])
    matcher = StopStringMatcher(stop)

    chunks = []
    stopped = False
    for token_id in token_ids:
        chunk, stopped = matcher.feed(detokenizer.add_token(token_id))
        chunks.append(chunk)
        if stopped:
            break
    if not stopped:
        chunks.append(matcher.feed(detokenizer.flush())[0])
        chunks.append(matcher.flush())

    assert "".join(chunks) == expected
    assert stopped == (expected != "Answer: 日本語 😀 END of text")

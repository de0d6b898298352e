"""Stop strings matched on streamed text, so that no part of a stop string is emitted."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Filter a stream of text deltas and report when a stop string appears.

    Text is held back while a suffix of the text so far is a prefix of some stop
    string, because the next delta may complete it. When several stop strings occur,
    the one that ends first wins (the longer one on a tie), which is where a
    character-by-character stream would have stopped. That makes the result
    independent of how the text is split into deltas. Everything before the match is
    released, and the stop string and any text after it are dropped.
    """

    def __init__(self, stop: Sequence[str]):
        if isinstance(stop, str):
            raise TypeError(f"stop must be a list of strings, not a single string: {stop!r}")
        for stop_string in stop:
            if not isinstance(stop_string, str) or stop_string == "":
                raise ValueError(f"stop strings must be non-empty strings, got {stop_string!r}")

        self._stop_strings = tuple(dict.fromkeys(stop))
        # Every proper prefix of a stop string is text that might still become a match.
        self._partial_matches = frozenset(
            stop_string[:length] for stop_string in self._stop_strings for length in range(1, len(stop_string))
        )
        self._max_partial_len = max((len(s) for s in self._stop_strings), default=1) - 1
        self._held_text = ""
        self._matched_stop: str | None = None

    @property
    def stopped(self) -> bool:
        return self._matched_stop is not None

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the text, or None while none has matched."""
        return self._matched_stop

    @property
    def held_text(self) -> str:
        """Text received but not yet released, because it may start a stop string."""
        return self._held_text

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add a text delta and return (text safe to emit now, whether a stop string matched).

        After a match every later call returns ("", True).
        """
        if self.stopped:
            return "", True

        text = self._held_text + delta
        match = self._find_first_match(text)
        if match is not None:
            start, stop_string = match
            self._matched_stop = stop_string
            self._held_text = ""
            return text[:start], True

        hold_start = self._find_hold_start(text)
        self._held_text = text[hold_start:]
        return text[:hold_start], False

    def flush(self) -> str:
        """Release the held-back text, for when generation ends without a stop string."""
        released = self._held_text
        self._held_text = ""
        return released

    def _find_first_match(self, text: str) -> tuple[int, str] | None:
        """Return (start, stop string) of the match that ends first in `text`, if any.

        Only `text` needs searching. A match cannot start in text released earlier,
        because any suffix that could begin one was held back.
        """
        best: tuple[int, int, str] | None = None
        for stop_string in self._stop_strings:
            start = text.find(stop_string)
            if start < 0:
                continue
            end = start + len(stop_string)
            if best is None or (end, start) < (best[0], best[1]):
                best = (end, start, stop_string)
        if best is None:
            return None
        return best[1], best[2]

    def _find_hold_start(self, text: str) -> int:
        """Return where the longest suffix of `text` that could start a stop string begins."""
        for start in range(max(0, len(text) - self._max_partial_len), len(text)):
            if text[start:] in self._partial_matches:
                return start
        return len(text)

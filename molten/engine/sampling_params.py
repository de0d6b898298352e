"""Per-request decoding settings, validated once when a request is admitted."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """An invalid sampling setting. `field` is the request field to fix."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Ranges follow the OpenAI API where it defines the field; `top_k`, `min_p` and
    `repetition_penalty` follow transformers' meaning of the same names.
    """

    max_tokens: int = 16
    """Upper bound on generated tokens. The engine lowers it to what fits the context window."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; the most likely token is always kept."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables the filter."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top probability; 0 disables."""
    repetition_penalty: float = 1.0
    """Divide positive (multiply negative) logits of tokens already seen; 1 disables."""
    seed: int | None = None
    """Seed of this request's own generator, so its samples do not depend on batch mates."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; they are matched on decoded text and never returned."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation in addition to the model's EOS tokens."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks use this to fix the output length)."""
    logprobs: bool = False
    """Report the log-probability of each sampled token."""
    top_logprobs: int = 0
    """How many alternative tokens, with log-probabilities, to report per position (0-20)."""
    n: int = 1
    """Number of independent sequences to generate for the request."""
    beam_width: int = 1
    """Beams kept by beam search (1 to 20); 1 disables it. Beam search needs temperature 0
    and n = 1, ranks beams by the sum of their raw token logprobs, and returns the best beam."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise SamplingParamsError naming the first invalid field and its valid range."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check_finite("temperature", self.temperature)
        if self.temperature < 0:
            raise SamplingParamsError("temperature", f"temperature must be >= 0, got {self.temperature}")
        _check_finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingParamsError("top_k", f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        _check_finite("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check_finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise SamplingParamsError(
                "repetition_penalty", f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}"
            )
        if not 0 <= self.top_logprobs <= 20:
            raise SamplingParamsError("top_logprobs", f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.n < 1:
            raise SamplingParamsError("n", f"n must be an integer >= 1, got {self.n}")
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) or not 1 <= self.beam_width <= 20:
            raise SamplingParamsError("beam_width", f"beam_width must be an integer in [1, 20], got {self.beam_width!r}")
        if self.beam_width > 1 and (self.temperature != 0.0 or self.n != 1):
            raise SamplingParamsError(
                "beam_width", "beam search is deterministic and returns one sequence: set temperature to 0 and n to 1"
            )
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise SamplingParamsError("stop", "stop must contain only non-empty strings")


def _check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingParamsError(name, f"{name} must be a finite number, got {value!r}")

"""Beam search bookkeeping: which beams survive a step and which token each one takes.

The engine runs every beam as an ordinary sequence. After a beam's step it is parked
with its top `beam_width` raw logprobs. Once every beam of the request is parked,
`select_candidates` keeps the `beam_width` best (beam, token) pairs by cumulative
logprob. A beam chosen once continues in place. A beam chosen more than once is
forked, and the fork shares the beam's full KV blocks by reference count (see
`LLMEngine._expand_beams`). Beams never chosen are freed.

Every beam runs to `max_tokens`: an EOS or stop token does not end a beam early, and
the best beam's output is cut at its first stop when it is emitted. With EOS ignored
this is exactly the beam search of transformers' `generate(num_beams=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from molten.engine.sampler import SampledToken
from molten.engine.sampling_params import SamplingParams
from molten.engine.sequence import Sequence


@dataclass
class Beam:
    seq: Sequence
    score: float = 0.0
    """Sum of the raw logprobs of the beam's generated tokens."""
    pending: SampledToken | None = None
    """The step's result (with top logprobs) while the beam waits for its siblings."""


@dataclass
class BeamGroup:
    request_id: str
    params: SamplingParams
    """The request's own settings (the beams run with top logprobs switched on)."""
    beams: list[Beam] = field(default_factory=list)
    """Live beams, best score first after each expansion."""

    @property
    def beam_width(self) -> int:
        return self.params.beam_width

    @property
    def is_ready(self) -> bool:
        return all(beam.pending is not None for beam in self.beams)


def select_candidates(group: BeamGroup) -> list[tuple[Beam, int, float]]:
    """Return the `beam_width` best (beam, token id, new score) extensions, best first.

    Ties keep the earlier beam and then the more likely token, since the sort is stable
    and each beam's top logprobs arrive in descending order.
    """
    candidates = []
    for beam in group.beams:
        for token_id, logprob in beam.pending.top_logprobs:
            candidates.append((beam, token_id, beam.score + logprob))
    candidates.sort(key=lambda candidate: -candidate[2])
    return candidates[: group.beam_width]

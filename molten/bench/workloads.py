"""Workload sizes and the request lists every system is given.

Prompts are random token ids from a seeded generator, drawn above the first
`FIRST_PROMPT_TOKEN_ID` ids so that no special token (BOS, EOS, chat markers) lands in
a prompt. Their content does not change the cost of a forward pass, and every system
is asked to ignore EOS, so each request generates exactly `max_tokens` tokens.

Lengths and arrival times come from `seed` alone. A non-empty `salt` changes only the
token ids: runs against one long-lived engine (the served doors) use a salt per run,
so a later run cannot take its prompts' KV blocks from the prefix cache that an
earlier run filled, and still does the same work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from molten.bench.metrics import RequestSpec

FIRST_PROMPT_TOKEN_ID = 256
"""Lowest token id drawn into prompts; SmolLM2's special tokens sit below it."""


@dataclass(frozen=True)
class WorkloadSizes:
    """Request counts and token lengths of every workload. `full()` is the protocol's."""

    repeats: int
    """Measured runs of the single-stream workload; the median run is reported."""
    single_prompt_len: int
    single_new_tokens: int
    concurrent_requests: int
    concurrent_prompt_lens: tuple[int, int]
    """Inclusive range the concurrent prompt lengths are drawn from."""
    concurrent_new_tokens: int
    poisson_rate_per_s: float
    """Mean arrival rate of the Poisson-arrival variant of the concurrent workload."""
    static_batch_size: int
    """Batch size of transformers' static-batch generate() on the concurrent workload."""
    sweep_batch_sizes: tuple[int, ...]
    """Concurrency levels of the throughput-against-batch-size sweep."""
    sweep_prompt_len: int
    sweep_new_tokens: int
    shared_prefix_requests: int
    shared_prefix_len: int
    shared_suffix_len: int
    shared_new_tokens: int
    long_context_max_len: int | None
    """Maximum prompt length of the context-length sweep; None goes up to max_model_len."""
    long_context_new_tokens: int
    interference_streams: int
    """Short requests decoding while long prompts arrive."""
    interference_new_tokens: int
    interference_long_prompts: int
    interference_long_len: int
    interference_first_arrival_s: float
    interference_arrival_gap_s: float
    interference_chunk_budgets: tuple[int, ...]
    """Token budgets per step (decode tokens plus the prefill chunk) of the chunked-prefill runs.

    The first is the scheduler's default. A step's time grows with its chunk, so the
    smaller budgets show how far the chunk must shrink for the ITL tail to stay near
    the plain decode step."""

    @classmethod
    def full(cls) -> WorkloadSizes:
        return cls(
            repeats=3,
            single_prompt_len=128,
            single_new_tokens=128,
            concurrent_requests=32,
            concurrent_prompt_lens=(32, 1024),
            concurrent_new_tokens=128,
            poisson_rate_per_s=1.0,
            static_batch_size=16,
            sweep_batch_sizes=(1, 4, 16, 32),
            sweep_prompt_len=128,
            sweep_new_tokens=128,
            shared_prefix_requests=32,
            shared_prefix_len=512,
            shared_suffix_len=64,
            shared_new_tokens=128,
            long_context_max_len=None,
            long_context_new_tokens=32,
            interference_streams=8,
            interference_new_tokens=128,
            interference_long_prompts=3,
            interference_long_len=2048,
            interference_first_arrival_s=2.0,
            interference_arrival_gap_s=2.0,
            interference_chunk_budgets=(512, 128, 64, 40),
        )

    @classmethod
    def quick(cls) -> WorkloadSizes:
        """Fewer requests and shorter outputs, sized to finish in minutes on two CPU cores."""
        return cls(
            repeats=3,
            single_prompt_len=128,
            single_new_tokens=32,
            concurrent_requests=8,
            concurrent_prompt_lens=(32, 256),
            concurrent_new_tokens=16,
            poisson_rate_per_s=4.0,
            static_batch_size=4,
            sweep_batch_sizes=(1, 4, 8),
            sweep_prompt_len=64,
            sweep_new_tokens=16,
            shared_prefix_requests=8,
            shared_prefix_len=512,
            shared_suffix_len=32,
            shared_new_tokens=8,
            long_context_max_len=1024,
            long_context_new_tokens=8,
            interference_streams=8,
            interference_new_tokens=32,
            interference_long_prompts=2,
            interference_long_len=512,
            interference_first_arrival_s=1.0,
            interference_arrival_gap_s=1.0,
            interference_chunk_budgets=(512, 128, 40),
        )


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_PROMPT_TOKEN_ID, vocab_size) for _ in range(length)]


def content_rng(seed: int, salt: str) -> random.Random:
    """The generator of prompt token ids: `seed` alone without a salt, else seed and salt together."""
    return random.Random(f"{seed}/{salt}" if salt else seed)


def single_requests(sizes: WorkloadSizes, vocab_size: int, seed: int, salt: str = "") -> list[RequestSpec]:
    rng = content_rng(seed, salt)
    return [RequestSpec(random_prompt(rng, sizes.single_prompt_len, vocab_size), sizes.single_new_tokens)]


def concurrent_requests(
    sizes: WorkloadSizes, vocab_size: int, seed: int, *, poisson: bool, salt: str = ""
) -> list[RequestSpec]:
    """Build the concurrent workload: all requests at t=0, or Poisson arrivals at `poisson_rate_per_s`.

    Prompt lengths and arrival gaps come from separate generators, so both variants get
    the same prompts.
    """
    length_rng = random.Random(seed)
    token_rng = content_rng(seed, salt)
    arrival_rng = random.Random(seed + 1)
    low, high = sizes.concurrent_prompt_lens
    requests = []
    arrival_s = 0.0
    for index in range(sizes.concurrent_requests):
        prompt = random_prompt(token_rng, length_rng.randint(low, high), vocab_size)
        if poisson and index > 0:
            arrival_s += arrival_rng.expovariate(sizes.poisson_rate_per_s)
        requests.append(RequestSpec(prompt, sizes.concurrent_new_tokens, arrival_s))
    return requests


def sweep_requests(
    sizes: WorkloadSizes, vocab_size: int, seed: int, batch_size: int, salt: str = ""
) -> list[RequestSpec]:
    """`batch_size` equal-length prompts arriving together, for the throughput-against-batch-size sweep."""
    rng = content_rng(seed, salt)
    return [
        RequestSpec(random_prompt(rng, sizes.sweep_prompt_len, vocab_size), sizes.sweep_new_tokens)
        for _ in range(batch_size)
    ]


def shared_prefix_requests(sizes: WorkloadSizes, vocab_size: int, seed: int) -> list[RequestSpec]:
    """Requests arriving together whose prompts share one system prompt and differ after it."""
    rng = random.Random(seed)
    system_prompt = random_prompt(rng, sizes.shared_prefix_len, vocab_size)
    return [
        RequestSpec(system_prompt + random_prompt(rng, sizes.shared_suffix_len, vocab_size), sizes.shared_new_tokens)
        for _ in range(sizes.shared_prefix_requests)
    ]


def context_lengths(sizes: WorkloadSizes, max_model_len: int) -> list[int]:
    """Prompt lengths 256, 512, 1024, ... up to the longest that leaves room for the new tokens."""
    longest = max_model_len - sizes.long_context_new_tokens - 1
    if sizes.long_context_max_len is not None:
        longest = min(longest, sizes.long_context_max_len)
    lengths = []
    length = 256
    while length < longest:
        lengths.append(length)
        length *= 2
    if longest >= 1 and (not lengths or lengths[-1] != longest):
        lengths.append(longest)
    return lengths


def context_request(sizes: WorkloadSizes, vocab_size: int, seed: int, length: int) -> RequestSpec:
    rng = random.Random(seed + length)
    return RequestSpec(random_prompt(rng, length, vocab_size), sizes.long_context_new_tokens)


def interference_requests(sizes: WorkloadSizes, vocab_size: int, seed: int, max_model_len: int) -> list[RequestSpec]:
    """Short requests that start decoding at t=0, and long prompts that arrive while they decode.

    The short ones are tagged `decode`, the long ones `long`.
    NOTE: the long prompts arrive at fixed times. On a machine fast enough to finish the
    decoding streams before the first arrival, nothing overlaps and the ITL tail shows
    no interference.
    """
    rng = random.Random(seed)
    requests = []
    for _ in range(sizes.interference_streams):
        short_prompt = random_prompt(rng, sizes.single_prompt_len, vocab_size)
        requests.append(RequestSpec(short_prompt, sizes.interference_new_tokens, tag="decode"))
    long_len = min(sizes.interference_long_len, max_model_len - 2)
    for index in range(sizes.interference_long_prompts):
        arrival_s = sizes.interference_first_arrival_s + index * sizes.interference_arrival_gap_s
        requests.append(RequestSpec(random_prompt(rng, long_len, vocab_size), 1, arrival_s=arrival_s, tag="long"))
    return requests

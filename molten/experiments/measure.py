"""Running the engine in-process for the stages: building engines, prompts, and timed runs.

Timings are taken in this process when `LLMEngine.step()` returns, which is when a
caller of the engine could first see a token. No serving layer is involved, so the
figures are the engine's own cost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from molten.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams
from molten.models import LoadedModel, load_model

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""Receives one human-readable line per step of a long run."""

PROMPT_TEXT = (
    "An inference engine turns a prompt into tokens one step at a time. Each decode step reads every "
    "weight of the model once and appends one token per sequence, while the key and value vectors of "
    "earlier tokens wait in a paged cache so that attention never recomputes them. "
)
"""Plain English text repeated to build prompts of any length, so tokens look like real input."""


class ExperimentTimeoutError(TimeoutError):
    """A stage's engine run did not finish within its time limit."""


def no_progress(message: str) -> None:
    del message


def load_for_experiment(model: str, dtype: str, progress: Progress) -> LoadedModel:
    """Load `model` in `dtype` (a torch dtype name such as "float32"), reporting each stage to `progress`."""
    return load_model(model, dtype=getattr(torch, dtype), progress=progress)


def build_engine(
    loaded: LoadedModel,
    *,
    dtype: str,
    max_model_len: int,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 4096,
    kv_cache_mib: int = 256,
    enable_prefix_caching: bool = False,
    speculative: SpeculativeConfig | None = None,
) -> LLMEngine:
    """Build an engine for one measurement.

    Prefix caching is off by default, so every prompt token is computed and the figures
    show the full cost. `max_num_batched_tokens` defaults high so a prompt fits one step.
    """
    config = EngineConfig(
        model=loaded.model_id,
        dtype=dtype,
        max_model_len=max_model_len,
        cache=CacheConfig(kv_cache_memory_mib=kv_cache_mib, enable_prefix_caching=enable_prefix_caching),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_num_batched_tokens, max_model_len),
            max_num_waiting=max(256, max_num_seqs),
        ),
        speculative=speculative or SpeculativeConfig(),
    )
    return LLMEngine(config, loaded)


def make_prompt(tokenizer, num_tokens: int, variant: int = 0) -> list[int]:
    """Return exactly `num_tokens` token ids of English text; different `variant`s differ in their first token."""
    if num_tokens < 1:
        raise ValueError(f"a prompt needs at least 1 token, got {num_tokens}")
    base = tokenizer.encode(PROMPT_TEXT, add_special_tokens=False)
    repeats = num_tokens // len(base) + 2
    tokens = [*tokenizer.encode(f"Request {variant}:", add_special_tokens=False), *(base * repeats)]
    return tokens[:num_tokens]


def fixed_length_params(max_tokens: int) -> SamplingParams:
    """Greedy decoding of exactly `max_tokens` tokens (EOS ignored), so every run does the same work."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@dataclass
class RequestTiming:
    """Timings of one request, in `time.perf_counter()` seconds."""

    num_prompt_tokens: int
    sent_time: float
    token_times: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    @property
    def ttft_ms(self) -> float:
        return (self.token_times[0] - self.sent_time) * 1000

    @property
    def itl_ms(self) -> list[float]:
        """Gaps between consecutive tokens, in milliseconds."""
        return [(later - earlier) * 1000 for earlier, later in zip(self.token_times, self.token_times[1:])]


@dataclass
class StepTiming:
    duration_ms: float
    batch_size: int
    num_prefill_tokens: int
    """Prompt tokens computed in the step; 0 for a step of decodes only."""
    num_blocks_used: int
    """KV blocks held by sequences after the step."""


@dataclass
class RunResult:
    requests: list[RequestTiming]
    steps: list[StepTiming]
    wall_s: float
    """Time from adding the first request to the last token."""

    @property
    def num_output_tokens(self) -> int:
        return sum(len(request.token_times) for request in self.requests)

    @property
    def peak_blocks_used(self) -> int:
        return max((step.num_blocks_used for step in self.steps), default=0)


def run_requests(
    engine: LLMEngine,
    prompts: list[list[int]],
    max_tokens: int,
    time_limit_s: float,
    *,
    params: SamplingParams | None = None,
) -> RunResult:
    """Add every prompt at once, step until all finish, and return the timings.

    Raises ExperimentTimeoutError past `time_limit_s`; the engine is left empty either way.
    """
    sampling = params or fixed_length_params(max_tokens)
    request_ids = [f"experiment-{time.monotonic_ns()}-{index}" for index in range(len(prompts))]
    timings: dict[str, RequestTiming] = {}
    steps: list[StepTiming] = []
    started = time.perf_counter()
    deadline = started + time_limit_s
    try:
        for request_id, prompt in zip(request_ids, prompts):
            timings[request_id] = RequestTiming(len(prompt), time.perf_counter())
            engine.add_request(request_id, prompt, sampling)
        while engine.has_unfinished():
            if time.perf_counter() > deadline:
                raise ExperimentTimeoutError(
                    f"{len(prompts)} requests of {max_tokens} tokens did not finish within {time_limit_s:.0f} s; "
                    "use --quick or smaller settings"
                )
            step_started = time.perf_counter()
            events = engine.step()
            stepped = time.perf_counter()
            steps.append(step_timing(engine, (stepped - step_started) * 1000))
            for event in events:
                timing = timings[event.request_id]
                timing.token_times.append(stepped)
                timing.token_ids.append(event.token_id)
    finally:
        for request_id in request_ids:
            engine.abort_request(request_id)
    return RunResult([timings[request_id] for request_id in request_ids], steps, time.perf_counter() - started)


def step_timing(engine: LLMEngine, duration_ms: float) -> StepTiming:
    """Describe the step `engine` just ran, which took `duration_ms`."""
    scheduled = engine.last_step
    manager = engine.block_manager
    return StepTiming(
        duration_ms=duration_ms,
        batch_size=len(scheduled.scheduled) if scheduled is not None else 0,
        num_prefill_tokens=scheduled.num_prefill_tokens if scheduled is not None else 0,
        num_blocks_used=manager.num_blocks - manager.num_free_blocks,
    )


def warm_up(engine: LLMEngine, tokenizer) -> None:
    """Run one short request so first-call costs (allocations, kernel selection) stay out of the figures."""
    run_requests(engine, [make_prompt(tokenizer, 8, variant=999)], max_tokens=2, time_limit_s=300)


def median(values: list[float]) -> float:
    if not values:
        raise ValueError("median of an empty list is undefined")
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def measure_copy_bandwidth_gb_per_s(num_bytes: int, repeats: int = 3) -> float:
    """Return the best copy rate of a float32 tensor of `num_bytes` bytes, counting bytes read plus written, in GB/s.

    A decode step at batch 1 reads every weight once, so this rate over the weight bytes
    is the single-stream ceiling in tokens/s.
    """
    source = torch.ones(max(1, num_bytes // 4), dtype=torch.float32)
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best / 1e9


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """Return K and V bytes one token takes in the cache: 2 x layers x KV heads x head_dim x dtype bytes."""
    config = loaded.config
    num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * num_kv_heads * head_dim * loaded.dtype.itemsize


def kv_cache_mib_for(loaded: LoadedModel, num_tokens: int) -> int:
    """Return a KV pool size in MiB that fits `num_tokens` tokens, plus 8 MiB of slack."""
    return max(8, num_tokens * kv_bytes_per_token(loaded) // 2**20 + 8)

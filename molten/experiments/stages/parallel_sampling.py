"""Stage 7: KV memory of parallel sampling (n completions of one prompt).

The n sequences of a request share their prompt, so its K and V need to be stored only
once. This stage measures the peak KV blocks of n completions of one prompt in four
ways. Three run n separate engine requests: without the prefix cache, with it and all n
admitted together, and with it and the first request prefilled before the others join.
The fourth is one engine request with `n` set, which the engine forks once the prompt
is computed (`LLMEngine._fork`): the children share the parent's prompt blocks by
reference count.

The stage also reports the ratio the fork is judged by: the peak KV of one `n` request
over that of n independent requests without the prefix cache. By default (a 512-token
prompt, n = 4, 32 tokens each) the target is at most 40 %.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from molten.engine.block_manager import BlockManager
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams
from molten.experiments.measure import (
    ExperimentTimeoutError,
    Progress,
    build_engine,
    kv_cache_mib_for,
    load_for_experiment,
    make_prompt,
    warm_up,
)
from molten.experiments.plotting import two_panel_plot
from molten.experiments.stages.base import Stage, StageResult, check_positive

logger = logging.getLogger(__name__)

NO_PREFIX_CACHE = "no prefix cache"
TOGETHER = "prefix cache, together"
STAGGERED = "prefix cache, staggered"
FORKED = "forked in the engine"
MODES = (NO_PREFIX_CACHE, TOGETHER, STAGGERED, FORKED)


@dataclass
class ParallelSamplingSettings:
    model: str = "smollm2-135m-instruct"
    """Model to run (catalog name, directory, .gguf file or hub id)."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    n_values: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Numbers of completions of the one prompt, one run per value and mode. The summary reports the largest."""
    prompt_tokens: int = 512
    """Prompt length in tokens."""
    max_tokens: int = 32
    """Tokens each completion generates (EOS is ignored)."""
    time_limit_s: float = 900.0
    """Seconds after which one run is stopped with an error."""

    def validate(self) -> None:
        check_positive("n_values", self.n_values)
        check_positive("prompt_tokens", self.prompt_tokens)
        check_positive("max_tokens", self.max_tokens)


QUICK = {"model": "tiny-random-llama", "n_values": [1, 2, 4], "prompt_tokens": 64, "max_tokens": 8}

COLUMNS = [
    "n",
    f"peak blocks, {NO_PREFIX_CACHE}",
    f"peak blocks, {TOGETHER}",
    f"peak blocks, {STAGGERED}",
    f"peak blocks, {FORKED}",
    f"peak KV MiB, {NO_PREFIX_CACHE}",
    f"peak KV MiB, {FORKED}",
    "peak KV ratio, forked / no prefix cache",
]

TARGET_RATIO = 0.40
"""Largest share of the KV memory of four independent requests that one forked request of
n = 4 on a 512-token prompt may use. Longer outputs raise the ratio, because each sequence's own
blocks grow while the shared prompt stays the same size."""


def sampling_params(settings: ParallelSamplingSettings, n: int) -> SamplingParams:
    """Seeded sampling at temperature 1, so the n completions differ as they would in use."""
    return SamplingParams(max_tokens=settings.max_tokens, temperature=1.0, seed=0, ignore_eos=True, n=n)


def run(settings: ParallelSamplingSettings, progress: Progress) -> StageResult:
    loaded = load_for_experiment(settings.model, settings.dtype, progress)
    max_model_len = settings.prompt_tokens + settings.max_tokens + 1
    max_n = max(settings.n_values)
    prompt = make_prompt(loaded.tokenizer, settings.prompt_tokens)

    def engine(prefix_caching: bool) -> LLMEngine:
        built = build_engine(
            loaded, dtype=settings.dtype, max_model_len=max_model_len, max_num_seqs=max_n,
            max_num_batched_tokens=max_n * settings.prompt_tokens,
            kv_cache_mib=kv_cache_mib_for(loaded, max_n * (max_model_len + 32)),
            enable_prefix_caching=prefix_caching,
        )
        warm_up(built, loaded.tokenizer)
        return built

    rows = []
    for n in sorted(settings.n_values):
        peaks = []
        for mode in MODES:
            progress(f"n={n}: {mode}")
            built = engine(prefix_caching=mode in (TOGETHER, STAGGERED))
            peaks.append(_peak_blocks(built, prompt, n, mode, settings))
        block_bytes = built.kv_cache.spec.bytes_per_block
        rows.append([
            n,
            *peaks,
            round(peaks[0] * block_bytes / 2**20, 3),
            round(peaks[3] * block_bytes / 2**20, 3),
            round(peaks[3] / peaks[0], 3),
        ])

    last = rows[-1]
    kv_block_size = built.facts.kv_block_size
    summary = {
        "kv_block_size": kv_block_size,
        "kv_bytes_per_block": block_bytes,
        f"peak_blocks_no_sharing_n{last[0]}": last[1],
        f"peak_blocks_staggered_n{last[0]}": last[3],
        f"peak_blocks_forked_n{last[0]}": last[4],
        "saving_forked_vs_no_sharing": round(1 - last[4] / last[1], 3) if last[1] else 0.0,
        f"kv_ratio_forked_vs_independent_n{last[0]}": last[7],
        "target_ratio": TARGET_RATIO,
        "target_met": last[7] <= TARGET_RATIO,
    }
    plot = two_panel_plot(
        "Parallel sampling: peak KV blocks for n completions of one prompt",
        "n (completions)",
        [row[0] for row in rows],
        ("peak KV blocks", {mode: [row[1 + index] for row in rows] for index, mode in enumerate(MODES)}),
        ("peak KV MiB", {NO_PREFIX_CACHE: [row[5] for row in rows], FORKED: [row[6] for row in rows]}),
    )

    prompt_blocks = settings.prompt_tokens // kv_block_size
    explanation = (
        "## What this measures\n\n"
        f"n completions of one {settings.prompt_tokens}-token prompt, {settings.max_tokens} tokens each "
        "(temperature 1, seeded), through `LLMEngine` in-process. The figure is the most KV blocks in use "
        "at once, read after every block allocation. A sequence that finishes frees its blocks inside "
        "the step, so a reading after each step would miss the last step's blocks.\n\n"
        "- **no prefix cache**: n separate requests, each storing its own copy of the prompt's K and V.\n"
        "- **prefix cache, together**: n separate requests admitted in the same step. Prompt blocks are "
        "hashed only after they are computed, so no request finds another's blocks and nothing is shared.\n"
        "- **prefix cache, staggered**: the first request is prefilled, then the others join and reuse its "
        f"full prompt blocks (up to {prompt_blocks}) from the prefix cache. The block holding the prompt's last "
        "token is not reused, because the engine computes that token again to get the logits of the first "
        "output token (`BlockManager.match_prefix`).\n"
        "- **forked in the engine**: one request with `n` set. Once its prompt is computed the engine forks "
        "n - 1 children that share the prompt blocks by reference count and copy only the block holding the "
        "last prompt token, which each child recomputes (copy-on-write at the fork).\n\n"
        "## What to expect, and why\n\n"
        "Without sharing, KV memory grows as n x (prompt + output). With sharing it grows as "
        "prompt + n x output, so the saving is largest for long prompts and short answers. "
        f"Here, at n={last[0]}, the forked request held {last[4]} blocks against {last[1]} without "
        f"sharing ({summary['saving_forked_vs_no_sharing']:.0%} less), and the staggered prefix cache {last[3]}. "
        f"The forked request used {last[7]:.1%} of the KV memory of {last[0]} independent requests, against "
        f"a target of at most {TARGET_RATIO:.0%} (set for n = 4 and a 512-token prompt): target "
        f"{'met' if summary['target_met'] else 'missed'}."
    )
    return StageResult(summary, COLUMNS, rows, plot, explanation)


def _peak_blocks(engine: LLMEngine, prompt: list[int], n: int, mode: str, settings: ParallelSamplingSettings) -> int:
    """Run n completions of `prompt` in `mode` and return the most KV blocks in use at any moment."""
    if mode == FORKED:
        requests = [(f"parallel-{time.monotonic_ns()}", sampling_params(settings, n))]
    else:
        # Separate requests get seeds 0..n-1, as the router gives the requests of a fan-out.
        base = sampling_params(settings, 1)
        requests = [
            (f"parallel-{time.monotonic_ns()}-{index}", dataclasses.replace(base, seed=index))
            for index in range(n)
        ]
    deadline = time.perf_counter() + settings.time_limit_s
    peak = PeakBlocks(engine.block_manager)
    pending = list(requests)

    def add_next() -> None:
        request_id, params = pending.pop(0)
        engine.add_request(request_id, prompt, params)

    try:
        add_next()
        if mode != STAGGERED:
            while pending:
                add_next()
        while engine.has_unfinished() or pending:
            if time.perf_counter() > deadline:
                raise ExperimentTimeoutError(f"n={n} ({mode}) did not finish within {settings.time_limit_s:.0f} s; use --quick")
            events = engine.step()
            if pending and events:
                # The first request's prompt is computed and its full blocks are in the prefix cache.
                while pending:
                    add_next()
    finally:
        for request_id, _ in requests:
            engine.abort_request(request_id)
        peak.stop()
    return peak.value


class PeakBlocks:
    """The most KV blocks a block manager has had in use, read after every allocation.

    It wraps the manager's `allocate_slots` (the scheduler's per-step growth) and
    `allocate_block` (the fork's copies) on this one instance, until `stop`.
    """

    def __init__(self, manager: BlockManager):
        self.manager = manager
        self.value = manager.num_blocks - manager.num_free_blocks
        manager.allocate_slots = self._counted(manager.allocate_slots)
        manager.allocate_block = self._counted(manager.allocate_block)

    def _counted(self, method: Callable) -> Callable:
        def counted(*args, **kwargs):
            result = method(*args, **kwargs)
            self.value = max(self.value, self.manager.num_blocks - self.manager.num_free_blocks)
            return result

        return counted

    def stop(self) -> None:
        """Restore the manager's own methods."""
        del self.manager.allocate_slots
        del self.manager.allocate_block


STAGE = Stage(
    number=7,
    name="parallel-sampling",
    title="Parallel sampling memory",
    question="How much KV memory do n completions of one prompt take, and how much can they share?",
    settings_class=ParallelSamplingSettings,
    quick_overrides=QUICK,
    run=run,
)

"""Stage 7: KV memory of parallel sampling (n completions of one prompt).

The n sequences of a request share their prompt, so its K and V need to be stored only
once. Molten's engine takes one sequence per request: `n > 1` is fanned out into n
engine requests, which share the prompt's full KV blocks only through the prefix cache,
and only once the first of them has computed those blocks. This stage measures the peak
KV blocks of that path in three ways: without the prefix cache, with it and all n
admitted together, and with it and the first sequence prefilled before the others join.
It sets them beside the arithmetic for forking inside the engine, which Molten does not do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from molten.engine.llm_engine import LLMEngine
from molten.experiments.measure import (
    ExperimentTimeoutError,
    Progress,
    build_engine,
    fixed_length_params,
    kv_cache_mib_for,
    load_for_experiment,
    make_prompt,
    warm_up,
)
from molten.experiments.plotting import two_panel_plot
from molten.experiments.stages.base import Stage, StageResult, check_positive

logger = logging.getLogger(__name__)

MODES = ("no prefix cache", "prefix cache, together", "prefix cache, staggered")


@dataclass
class ParallelSamplingSettings:
    model: str = "smollm2-135m-instruct"
    """Model to run (catalog name, directory, .gguf file or hub id)."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    n_values: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Numbers of completions of the one prompt, one run per value and mode."""
    prompt_tokens: int = 256
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
    "peak blocks, no prefix cache",
    "peak blocks, prefix cache, together",
    "peak blocks, prefix cache, staggered",
    "blocks if forked in the engine (arithmetic)",
    "peak KV MiB, no prefix cache",
    "peak KV MiB, staggered",
]


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
    block_bytes = 0
    for n in sorted(settings.n_values):
        peaks = []
        for mode in MODES:
            progress(f"n={n}: {mode}")
            built = engine(prefix_caching=mode != MODES[0])
            block_bytes = built.kv_cache.spec.bytes_per_block
            peaks.append(_peak_blocks(built, prompt, n, staggered=mode == MODES[2], settings=settings))
        kv_block_size = built.facts.kv_block_size
        rows.append([
            n,
            *peaks,
            _forked_blocks(settings.prompt_tokens, settings.max_tokens, n, kv_block_size),
            round(peaks[0] * block_bytes / 2**20, 3),
            round(peaks[2] * block_bytes / 2**20, 3),
        ])
    last = rows[-1]
    summary = {
        "kv_block_size": kv_block_size,
        "kv_bytes_per_block": block_bytes,
        f"peak_blocks_no_sharing_n{last[0]}": last[1],
        f"peak_blocks_staggered_n{last[0]}": last[3],
        f"blocks_forked_arithmetic_n{last[0]}": last[4],
        "saving_staggered_vs_no_sharing": round(1 - last[3] / last[1], 3) if last[1] else 0.0,
    }
    plot = two_panel_plot(
        "Parallel sampling: peak KV blocks for n completions of one prompt",
        "n (completions)",
        [row[0] for row in rows],
        ("peak KV blocks", {MODES[index]: [row[1 + index] for row in rows] for index in range(3)}
         | {"forked in the engine (arithmetic)": [row[4] for row in rows]}),
        ("peak KV MiB", {"no prefix cache": [row[5] for row in rows], "prefix cache, staggered": [row[6] for row in rows]}),
    )
    prompt_blocks = settings.prompt_tokens // kv_block_size
    explanation = (
        "## What this measures\n\n"
        f"n completions of one {settings.prompt_tokens}-token prompt, {settings.max_tokens} tokens each, "
        "through `LLMEngine` in-process, as the server runs a request with `n > 1`: n separate engine "
        "requests. The figure is the most KV blocks held at once, read after every step.\n\n"
        "- **no prefix cache**: every completion stores its own copy of the prompt's K and V.\n"
        "- **prefix cache, together**: all n are admitted in the same step. The prompt blocks are hashed only "
        "after they are computed, so no completion finds another's blocks and nothing is shared.\n"
        "- **prefix cache, staggered**: the first completion is prefilled, then the others join and reuse its "
        f"full prompt blocks (up to {prompt_blocks}) from the prefix cache. Only full blocks are hashed, so a "
        "partly filled last prompt block is not shared. The block holding the prompt's last token is not "
        "shared either, because the engine computes that token again to get the logits of the first output "
        "token (`BlockManager.match_prefix`).\n"
        "- **forked in the engine (arithmetic, not measured)**: a sequence forked after its prompt would "
        "share every full prompt block and copy the partial one on its first write (copy-on-write). "
        "Molten's engine has no fork: `LLMEngine.add_request` rejects `n > 1`. This column is what such a "
        "fork would need: full prompt blocks once, plus per completion the blocks for the prompt's "
        "remainder and its own tokens.\n\n"
        "## What to expect, and why\n\n"
        "Without sharing, KV memory grows as n x (prompt + output). With sharing it grows as "
        "prompt + n x output, so the saving is largest for long prompts and short answers. "
        f"Here, at n={last[0]}, the staggered prefix cache held {last[3]} blocks against {last[1]} without "
        f"sharing ({summary['saving_staggered_vs_no_sharing']:.0%} less)."
    )
    return StageResult(summary, COLUMNS, rows, plot, explanation)


def _forked_blocks(prompt_tokens: int, max_tokens: int, n: int, kv_block_size: int) -> int:
    shared = prompt_tokens // kv_block_size
    own_tokens = prompt_tokens - shared * kv_block_size + max_tokens
    return shared + n * -(-own_tokens // kv_block_size)


def _peak_blocks(engine: LLMEngine, prompt: list[int], n: int, *, staggered: bool, settings: ParallelSamplingSettings) -> int:
    """Run n completions of `prompt` and return the most KV blocks in use after any step."""
    params = fixed_length_params(settings.max_tokens)
    request_ids = [f"parallel-{time.monotonic_ns()}-{index}" for index in range(n)]
    manager = engine.block_manager
    deadline = time.perf_counter() + settings.time_limit_s
    peak = 0
    pending = list(request_ids)
    try:
        engine.add_request(pending.pop(0), prompt, params)
        if not staggered:
            while pending:
                engine.add_request(pending.pop(0), prompt, params)
        while engine.has_unfinished() or pending:
            if time.perf_counter() > deadline:
                raise ExperimentTimeoutError(f"n={n} did not finish within {settings.time_limit_s:.0f} s; use --quick")
            events = engine.step()
            peak = max(peak, manager.num_blocks - manager.num_free_blocks)
            if pending and events:
                # The first completion's prompt is computed and its full blocks are in the prefix cache.
                while pending:
                    engine.add_request(pending.pop(0), prompt, params)
    finally:
        for request_id in request_ids:
            engine.abort_request(request_id)
    return peak


STAGE = Stage(
    number=7,
    name="parallel-sampling",
    title="Parallel sampling memory",
    question="How much KV memory do n completions of one prompt take, and how much can they share?",
    settings_class=ParallelSamplingSettings,
    quick_overrides=QUICK,
    run=run,
)

"""Stage 3: batch size against throughput and latency.

B requests arrive together and decode side by side. At batch 1 a decode step reads every
weight to produce one token, so it is bound by memory bandwidth. A batch of B reads the
same weights once for B tokens, so throughput grows almost linearly with B until the
matrix products become compute bound. Until then each sequence's step time (its
inter-token latency) grows much more slowly than B.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from molten.experiments.measure import (
    Progress,
    build_engine,
    kv_cache_mib_for,
    load_for_experiment,
    make_prompt,
    median,
    run_requests,
    warm_up,
)
from molten.experiments.plotting import two_panel_plot
from molten.experiments.stages.base import Stage, StageResult, check_positive

logger = logging.getLogger(__name__)


@dataclass
class BatchSizeSettings:
    model: str = "smollm2-135m-instruct"
    """Model to run (catalog name, directory, .gguf file or hub id)."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    """Numbers of requests decoded together, one run each."""
    prompt_tokens: int = 64
    """Prompt length of every request, in tokens."""
    max_tokens: int = 32
    """Tokens each request generates (EOS is ignored)."""
    time_limit_s: float = 900.0
    """Seconds after which one run is stopped with an error."""

    def validate(self) -> None:
        check_positive("batch_sizes", self.batch_sizes)
        check_positive("prompt_tokens", self.prompt_tokens)
        check_positive("max_tokens", self.max_tokens)


QUICK = {"model": "tiny-random-llama", "batch_sizes": [1, 2, 4], "prompt_tokens": 16, "max_tokens": 8}

COLUMNS = [
    "batch size",
    "decode step ms (median)",
    "output tokens/s (decode)",
    "ITL p50 ms",
    "TTFT mean ms",
    "weight bytes read per token (MB)",
    "achieved weight bandwidth GB/s",
]


def run(settings: BatchSizeSettings, progress: Progress) -> StageResult:
    loaded = load_for_experiment(settings.model, settings.dtype, progress)
    max_batch = max(settings.batch_sizes)
    engine = build_engine(
        loaded,
        dtype=settings.dtype,
        max_model_len=settings.prompt_tokens + settings.max_tokens + 1,
        max_num_seqs=max_batch,
        max_num_batched_tokens=max_batch * settings.prompt_tokens,
        kv_cache_mib=kv_cache_mib_for(loaded, max_batch * (settings.prompt_tokens + settings.max_tokens + 32)),
    )
    warm_up(engine, loaded.tokenizer)

    weight_bytes = loaded.weight_bytes
    rows = []
    for batch_size in sorted(settings.batch_sizes):
        progress(f"batch size {batch_size}: {batch_size} requests of {settings.max_tokens} tokens")
        prompts = [make_prompt(loaded.tokenizer, settings.prompt_tokens, variant) for variant in range(batch_size)]
        result = run_requests(engine, prompts, settings.max_tokens, settings.time_limit_s)
        decode_steps = [
            step.duration_ms for step in result.steps if step.num_prefill_tokens == 0 and step.batch_size == batch_size
        ]
        if not decode_steps:
            # max_tokens 1: the only token comes from the prefill step.
            decode_steps = [step.duration_ms for step in result.steps]
        step_ms = median(decode_steps)
        itls = [gap for request in result.requests for gap in request.itl_ms]
        ttft = sum(request.ttft_ms for request in result.requests) / len(result.requests)
        rows.append([
            batch_size,
            round(step_ms, 2),
            round(batch_size / step_ms * 1000, 1),
            round(median(itls), 2) if itls else None,
            round(ttft, 1),
            round(weight_bytes / batch_size / 1e6, 2),
            round(weight_bytes / (step_ms / 1000) / 1e9, 2),
        ])

    first, last = rows[0], rows[-1]
    summary = {
        "weight_mb": round(weight_bytes / 1e6, 1),
        f"tokens_per_s_at_batch_{first[0]}": first[2],
        f"tokens_per_s_at_batch_{last[0]}": last[2],
        "throughput_gain": round(last[2] / first[2], 2),
        "step_time_growth": round(last[1] / first[1], 2),
        "batch_size_ratio": round(last[0] / first[0], 2),
    }

    plot = two_panel_plot(
        f"Batch size: {loaded.model_id}, {settings.dtype}",
        "batch size (requests decoding together)",
        [row[0] for row in rows],
        ("output tokens/s (decode)", {"tokens/s": [row[2] for row in rows]}),
        ("ms", {"decode step (ITL)": [row[1] for row in rows], "TTFT": [row[4] for row in rows]}),
        log_x=True,
    )

    explanation = (
        "## What this measures\n\n"
        f"{len(rows)} runs of `{loaded.model_id}` in {settings.dtype}, in-process (`LLMEngine`, no server). "
        f"In each run B requests with {settings.prompt_tokens}-token prompts arrive together and each "
        f"generates {settings.max_tokens} tokens. A decode step's time is the median of the steps in which "
        "all B sequences decoded and none was prefilling.\n\n"
        "## What to expect, and why\n\n"
        f"Every decode step reads all {weight_bytes / 1e6:.0f} MB of weights once, whatever B is. At batch 1 "
        "that read is the whole cost, so the step is bound by memory bandwidth. With B sequences the same read "
        "serves B tokens, so tokens/s grows almost B-fold while the step time grows slowly. Once the "
        "matrix products have enough rows to saturate the arithmetic units, the step becomes compute bound "
        "and step time grows in proportion to B: throughput flattens and every user's inter-token latency "
        f"rises. Here throughput grew {summary['throughput_gain']}x for a {summary['batch_size_ratio']}x "
        f"larger batch, and the step time grew {summary['step_time_growth']}x. TTFT grows with B because the "
        "B prompts are prefilled together in one step."
    )
    return StageResult(summary, COLUMNS, rows, plot, explanation)


STAGE = Stage(
    number=3,
    name="batch-size",
    title="Batch size against throughput and latency",
    question="How do throughput and per-token latency change when more requests decode together?",
    settings_class=BatchSizeSettings,
    quick_overrides=QUICK,
    run=run,
)

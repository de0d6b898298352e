"""Stage 4: context length against TTFT and inter-token latency.

Prefill computes every prompt token in one pass of large matrix products, so it is
compute bound and its time (the TTFT) grows with the prompt length, faster than linearly
once attention's quadratic part shows. A decode step computes one token but reads the
KV cache of every earlier token, so its time grows with the context through those reads,
on top of the fixed cost of reading the weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from molten.experiments.measure import (
    Progress,
    build_engine,
    kv_bytes_per_token,
    kv_cache_mib_for,
    load_for_experiment,
    make_prompt,
    median,
    run_requests,
    warm_up,
)
from molten.experiments.plotting import two_panel_plot
from molten.experiments.stages.base import Stage, StageResult, StageSettingsError, check_positive

logger = logging.getLogger(__name__)


@dataclass
class ContextLengthSettings:
    model: str = "smollm2-135m-instruct"
    """Model to run (catalog name, directory, .gguf file or hub id)."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    context_lengths: list[int] = field(default_factory=lambda: [128, 256, 512, 1024, 2048])
    """Prompt lengths in tokens, one single-request run each."""
    max_tokens: int = 16
    """Tokens generated after each prompt (EOS is ignored)."""
    time_limit_s: float = 900.0
    """Seconds after which one run is stopped with an error."""

    def validate(self) -> None:
        check_positive("context_lengths", self.context_lengths)
        check_positive("max_tokens", self.max_tokens)
        if self.max_tokens < 2:
            raise StageSettingsError("max_tokens", "max_tokens must be at least 2 to measure inter-token latency")


QUICK = {"model": "tiny-random-llama", "context_lengths": [16, 32, 64, 128], "max_tokens": 4}

COLUMNS = [
    "prompt tokens",
    "TTFT ms",
    "prefill tokens/s",
    "ITL p50 ms",
    "KV MiB at end",
    "KV blocks used (peak)",
]


def run(settings: ContextLengthSettings, progress: Progress) -> StageResult:
    loaded = load_for_experiment(settings.model, settings.dtype, progress)
    longest = max(settings.context_lengths)
    max_model_len = longest + settings.max_tokens + 1
    if max_model_len > loaded.max_model_len:
        raise StageSettingsError(
            "context_lengths",
            f"{longest} prompt tokens plus {settings.max_tokens} generated exceed {loaded.model_id}'s context "
            f"window of {loaded.max_model_len} tokens; use shorter context_lengths",
        )
    engine = build_engine(
        loaded,
        dtype=settings.dtype,
        max_model_len=max_model_len,
        max_num_seqs=1,
        max_num_batched_tokens=max_model_len,
        kv_cache_mib=kv_cache_mib_for(loaded, max_model_len + 64),
    )
    warm_up(engine, loaded.tokenizer)

    bytes_per_token = kv_bytes_per_token(loaded)
    rows = []
    for length in sorted(settings.context_lengths):
        progress(f"context {length} tokens: prefill, then {settings.max_tokens} tokens")
        result = run_requests(engine, [make_prompt(loaded.tokenizer, length)], settings.max_tokens, settings.time_limit_s)
        request = result.requests[0]
        rows.append([
            length,
            round(request.ttft_ms, 2),
            round(length / request.ttft_ms * 1000, 1),
            round(median(request.itl_ms), 2),
            round((length + settings.max_tokens) * bytes_per_token / 2**20, 3),
            result.peak_blocks_used,
        ])

    first, last = rows[0], rows[-1]
    summary = {
        "kv_bytes_per_token": bytes_per_token,
        "kv_block_size": engine.facts.kv_block_size,
        "context_ratio": round(last[0] / first[0], 2),
        "ttft_growth": round(last[1] / first[1], 2),
        "itl_growth": round(last[3] / first[3], 2),
        f"ttft_ms_at_{first[0]}": first[1],
        f"ttft_ms_at_{last[0]}": last[1],
    }

    plot = two_panel_plot(
        f"Context length: {loaded.model_id}, {settings.dtype}",
        "prompt tokens",
        [row[0] for row in rows],
        ("TTFT ms (prefill)", {"TTFT": [row[1] for row in rows]}),
        ("ITL ms (one decode step)", {"ITL p50": [row[3] for row in rows]}),
        log_x=True,
    )

    config = loaded.config

    explanation = (
        "## What this measures\n\n"
        f"One request at a time through `LLMEngine` in-process: a prompt of each length, then "
        f"{settings.max_tokens} generated tokens. TTFT is the prefill step's time; ITL is the median gap "
        "between later tokens.\n\n"
        "## What to expect, and why\n\n"
        f"KV memory per token = 2 (K and V) x {config.num_hidden_layers} layers x "
        f"{engine.facts.num_kv_heads} KV heads x {engine.facts.head_dim} head_dim x "
        f"{loaded.dtype.itemsize} bytes = {bytes_per_token:,} bytes, so a {last[0]}-token context holds "
        f"{last[4]} MiB of KV in blocks of {engine.facts.kv_block_size} tokens.\n\n"
        "Prefill is compute bound: every prompt token goes through every weight, so TTFT grows at least "
        "linearly with the prompt, plus attention's part that is quadratic in length. A decode step computes "
        "one token but reads the K and V of the whole context, so ITL rises with context too, only slowly "
        "while the weight reads dominate. Here TTFT grew "
        f"{summary['ttft_growth']}x and ITL {summary['itl_growth']}x for a {summary['context_ratio']}x longer "
        "context."
    )
    return StageResult(summary, COLUMNS, rows, plot, explanation)


STAGE = Stage(
    number=4,
    name="context-length",
    title="Context length against TTFT and ITL",
    question="How do time to first token and inter-token latency grow with the prompt length?",
    settings_class=ContextLengthSettings,
    quick_overrides=QUICK,
    run=run,
)

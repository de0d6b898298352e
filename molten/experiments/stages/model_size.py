"""Stage 1: model size and precision against latency and memory.

At batch 1 a decode step reads every weight once, so its time is roughly the weight
bytes divided by the memory bandwidth. A model twice as large, or the same model in a
precision twice as wide, therefore decodes about half as fast. This stage loads each model in each
dtype, measures weight memory, KV memory per token, TTFT and single-stream decode speed,
and sets the decode speed beside the bandwidth ceiling measured on the same machine.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

from molten.config import DTYPES
from molten.experiments.measure import (
    Progress,
    build_engine,
    kv_bytes_per_token,
    kv_cache_mib_for,
    load_for_experiment,
    make_prompt,
    measure_copy_bandwidth_gb_per_s,
    median,
    run_requests,
    warm_up,
)
from molten.experiments.plotting import grouped_bar_plot
from molten.experiments.stages.base import Stage, StageResult, StageSettingsError, check_positive

logger = logging.getLogger(__name__)


@dataclass
class ModelSizeSettings:
    models: list[str] = field(default_factory=lambda: ["tiny-random-llama", "tiny-random-qwen2", "smollm2-135m-instruct"])
    """Models to compare (catalog names, directories, .gguf files or hub ids)."""
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    """Dtypes to load each model in: float32, bfloat16, float16 (float16 is slow on most CPUs)."""
    prompt_tokens: int = 64
    """Prompt length in tokens."""
    max_tokens: int = 32
    """Tokens generated per run (EOS is ignored)."""
    bandwidth_test_mib: int = 256
    """Size of the tensor copied to measure memory bandwidth, in MiB; larger than the CPU caches."""
    time_limit_s: float = 900.0
    """Seconds after which one run is stopped with an error."""

    def validate(self) -> None:
        if not self.models:
            raise StageSettingsError("models", "models must name at least one model")
        for dtype in self.dtypes:
            if dtype not in DTYPES:
                raise StageSettingsError("dtypes", f"dtypes must be among {', '.join(DTYPES)}, got {dtype!r}")
        if not self.dtypes:
            raise StageSettingsError("dtypes", "dtypes must list at least one dtype")
        check_positive("prompt_tokens", self.prompt_tokens)
        check_positive("max_tokens", self.max_tokens)
        check_positive("bandwidth_test_mib", self.bandwidth_test_mib)


QUICK = {
    "models": ["tiny-random-llama"],
    "dtypes": ["float32", "bfloat16"],
    "prompt_tokens": 16,
    "max_tokens": 8,
    "bandwidth_test_mib": 32,
}

COLUMNS = [
    "model",
    "dtype",
    "parameters (M)",
    "weight MB",
    "KV bytes per token",
    "TTFT ms",
    "decode ms/token",
    "decode tokens/s",
    "bandwidth ceiling tokens/s",
    "fraction of ceiling",
]


def run(settings: ModelSizeSettings, progress: Progress) -> StageResult:
    progress(f"measuring copy bandwidth with a {settings.bandwidth_test_mib} MiB tensor")
    bandwidth_gb_per_s = measure_copy_bandwidth_gb_per_s(settings.bandwidth_test_mib * 2**20)
    rows = []
    for model in settings.models:
        for dtype in settings.dtypes:
            progress(f"{model} in {dtype}")
            rows.append(_measure_one(model, dtype, settings, bandwidth_gb_per_s, progress))
            gc.collect()
    labels = [f"{row[0]}\n{row[1]}" for row in rows]
    plot = grouped_bar_plot(
        "Model size and precision (single stream)",
        labels,
        [("weight MB", [row[3] for row in rows]), ("decode ms/token", [row[6] for row in rows]),
         ("TTFT ms", [row[5] for row in rows])],
    )
    summary = {"copy_bandwidth_gb_per_s": round(bandwidth_gb_per_s, 2)}
    for row in rows:
        summary[f"decode_tokens_per_s {row[0]} {row[1]}"] = row[7]
        summary[f"weight_mb {row[0]} {row[1]}"] = row[3]
    explanation = (
        "## What this measures\n\n"
        f"Each model and dtype loaded in turn and run in-process through `LLMEngine`: one request with a "
        f"{settings.prompt_tokens}-token prompt generating {settings.max_tokens} tokens. Memory bandwidth is "
        f"a {settings.bandwidth_test_mib} MiB tensor copy, counting bytes read plus bytes written: "
        f"{bandwidth_gb_per_s:.1f} GB/s here.\n\n"
        "## What to expect, and why\n\n"
        "A decode step at batch 1 reads every weight once to produce one token, so tokens/s cannot exceed "
        "bandwidth / weight bytes (the *ceiling* column). Halving the bytes per weight (float32 to bfloat16) "
        "halves the bytes moved, so on a bandwidth-bound step it nearly doubles tokens/s, if the CPU has fast "
        "kernels for that dtype (bfloat16 needs AVX-512 BF16 or AMX on x86). KV bytes per token also halve. "
        "Small models fall further below the ceiling: their weights fit in the CPU caches and fixed per-step "
        "costs (Python, kernel launches, sampling over a 49,152-token vocabulary) dominate."
    )
    return StageResult(summary, COLUMNS, rows, plot, explanation)


def _measure_one(model: str, dtype: str, settings: ModelSizeSettings, bandwidth_gb_per_s: float, progress: Progress) -> list:
    loaded = load_for_experiment(model, dtype, progress)
    max_model_len = settings.prompt_tokens + settings.max_tokens + 1
    engine = build_engine(
        loaded, dtype=dtype, max_model_len=max_model_len, max_num_seqs=1,
        kv_cache_mib=kv_cache_mib_for(loaded, max_model_len + 64),
    )
    warm_up(engine, loaded.tokenizer)
    result = run_requests(
        engine, [make_prompt(loaded.tokenizer, settings.prompt_tokens)], settings.max_tokens, settings.time_limit_s
    )
    request = result.requests[0]
    decode_ms = median(request.itl_ms) if request.itl_ms else request.ttft_ms
    ceiling = bandwidth_gb_per_s * 1e9 / loaded.weight_bytes
    tokens_per_s = 1000 / decode_ms
    return [
        loaded.model_id,
        dtype,
        round(loaded.num_parameters / 1e6, 1),
        round(loaded.weight_bytes / 1e6, 1),
        kv_bytes_per_token(loaded),
        round(request.ttft_ms, 1),
        round(decode_ms, 2),
        round(tokens_per_s, 1),
        round(ceiling, 1),
        round(tokens_per_s / ceiling, 3),
    ]


STAGE = Stage(
    number=1,
    name="model-size",
    title="Model size and precision against latency and memory",
    question="How do a model's size and its dtype set its memory and its decode speed?",
    settings_class=ModelSizeSettings,
    quick_overrides=QUICK,
    run=run,
)

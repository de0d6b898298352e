"""Stage 5: disaggregated against co-located prefill and decode, run in-process.

Co-located: one `LLMEngine` prefills and decodes every request. Disaggregated: a prefill
engine (requests added with `prefill_only=True`) computes each prompt and samples the
first token. Its `export_sequence` packs the sequence with its KV blocks into a
`KVHandoff`. The handoff is pickled and unpickled, in place of the copy Ray's object
store makes between two workers. A second engine's `import_sequence` then writes
the blocks into its own pool and decodes. Both engines share one process and one copy of
the weights.

NOTE: the two engines run one after the other here, so this stage measures what the
handoff costs (bytes, export, copy and import time) but not what disaggregation buys,
which is prefill never stalling running decodes when the two run on separate workers at
once. `molten bench --workloads disagg` measures that through Ray Serve.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import dataclass

from molten.engine.llm_engine import LLMEngine
from molten.experiments.measure import (
    ExperimentTimeoutError,
    Progress,
    build_engine,
    fixed_length_params,
    kv_cache_mib_for,
    load_for_experiment,
    make_prompt,
    median,
    run_requests,
    warm_up,
)
from molten.experiments.plotting import grouped_bar_plot
from molten.experiments.stages.base import Stage, StageResult, check_positive

logger = logging.getLogger(__name__)


@dataclass
class DisaggregationSettings:
    model: str = "smollm2-135m-instruct"
    """Model to run (catalog name, directory, .gguf file or hub id)."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    num_requests: int = 8
    """Requests that arrive together."""
    prompt_tokens: int = 256
    """Prompt length of every request, in tokens."""
    max_tokens: int = 16
    """Tokens each request generates (EOS is ignored)."""
    time_limit_s: float = 900.0
    """Seconds after which one mode's run is stopped with an error."""

    def validate(self) -> None:
        check_positive("num_requests", self.num_requests)
        check_positive("prompt_tokens", self.prompt_tokens)
        check_positive("max_tokens", self.max_tokens)


QUICK = {"model": "tiny-random-llama", "num_requests": 4, "prompt_tokens": 64, "max_tokens": 4}

COLUMNS = [
    "mode",
    "TTFT mean ms",
    "ITL p50 ms",
    "wall s",
    "output tokens/s",
    "handoff KiB/request",
    "export ms mean",
    "copy ms mean",
    "import ms mean",
]


@dataclass
class _DisaggregatedRun:
    ttft_ms: list[float]
    itl_ms: list[float]
    wall_s: float
    tokens: list[list[int]]
    handoff_bytes: list[int]
    export_ms: list[float]
    copy_ms: list[float]
    import_ms: list[float]


def run(settings: DisaggregationSettings, progress: Progress) -> StageResult:
    loaded = load_for_experiment(settings.model, settings.dtype, progress)
    max_model_len = settings.prompt_tokens + settings.max_tokens + 1

    def engine() -> LLMEngine:
        return build_engine(
            loaded, dtype=settings.dtype, max_model_len=max_model_len, max_num_seqs=settings.num_requests,
            max_num_batched_tokens=settings.num_requests * settings.prompt_tokens,
            kv_cache_mib=kv_cache_mib_for(loaded, settings.num_requests * (max_model_len + 32)),
        )

    prompts = [make_prompt(loaded.tokenizer, settings.prompt_tokens, variant) for variant in range(settings.num_requests)]
    colocated_engine = engine()
    warm_up(colocated_engine, loaded.tokenizer)
    progress(f"co-located: {settings.num_requests} requests in one engine")
    colocated = run_requests(colocated_engine, prompts, settings.max_tokens, settings.time_limit_s)

    prefill_engine, decode_engine = engine(), engine()
    warm_up(prefill_engine, loaded.tokenizer)
    warm_up(decode_engine, loaded.tokenizer)
    progress(f"disaggregated: prefill engine, KV handoff, decode engine for {settings.num_requests} requests")
    disaggregated = _run_disaggregated(prefill_engine, decode_engine, prompts, settings)

    colocated_itl = [gap for request in colocated.requests for gap in request.itl_ms]
    colocated_tokens = [request.token_ids for request in colocated.requests]
    num_tokens = settings.num_requests * settings.max_tokens
    rows = [
        [
            "co-located",
            round(sum(r.ttft_ms for r in colocated.requests) / len(colocated.requests), 2),
            round(median(colocated_itl), 2) if colocated_itl else None,
            round(colocated.wall_s, 3),
            round(num_tokens / colocated.wall_s, 1),
            0, 0, 0, 0,
        ],
        [
            "disaggregated",
            round(sum(disaggregated.ttft_ms) / len(disaggregated.ttft_ms), 2),
            round(median(disaggregated.itl_ms), 2) if disaggregated.itl_ms else None,
            round(disaggregated.wall_s, 3),
            round(num_tokens / disaggregated.wall_s, 1),
            round(sum(disaggregated.handoff_bytes) / len(disaggregated.handoff_bytes) / 1024, 1),
            round(_mean(disaggregated.export_ms), 3),
            round(_mean(disaggregated.copy_ms), 3),
            round(_mean(disaggregated.import_ms), 3),
        ],
    ]
    handoff_ms = rows[1][6] + rows[1][7] + rows[1][8]
    summary = {
        "handoff_bytes_per_request": round(_mean(disaggregated.handoff_bytes)),
        "handoff_ms_per_request": round(handoff_ms, 3),
        "wall_time_ratio_disaggregated_over_colocated": round(disaggregated.wall_s / colocated.wall_s, 3),
        "same_tokens_in_both_modes": colocated_tokens == disaggregated.tokens,
    }
    plot = grouped_bar_plot(
        "Disaggregated against co-located (in-process)",
        ["co-located", "disaggregated"],
        [("TTFT mean ms", [rows[0][1], rows[1][1]]), ("wall s", [rows[0][3], rows[1][3]]),
         ("handoff ms per request", [0, handoff_ms])],
    )
    kv_per_token = colocated_engine.facts.kv_bytes_per_token
    explanation = (
        "## What this measures\n\n"
        f"{settings.num_requests} requests with {settings.prompt_tokens}-token prompts, {settings.max_tokens} "
        "tokens each, first in one engine (co-located), then through a prefill engine and a decode engine "
        "with a KV handoff between them. Both modes run in this one process, one after the other, so the "
        "handoff cost is measured but the benefit of running prefill and decode on separate workers at once "
        "is not: `molten bench --workloads disagg` measures that through Ray Serve.\n\n"
        "## What to expect, and why\n\n"
        f"A handoff moves the prompt's KV blocks: about {settings.prompt_tokens} tokens x {kv_per_token:,} "
        "bytes per token, rounded up to whole blocks. Export and import are memory copies, and the "
        "pickle round trip stands in for the object store's copy between processes, so each costs about "
        "bytes / memory bandwidth. Disaggregation pays this once per request to keep long prefills "
        "from stalling the decode batch; on one machine with few cores, the two workers also split the cores. "
        "Greedy tokens must be identical in both modes: "
        f"{'they were' if summary['same_tokens_in_both_modes'] else 'they were NOT (a bug to investigate)'}."
    )
    return StageResult(summary, COLUMNS, rows, plot, explanation)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _run_disaggregated(
    prefill_engine: LLMEngine, decode_engine: LLMEngine, prompts: list[list[int]], settings: DisaggregationSettings
) -> _DisaggregatedRun:
    params = fixed_length_params(settings.max_tokens)
    request_ids = [f"disagg-{time.monotonic_ns()}-{index}" for index in range(len(prompts))]
    token_times: dict[str, list[float]] = {request_id: [] for request_id in request_ids}
    tokens: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
    result = _DisaggregatedRun([], [], 0.0, [], [], [], [], [])
    started = time.perf_counter()
    deadline = started + settings.time_limit_s

    def step(engine: LLMEngine) -> None:
        if time.perf_counter() > deadline:
            raise ExperimentTimeoutError(
                f"the disaggregated run did not finish within {settings.time_limit_s:.0f} s; use --quick"
            )
        events = engine.step()
        stepped = time.perf_counter()
        for event in events:
            token_times[event.request_id].append(stepped)
            tokens[event.request_id].append(event.token_id)

    try:
        for request_id, prompt in zip(request_ids, prompts):
            prefill_engine.add_request(request_id, prompt, params, prefill_only=True)
        while prefill_engine.has_unfinished():
            step(prefill_engine)
        for request_id in request_ids:
            if request_id not in prefill_engine.prefilled:
                continue  # max_tokens 1: the request finished with its first token.
            handoff = prefill_engine.export_sequence(request_id)
            copy_started = time.perf_counter()
            handoff = pickle.loads(pickle.dumps(handoff))
            copy_ms = (time.perf_counter() - copy_started) * 1000
            stats = decode_engine.import_sequence(handoff)
            result.handoff_bytes.append(stats.num_bytes)
            result.export_ms.append(stats.export_ms)
            result.copy_ms.append(copy_ms)
            result.import_ms.append(stats.import_ms)
        while decode_engine.has_unfinished():
            step(decode_engine)
    finally:
        for request_id in request_ids:
            prefill_engine.abort_request(request_id)
            decode_engine.abort_request(request_id)
    result.wall_s = time.perf_counter() - started
    for request_id in request_ids:
        times = token_times[request_id]
        result.ttft_ms.append((times[0] - started) * 1000)
        result.itl_ms.extend((later - earlier) * 1000 for earlier, later in zip(times, times[1:]))
        result.tokens.append(tokens[request_id])
    return result


STAGE = Stage(
    number=5,
    name="disaggregation",
    title="Disaggregated against co-located",
    question="What does handing a request's KV cache from a prefill worker to a decode worker cost?",
    settings_class=DisaggregationSettings,
    quick_overrides=QUICK,
    run=run,
)

"""The long-context workload: TTFT and ITL against prompt length, and long prompts arriving mid-decode.

The context sweep runs one request per length (256, 512, ... up to max_model_len) on
an otherwise idle engine. The interference run starts several short streams and sends
a few long prompts while they decode. It runs with chunked prefill on at each token
budget per step in `interference_chunk_budgets` (the default first, then smaller
ones), and once with it off (a whole prompt in one step), and reports the ITL tail of
the decoding streams.

Why smaller budgets: a step that carries a prefill chunk of c tokens takes about one
decode step plus c times the per-token prefill cost, and every decoding stream waits
for it. While most steps are plain decode steps (the p50), ITL p99 / p50 stays under
3 only if the chunk costs less than about two of them. The budget that meets it
therefore depends on the machine's speed.
"""

from __future__ import annotations

from functools import partial
from dataclasses import dataclass

from molten.bench.context import BenchContext, Measurement, Skipped, Stage
from molten.bench.metrics import RunMetrics, summarize_run
from molten.bench.report import Plot, Section, Series, Table, format_number, format_ratio
from molten.bench.workloads import context_lengths, context_request, interference_requests

NAME = "long-context"


def length_key(length: int) -> str:
    return f"long-context/{length}"


def interference_key(chunked: bool, budget: int | None = None) -> str:
    """Key of one interference run; chunked runs also name their token budget per step."""
    if not chunked:
        return "interference/chunked-off"
    return f"interference/chunked-on-{budget}"


def chunked_interference_keys(context: BenchContext) -> list[str]:
    return [interference_key(True, budget) for budget in context.sizes.interference_chunk_budgets]


def chosen_interference(context: BenchContext) -> InterferenceResult | None:
    """Pick the chunked run for the ITL target: the largest budget that keeps p99 <= 3 x p50, else the lowest ratio.

    The largest qualifying budget is chosen because smaller chunks delay the long prompts' first token.
    """
    runs = [context.results.get(result_key) for result_key in chunked_interference_keys(context)]
    runs = [run for run in runs if isinstance(run, InterferenceResult) and run.decode.itl is not None]
    if not runs:
        return None
    meeting = [run for run in runs if run.itl_ratio is not None and run.itl_ratio <= 3.0]
    if meeting:
        return max(meeting, key=lambda run: run.max_num_batched_tokens)
    return min(runs, key=lambda run: run.itl_ratio if run.itl_ratio is not None else float("inf"))


@dataclass(frozen=True)
class InterferenceResult:
    decode: RunMetrics
    """The short streams that were decoding when the long prompts arrived."""
    long: RunMetrics
    """The long prompts (their TTFT)."""
    max_num_batched_tokens: int

    @property
    def itl_ratio(self) -> float | None:
        """ITL p99 / p50 of the decoding streams."""
        itl = self.decode.itl
        if itl is None or not itl.p50_ms:
            return None
        return itl.p99_ms / itl.p50_ms


def plan(context: BenchContext) -> list[Measurement]:
    if "engine" not in context.options.doors:
        return []
    dtype = context.first_dtype
    sizes = context.sizes
    measurements = [
        Measurement(
            length_key(length), Stage.IN_PROCESS, f"long context: Molten engine, {dtype}, {length}-token prompt",
            partial(_measure_length, length=length),
        )
        for length in context_lengths(sizes, context.facts(dtype).max_model_len)
    ]
    runs = [(True, budget) for budget in sizes.interference_chunk_budgets] + [(False, None)]
    for chunked, budget in runs:
        setting = f"on, budget {budget} tokens/step" if chunked else "off"
        measurements.append(Measurement(
            interference_key(chunked, budget), Stage.IN_PROCESS,
            f"long prompts during decode: {sizes.interference_streams} streams + "
            f"{sizes.interference_long_prompts} long prompts, chunked prefill {setting}",
            partial(_measure_interference, chunked=chunked, budget=budget),
        ))
    return measurements


def _measure_length(context: BenchContext, length: int) -> RunMetrics:
    dtype = context.first_dtype
    request = context_request(context.sizes, context.facts(dtype).vocab_size, context.options.seed, length)
    return context.measure_engine([request], dtype)


def _measure_interference(context: BenchContext, chunked: bool, budget: int | None) -> InterferenceResult:
    dtype = context.first_dtype
    facts = context.facts(dtype)
    requests = interference_requests(context.sizes, facts.vocab_size, context.options.seed, facts.max_model_len)
    if chunked:
        overrides = {"max_num_batched_tokens": budget}
    else:
        # Without chunking the scheduler needs a budget that fits the longest prompt in one step.
        overrides = {"enable_chunked_prefill": False, "max_num_batched_tokens": facts.max_model_len}
    config = context.engine_config(dtype, **overrides)
    records, _ = context.run_engine(requests, dtype, **overrides)
    return InterferenceResult(
        decode=summarize_run("Molten engine, decoding streams", dtype, [r for r in records if r.spec.tag == "decode"]),
        long=summarize_run("Molten engine, long prompts", dtype, [r for r in records if r.spec.tag == "long"]),
        max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
    )


def section(context: BenchContext) -> Section:
    sizes = context.sizes
    lengths, ttfts, itls, rows = [], [], [], []
    for length in context_lengths(sizes, context.facts(context.first_dtype).max_model_len):
        result = context.results.get(length_key(length))
        if isinstance(result, Skipped):
            rows.append([str(length), "skipped: " + result.reason, "", "", ""])
        if not isinstance(result, RunMetrics) or result.ttft is None:
            continue
        itl_mean = result.itl.mean_ms if result.itl else None
        rows.append([
            str(length),
            format_number(result.ttft.mean_ms),
            format_number(length / result.ttft.mean_ms * 1000, 0),
            format_number(itl_mean),
            format_number(result.itl.p99_ms if result.itl else None),
        ])
        lengths.append(length)
        ttfts.append(result.ttft.mean_ms)
        itls.append(itl_mean)
    section = Section(
        title="Long context",
        paragraphs=[
            f"One request per prompt length, {sizes.long_context_new_tokens} new tokens, Molten engine, "
            f"{context.first_dtype}, on an idle engine.",
        ],
        tables=[Table(["prompt tokens", "TTFT ms", "prefill tokens/s", "ITL mean ms", "ITL p99 ms"], rows)],
    )
    label = f"Molten engine, {context.first_dtype}"
    if lengths:
        section.plots.append(Plot(
            "ttft_vs_context.png", "Time to first token against prompt length", "prompt tokens", "TTFT ms",
            [Series(label, lengths, ttfts)], log_x=True,
        ))
        points = [(x, y) for x, y in zip(lengths, itls) if y is not None]
        section.plots.append(Plot(
            "itl_vs_context.png", "Inter-token latency against context length", "prompt tokens", "mean ITL ms",
            [Series(label, [x for x, _ in points], [y for _, y in points])], log_x=True,
        ))
    _add_interference(context, section)
    return section


def _add_interference(context: BenchContext, section: Section) -> None:
    sizes = context.sizes
    rows = []
    runs = [(True, budget) for budget in sizes.interference_chunk_budgets] + [(False, None)]
    for chunked, budget in runs:
        result = context.results.get(interference_key(chunked, budget))
        name = "on" if chunked else "off"
        if isinstance(result, Skipped):
            rows.append([name, "skipped: " + result.reason] + [""] * 5)
        if not isinstance(result, InterferenceResult) or result.decode.itl is None:
            continue
        itl = result.decode.itl
        rows.append([
            f"{name} (budget {result.max_num_batched_tokens} tokens/step)",
            format_number(itl.p50_ms),
            format_number(itl.p99_ms),
            format_ratio(itl.p99_ms, itl.p50_ms),
            format_number(result.decode.output_tokens_per_s),
            format_number(result.long.ttft.mean_ms if result.long.ttft else None),
            str(result.decode.num_requests),
        ])
    if not rows:
        return
    long_len = min(sizes.interference_long_len, context.facts(context.first_dtype).max_model_len - 2)
    note = (
        f"{sizes.interference_streams} streams ({sizes.single_prompt_len}-token prompts, "
        f"{sizes.interference_new_tokens} new tokens) start together. {sizes.interference_long_prompts} prompts of "
        f"{long_len} tokens arrive {sizes.interference_first_arrival_s:g} s after the start and every "
        f"{sizes.interference_arrival_gap_s:g} s after that. ITL is over the decoding streams only."
    )
    section.tables.append(Table(["chunked prefill", "ITL p50 ms", "ITL p99 ms", "p99 / p50", "decode output tokens/s",
                                 "long prompt TTFT ms", "decoding streams"], rows,
                                title="Long prompts arriving during decode", note=note))

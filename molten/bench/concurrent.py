"""The concurrent workload: many requests at once (and a Poisson-arrival variant).

Prompt lengths are drawn from a fixed range with a fixed seed, and every request
generates the same number of tokens. Molten runs them as one continuous batch through
each selected door; transformers runs them in static batches of `static_batch_size`.
A sweep over batch sizes (equal-length prompts arriving together) gives the
throughput-against-batch-size plot, with the roofline drawn beside it.
"""

from __future__ import annotations

from functools import partial

from molten.bench.context import DOOR_LABELS, BenchContext, Measurement, Skipped, Stage
from molten.bench.metrics import RequestSpec, RunMetrics, summarize_run
from molten.bench.report import Plot, Section, Series, Table, format_number, format_ratio
from molten.bench.workloads import concurrent_requests, sweep_requests

NAME = "concurrent"
ARRIVALS = ("together", "poisson")
TRANSFORMERS_BATCH = "transformers-batch"


def run_key(arrival: str, system: str, dtype: str) -> str:
    return f"concurrent/{arrival}/{system}/{dtype}"


def sweep_key(system: str, dtype: str, batch_size: int) -> str:
    return f"sweep/{system}/{dtype}/{batch_size}"


def requests_for(context: BenchContext, arrival: str, salt: str = "") -> list[RequestSpec]:
    vocab_size = context.facts(context.first_dtype).vocab_size
    return concurrent_requests(
        context.sizes, vocab_size, context.options.seed, poisson=arrival == "poisson", salt=salt
    )


def served_measurement(context: BenchContext, arrival: str, door: str, mode: str = "colocated") -> Measurement:
    """Plan a concurrent run through a served door; the disaggregated comparison plans the same co-located one."""
    stage = Stage.SERVE_COLOCATED if mode == "colocated" else Stage.SERVE_DISAGGREGATED
    system = door if mode == "colocated" else f"{door}-disaggregated"
    result_key = run_key(arrival, system, context.first_dtype)
    return Measurement(
        result_key,
        stage,
        f"concurrent ({arrival}): {DOOR_LABELS[door]}, {mode}, {context.first_dtype}",
        partial(_measure_served, arrival=arrival, door=door, mode=mode, salt=result_key),
    )


def _measure_served(context: BenchContext, arrival: str, door: str, mode: str, salt: str) -> RunMetrics:
    """Run through a served door with prompts salted per run: the deployed engine's prefix cache outlives runs."""
    return context.measure_served(requests_for(context, arrival, salt), door, mode)


def plan(context: BenchContext) -> list[Measurement]:
    """Plan the runs, with each Molten run next to the transformers run it is compared with.

    Adjacent runs execute close in time, so a change in background load skews their ratio less.
    """
    options = context.options
    sizes = context.sizes
    engine = "engine" in options.doors
    transformers = "transformers" in options.peers
    measurements = []
    for dtype in options.dtypes:
        if engine:
            measurements.append(Measurement(
                run_key("together", "engine", dtype), Stage.IN_PROCESS,
                f"concurrent (together): Molten engine, {dtype}, {sizes.concurrent_requests} requests",
                partial(_measure_engine, arrival="together", dtype=dtype),
            ))
        if transformers:
            measurements.append(Measurement(
                run_key("together", TRANSFORMERS_BATCH, dtype), Stage.IN_PROCESS,
                f"concurrent: transformers generate(), {dtype}, static batches of {sizes.static_batch_size}",
                partial(_measure_transformers_batches, dtype=dtype),
            ))
        if engine and dtype == context.first_dtype:
            measurements.append(Measurement(
                run_key("poisson", "engine", dtype), Stage.IN_PROCESS,
                f"concurrent (poisson): Molten engine, {dtype}, {sizes.concurrent_requests} requests",
                partial(_measure_engine, arrival="poisson", dtype=dtype),
            ))
        for batch_size in sizes.sweep_batch_sizes:
            if engine:
                measurements.append(Measurement(
                    sweep_key("engine", dtype, batch_size), Stage.IN_PROCESS,
                    f"batch sweep: Molten engine, {dtype}, batch {batch_size}",
                    partial(_measure_sweep_engine, dtype=dtype, batch_size=batch_size),
                ))
            if transformers:
                measurements.append(Measurement(
                    sweep_key("transformers", dtype, batch_size), Stage.IN_PROCESS,
                    f"batch sweep: transformers generate(), {dtype}, batch {batch_size}",
                    partial(_measure_sweep_transformers, dtype=dtype, batch_size=batch_size),
                ))
    for door in ("handle", "http"):
        if door in options.doors:
            measurements += [served_measurement(context, arrival, door) for arrival in ARRIVALS]
    return measurements


def _sweep(context: BenchContext, dtype: str, batch_size: int) -> list[RequestSpec]:
    return sweep_requests(context.sizes, context.facts(dtype).vocab_size, context.options.seed, batch_size)


def _measure_engine(context: BenchContext, arrival: str, dtype: str) -> RunMetrics:
    return context.measure_engine(requests_for(context, arrival), dtype)


def _measure_sweep_engine(context: BenchContext, dtype: str, batch_size: int) -> RunMetrics:
    return context.measure_engine(_sweep(context, dtype, batch_size), dtype)


def _measure_transformers_batches(context: BenchContext, dtype: str) -> RunMetrics:
    return _measure_transformers(context, requests_for(context, "together"), dtype, context.sizes.static_batch_size)


def _measure_sweep_transformers(context: BenchContext, dtype: str, batch_size: int) -> RunMetrics:
    return _measure_transformers(context, _sweep(context, dtype, batch_size), dtype, batch_size)


def _measure_transformers(
    context: BenchContext, requests: list[RequestSpec], dtype: str, batch_size: int
) -> RunMetrics:
    from molten.bench.peer_transformers import TransformersPeer

    peer = TransformersPeer.for_model(context.peer_model(dtype))
    peer.warm_up()
    records = peer.run(requests, batch_size, context.options.run_time_limit_s)
    return summarize_run(f"transformers generate() batch {batch_size}", dtype, records)


def flop_ceiling(context: BenchContext, dtype: str) -> float | None:
    """Return the tokens/s the measured matmul rate allows for this model and dtype (2 FLOPs/parameter/token)."""
    ceilings = context.ceilings()
    if ceilings is None:
        return None
    return ceilings.batched_tokens_per_s(context.facts(dtype).num_parameters, dtype)


def _row(context: BenchContext, arrival: str, result: RunMetrics | Skipped, system: str) -> list[str]:
    if isinstance(result, Skipped):
        return [system, "-", arrival, "skipped: " + result.reason] + [""] * 9
    ceiling = flop_ceiling(context, result.dtype)
    fraction = result.output_tokens_per_s / ceiling if ceiling else None
    return [
        result.system,
        result.dtype,
        arrival,
        str(result.num_requests),
        format_number(result.output_tokens_per_s),
        format_number(fraction * 100 if fraction is not None else None, 1),
        format_number(result.ttft.p50_ms if result.ttft else None),
        format_number(result.ttft.p99_ms if result.ttft else None),
        format_number(result.itl.p50_ms if result.itl else None),
        format_number(result.itl.p99_ms if result.itl else None),
        format_number(result.e2e.p50_ms if result.e2e else None, 0),
        format_number(result.e2e.p99_ms if result.e2e else None, 0),
        f"{result.prefix_hit_rate * 100:.0f}%",
    ]


RUN_COLUMNS = [
    "system", "dtype", "arrivals", "requests", "output tokens/s", "% of matmul ceiling",
    "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "e2e p50 ms", "e2e p99 ms", "prefix hits",
]


def section(context: BenchContext) -> Section:
    sizes = context.sizes
    rows = []
    for dtype in context.options.dtypes:
        for arrival in ARRIVALS:
            for system in ("engine", "handle", "http", TRANSFORMERS_BATCH):
                result = context.results.get(run_key(arrival, system, dtype))
                if result is not None:
                    rows.append(_row(context, arrival, result, system))
    low, high = sizes.concurrent_prompt_lens
    paragraphs = [
        f"{sizes.concurrent_requests} requests, prompt lengths drawn from {low}-{high} tokens (seed "
        f"{context.options.seed}), {sizes.concurrent_new_tokens} new tokens each, greedy, EOS ignored. "
        f"`together`: all sent at once; `poisson`: Poisson arrivals at {sizes.poisson_rate_per_s:g} requests/s. "
        f"transformers runs the same prompts in static batches of {sizes.static_batch_size} (left-padded, with an "
        "attention mask), one batch after another. The matmul ceiling is the measured matrix-product rate divided "
        "by 2 FLOPs per parameter per token. The served doors share one deployed engine across runs. Each of "
        "their runs therefore gets prompts of the same lengths but other token ids, so the prefix cache cannot "
        "serve it KV blocks from an earlier run. `prefix hits` is the share of prompt tokens served from the "
        "prefix cache.",
    ]
    section = Section(title="Concurrent requests", paragraphs=paragraphs, tables=[Table(RUN_COLUMNS, rows)])
    section.ratios = _ratios(context)
    sweep_table, sweep_plot = _sweep_outputs(context)
    if sweep_table.rows:
        section.tables.append(sweep_table)
        section.plots.append(sweep_plot)
    return section


def _ratios(context: BenchContext) -> list[str]:
    results = context.results
    lines = []
    for dtype in context.options.dtypes:
        molten = results.get(run_key("together", "engine", dtype))
        peer = results.get(run_key("together", TRANSFORMERS_BATCH, dtype))
        if isinstance(molten, RunMetrics) and isinstance(peer, RunMetrics):
            lines.append(
                f"Molten engine {dtype} / transformers {dtype} static batch {context.sizes.static_batch_size}, "
                f"output tokens/s = {format_ratio(molten.output_tokens_per_s, peer.output_tokens_per_s)}"
            )
    for arrival in ARRIVALS:
        engine = results.get(run_key(arrival, "engine", context.first_dtype))
        for door in ("handle", "http"):
            served = results.get(run_key(arrival, door, context.first_dtype))
            if isinstance(engine, RunMetrics) and isinstance(served, RunMetrics):
                lines.append(
                    f"{DOOR_LABELS[door]} / Molten engine ({arrival}), output tokens/s = "
                    f"{format_ratio(served.output_tokens_per_s, engine.output_tokens_per_s)}"
                )
    return lines


def _sweep_outputs(context: BenchContext) -> tuple[Table, Plot]:
    sizes = context.sizes
    rows = []
    series = []
    for dtype in context.options.dtypes:
        for system, label in (("engine", "Molten engine"), ("transformers", "transformers generate()")):
            points = []
            for batch_size in sizes.sweep_batch_sizes:
                result = context.results.get(sweep_key(system, dtype, batch_size))
                if isinstance(result, RunMetrics):
                    points.append((batch_size, result.output_tokens_per_s))
                    rows.append([label, dtype, str(batch_size), format_number(result.output_tokens_per_s),
                                 format_number(result.itl.p50_ms if result.itl else None)])
            if points:
                series.append(Series(f"{label}, {dtype}", [p[0] for p in points], [p[1] for p in points]))
        roofline = _roofline_series(context, dtype)
        if roofline is not None and series:
            series.append(roofline)
    table = Table(["system", "dtype", "batch size", "output tokens/s", "ITL p50 ms"], rows,
                  title=f"Throughput against batch size ({sizes.sweep_prompt_len}-token prompts, "
                        f"{sizes.sweep_new_tokens} new tokens)")
    plot = Plot("throughput_vs_batch.png", "Output tokens/s against batch size", "batch size (requests)",
                "output tokens/s", series, log_x=True)
    return table, plot


def _roofline_series(context: BenchContext, dtype: str) -> Series | None:
    """min(batch * bandwidth / weight bytes, FLOP rate / 2P): the roofline bound at each batch size."""
    ceilings = context.ceilings()
    if ceilings is None:
        return None
    facts = context.facts(dtype)
    flop_bound = ceilings.batched_tokens_per_s(facts.num_parameters, dtype)
    if flop_bound is None:
        return None
    xs = [float(b) for b in context.sizes.sweep_batch_sizes]
    ys = [min(b * ceilings.decode_tokens_per_s(facts.weight_bytes), flop_bound) for b in xs]
    return Series(f"roofline, {dtype}", xs, ys, dashed=True)

"""The single workload: one stream, a 128-token prompt, 128 new tokens (TTFT and decode tokens/s).

Measured through every selected Molten door and against transformers' `generate()`
and llama.cpp, each run `repeats` times with a fresh prompt; the median run is kept.
"""

from __future__ import annotations

from functools import partial
from collections.abc import Callable

from molten.bench.context import DOOR_LABELS, BenchContext, Measurement, Skipped, Stage
from molten.bench.metrics import RequestSpec, RunMetrics, median_run, summarize_run
from molten.bench.report import Section, Table, format_number, format_ratio
from molten.bench.workloads import single_requests

NAME = "single"


def key(system: str, dtype: str) -> str:
    return f"single/{system}/{dtype}"


LLAMACPP_KEY = "single/llamacpp/q4_1"


def plan(context: BenchContext) -> list[Measurement]:
    options = context.options
    sizes = context.sizes
    what = f"{sizes.single_prompt_len}-token prompt, {sizes.single_new_tokens} new tokens"
    measurements = []
    if "engine" in options.doors:
        for dtype in options.dtypes:
            measurements.append(Measurement(
                key("engine", dtype), Stage.IN_PROCESS, f"single: Molten engine, {dtype}, {what}",
                partial(_measure_engine, dtype=dtype),
            ))
    if "transformers" in options.peers:
        for dtype in options.dtypes:
            measurements.append(Measurement(
                key("transformers", dtype), Stage.IN_PROCESS, f"single: transformers generate(), {dtype}, {what}",
                partial(_measure_transformers, dtype=dtype),
            ))
    if "llamacpp" in options.peers:
        measurements.append(Measurement(
            LLAMACPP_KEY, Stage.IN_PROCESS, f"single: llama.cpp on the GGUF file, {what}", _measure_llamacpp
        ))
    for door in ("handle", "http"):
        if door in options.doors:
            measurements.append(Measurement(
                key(door, context.first_dtype), Stage.SERVE_COLOCATED,
                f"single: {DOOR_LABELS[door]}, {context.first_dtype}, {what}",
                partial(_measure_served, door=door),
            ))
    return measurements


def _repeat(context: BenchContext, dtype: str, measure_once: Callable[[list[RequestSpec]], RunMetrics]) -> RunMetrics:
    """Run the workload `repeats` times, each with its own prompt (so no prefix cache helps), keep the median."""
    vocab_size = context.facts(dtype).vocab_size
    runs = [
        measure_once(single_requests(context.sizes, vocab_size, context.options.seed + repeat))
        for repeat in range(context.sizes.repeats)
    ]
    return median_run(runs)


def _measure_engine(context: BenchContext, dtype: str) -> RunMetrics:
    return _repeat(context, dtype, lambda requests: context.measure_engine(requests, dtype))


def _measure_served(context: BenchContext, door: str) -> RunMetrics:
    return _repeat(context, context.first_dtype, lambda requests: context.measure_served(requests, door))


def _measure_transformers(context: BenchContext, dtype: str) -> RunMetrics:
    from molten.bench.peer_transformers import TransformersPeer

    peer = TransformersPeer.for_model(context.peer_model(dtype))
    peer.warm_up()
    limit_s = context.options.run_time_limit_s
    return _repeat(
        context, dtype,
        lambda requests: summarize_run("transformers generate()", dtype, peer.run(requests, 1, limit_s)),
    )


def _measure_llamacpp(context: BenchContext) -> RunMetrics | Skipped:
    from molten.bench.peer_llamacpp import LlamaCppPeer, LlamaCppUnavailableError, gguf_path_for

    try:
        path = gguf_path_for(context.options.model)
        peer = LlamaCppPeer(str(path), context.options.num_threads, context.facts(context.first_dtype).max_model_len)
    except LlamaCppUnavailableError as exc:
        return Skipped(str(exc))
    peer.warm_up()
    limit_s = context.options.run_time_limit_s
    label = f"llama.cpp ({context.options.num_threads} threads)"
    weights = f"GGUF {path.stat().st_size / 1e6:.0f} MB"
    return _repeat(
        context, context.first_dtype, lambda requests: summarize_run(label, weights, peer.run(requests, limit_s))
    )


def _decode_ceiling(context: BenchContext, weight_bytes: int | None) -> float | None:
    ceilings = context.results.get("machine/ceilings")
    if ceilings is None or isinstance(ceilings, Skipped) or weight_bytes is None:
        return None
    return ceilings.decode_tokens_per_s(weight_bytes)


def fastest_molten(context: BenchContext) -> RunMetrics | None:
    """Return the engine door's fastest single-stream run over the measured dtypes."""
    runs = [context.results.get(key("engine", dtype)) for dtype in context.options.dtypes]
    runs = [run for run in runs if isinstance(run, RunMetrics)]
    return max(runs, key=lambda run: run.decode_tokens_per_s or 0.0, default=None)


def section(context: BenchContext) -> Section:
    sizes = context.sizes
    rows = []
    systems = ("engine", "handle", "http", "transformers")
    keys = [key(system, dtype) for system in systems for dtype in context.options.dtypes]
    keys.append(LLAMACPP_KEY)
    for result_key in keys:
        if result_key not in context.results:
            continue
        result = context.results[result_key]
        if isinstance(result, Skipped):
            rows.append([result_key.split("/")[1], "-", "skipped: " + result.reason, "", "", "", ""])
            continue
        weight_bytes = _weight_bytes(context, result_key, result)
        ceiling = _decode_ceiling(context, weight_bytes)
        fraction = result.decode_tokens_per_s / ceiling if ceiling and result.decode_tokens_per_s else None
        rows.append([
            result.system,
            result.dtype,
            format_number(result.ttft.mean_ms if result.ttft else None),
            format_number(result.decode_tokens_per_s),
            format_number(result.output_tokens_per_s),
            format_number(ceiling),
            format_number(fraction * 100 if fraction is not None else None, 0) + ("%" if fraction is not None else ""),
        ])
    table = Table(
        ["system", "weights", "TTFT ms", "decode tokens/s", "tokens/s (whole request)", "decode ceiling tokens/s",
         "of ceiling"],
        rows,
    )
    return Section(
        title="Single stream",
        paragraphs=[
            f"One request at a time: a {sizes.single_prompt_len}-token prompt, {sizes.single_new_tokens} new tokens, "
            f"greedy, EOS ignored; median of {sizes.repeats} run(s), each with a fresh prompt. Decode tokens/s "
            "excludes the first token. The decode ceiling is the measured copy bandwidth divided by the bytes of "
            "weights one step reads (the GGUF file size for llama.cpp).",
        ],
        tables=[table],
        ratios=_ratios(context),
    )


def _weight_bytes(context: BenchContext, result_key: str, result: RunMetrics) -> int | None:
    if result_key == LLAMACPP_KEY:
        from molten.bench.peer_llamacpp import gguf_path_for

        try:
            return gguf_path_for(context.options.model).stat().st_size
        except Exception:
            return None
    return context.facts(result.dtype).weight_bytes


def _ratios(context: BenchContext) -> list[str]:
    results = context.results
    lines = []
    for dtype in context.options.dtypes:
        molten = results.get(key("engine", dtype))
        peer = results.get(key("transformers", dtype))
        if isinstance(molten, RunMetrics) and isinstance(peer, RunMetrics):
            lines.append(
                f"Molten engine {dtype} / transformers {dtype}, decode tokens/s = "
                f"{format_ratio(molten.decode_tokens_per_s, peer.decode_tokens_per_s)}"
            )
    fastest = fastest_molten(context)
    llamacpp = results.get(LLAMACPP_KEY)
    if fastest is not None and isinstance(llamacpp, RunMetrics):
        lines.append(
            f"Molten engine fastest ({fastest.dtype}) / llama.cpp, decode tokens/s = "
            f"{format_ratio(fastest.decode_tokens_per_s, llamacpp.decode_tokens_per_s)}"
        )
    engine = results.get(key("engine", context.first_dtype))
    for door in ("handle", "http"):
        served = results.get(key(door, context.first_dtype))
        if isinstance(engine, RunMetrics) and isinstance(served, RunMetrics):
            lines.append(
                f"{DOOR_LABELS[door]} / Molten engine, decode tokens/s = "
                f"{format_ratio(served.decode_tokens_per_s, engine.decode_tokens_per_s)}"
            )
    return lines

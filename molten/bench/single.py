"""The single workload: one stream, a 128-token prompt, 128 new tokens (TTFT and decode tokens/s).

Measured through every selected Molten door and against transformers' `generate()`
and llama.cpp. The in-process systems take turns (one run each per round, `repeats`
rounds, a fresh prompt per round), and so do the served doors, so a change in the
machine's background load during the workload affects every system alike. Each
system's median run is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

from molten.bench.context import DOOR_LABELS, BenchContext, Measurement, ResultsByKey, Skipped, Stage
from molten.bench.metrics import RequestSpec, RunMetrics, median_run, summarize_run
from molten.bench.report import Section, Table, format_number, format_ratio
from molten.bench.workloads import single_requests

logger = logging.getLogger(__name__)

NAME = "single"
LLAMACPP_KEY = "single/llamacpp/q4_1"

SystemRun = Callable[[list[RequestSpec]], RunMetrics]
"""Function that runs one request list through one system and summarizes the run."""
SystemSetup = Callable[[BenchContext], SystemRun]
"""Function that prepares a system (loads it, warms it up) and returns its `SystemRun`."""


class SystemUnavailableError(RuntimeError):
    """A peer that cannot run here (for example llama-cpp-python is not installed)."""


def key(system: str, dtype: str) -> str:
    return f"single/{system}/{dtype}"


def plan(context: BenchContext) -> list[Measurement]:
    options = context.options
    sizes = context.sizes
    what = f"{sizes.single_prompt_len}-token prompt, {sizes.single_new_tokens} new tokens, {sizes.repeats} round(s)"
    in_process: list[tuple[str, SystemSetup]] = []
    if "engine" in options.doors:
        in_process += [
            (key("engine", precision), partial(_set_up_engine, dtype=precision)) for precision in engine_precisions(context)
        ]
    if "transformers" in options.peers:
        in_process += [
            (key("transformers", dtype), partial(_set_up_transformers, dtype=dtype)) for dtype in options.dtypes
        ]
    if "llamacpp" in options.peers:
        in_process.append((LLAMACPP_KEY, _set_up_llamacpp))
    served = [
        (key(door, context.first_dtype), partial(_set_up_served, door=door))
        for door in ("handle", "http")
        if door in options.doors
    ]

    measurements = []
    # The served doors share one deployed engine, so each gets its own prompts (same length)
    # to keep one door's prompt out of the other's prefix cache.
    for group_key, stage, systems, salted in (
        ("single/in-process", Stage.IN_PROCESS, in_process, False),
        ("single/served", Stage.SERVE_COLOCATED, served, True),
    ):
        if systems:
            names = ", ".join(system_key.split("/", 1)[1] for system_key, _ in systems)
            measurements.append(Measurement(
                group_key, stage, f"single: {names} in turn, {what}",
                partial(_measure_in_turn, systems=systems, salted=salted),
            ))
    return measurements


def _measure_in_turn(context: BenchContext, systems: list[tuple[str, SystemSetup]], salted: bool) -> ResultsByKey:
    """Run every system once per round, in turn, and keep each system's median run.

    Each round uses its own prompt, so no prefix cache carries over between rounds.
    With `salted`, each system also gets its own prompt of the same length. A system
    that cannot be set up or fails is recorded as skipped or failed on its own.
    """
    results: dict[str, RunMetrics | Skipped] = {}
    runs: dict[str, SystemRun] = {}
    for system_key, set_up in systems:
        try:
            runs[system_key] = set_up(context)
        except SystemUnavailableError as exc:
            results[system_key] = Skipped(str(exc))

    measured: dict[str, list[RunMetrics]] = {system_key: [] for system_key in runs}
    vocab_size = context.facts(context.first_dtype).vocab_size
    for repeat in range(context.sizes.repeats):
        for system_key, run in list(runs.items()):
            salt = system_key if salted else ""
            requests = single_requests(context.sizes, vocab_size, context.options.seed + repeat, salt)
            try:
                measured[system_key].append(run(requests))
            except Exception as exc:
                logger.exception("single-stream run of %s failed", system_key)
                results[system_key] = Skipped(f"failed: {type(exc).__name__}: {exc}", failed=True)
                del runs[system_key]
    for system_key in runs:
        results[system_key] = median_run(measured[system_key])
    return ResultsByKey(results)


def engine_precisions(context: BenchContext) -> list[str]:
    """Return the engine door's precisions: the float dtypes, then the integer weight precisions."""
    return [*context.options.dtypes, *context.options.quantized]


def _set_up_engine(context: BenchContext, dtype: str) -> SystemRun:
    from molten.bench.door_engine import EngineDoor
    from molten.models.errors import PrecisionError

    try:
        loaded = context.engine_model(dtype)
    except PrecisionError as exc:
        raise SystemUnavailableError(str(exc)) from None
    door = EngineDoor.build(context.engine_config(dtype), loaded)
    limit_s = context.options.run_time_limit_s
    return lambda requests: summarize_run(DOOR_LABELS["engine"], dtype, door.run(requests, limit_s))


def _set_up_served(context: BenchContext, door: str) -> SystemRun:
    served = context.serve_door(door, "colocated")
    limit_s = context.options.run_time_limit_s
    return lambda requests: summarize_run(DOOR_LABELS[door], context.first_dtype, served.run(requests, limit_s))


def _set_up_transformers(context: BenchContext, dtype: str) -> SystemRun:
    from molten.bench.peer_transformers import TransformersPeer

    peer = TransformersPeer.for_model(context.peer_model(dtype))
    peer.warm_up()
    limit_s = context.options.run_time_limit_s
    return lambda requests: summarize_run("transformers generate()", dtype, peer.run(requests, 1, limit_s))


def _set_up_llamacpp(context: BenchContext) -> SystemRun:
    from molten.bench.peer_llamacpp import LlamaCppPeer, LlamaCppUnavailableError, gguf_path_for

    try:
        path = gguf_path_for(context.options.model)
        peer = LlamaCppPeer(str(path), context.options.num_threads, context.facts(context.first_dtype).max_model_len)
    except LlamaCppUnavailableError as exc:
        raise SystemUnavailableError(str(exc)) from None
    peer.warm_up()
    limit_s = context.options.run_time_limit_s
    label = f"llama.cpp ({context.options.num_threads} threads)"
    weights = f"GGUF {path.stat().st_size / 1e6:.0f} MB"
    return lambda requests: summarize_run(label, weights, peer.run(requests, limit_s))


def _decode_ceiling(context: BenchContext, weight_bytes: int | None) -> float | None:
    ceilings = context.ceilings()
    if ceilings is None or weight_bytes is None:
        return None
    return ceilings.decode_tokens_per_s(weight_bytes)


def fastest_molten(context: BenchContext) -> RunMetrics | None:
    """Return the engine door's fastest single-stream run over the measured precisions."""
    runs = [context.results.get(key("engine", precision)) for precision in engine_precisions(context)]
    runs = [run for run in runs if isinstance(run, RunMetrics)]
    return max(runs, key=lambda run: run.decode_tokens_per_s or 0.0, default=None)


def section(context: BenchContext) -> Section:
    sizes = context.sizes
    rows = []
    systems = ("engine", "handle", "http", "transformers")
    keys = [key(system, dtype) for system in systems for dtype in context.options.dtypes]
    keys += [key("engine", precision) for precision in context.options.quantized]
    keys.append(LLAMACPP_KEY)
    for result_key in keys:
        if result_key not in context.results:
            continue
        result = context.results[result_key]
        if isinstance(result, Skipped):
            rows.append([result_key.split("/")[1], "-", "skipped: " + result.reason, "", "", "", ""])
            continue
        weight_bytes = weight_bytes_of(context, result_key, result)
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
            f"greedy, EOS ignored; median of {sizes.repeats} round(s) in which the systems take turns, each run with "
            "a fresh prompt of the same length. Decode tokens/s "
            "excludes the first token. The decode ceiling is the measured copy bandwidth divided by the bytes of "
            "weights one step reads (the GGUF file size for llama.cpp).",
        ],
        tables=[table],
        ratios=_ratios(context),
    )


def weight_bytes_of(context: BenchContext, result_key: str, result: RunMetrics) -> int | None:
    """Return the bytes of weights one decode step of this result's system reads (the GGUF file size for llama.cpp)."""
    if result_key != LLAMACPP_KEY:
        return context.facts(result.dtype).weight_bytes
    from molten.bench.peer_llamacpp import LlamaCppUnavailableError, gguf_path_for

    try:
        return gguf_path_for(context.options.model).stat().st_size
    except (LlamaCppUnavailableError, OSError):
        return None


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

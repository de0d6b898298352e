"""Disaggregated against co-located serving: the concurrent workload through Serve in both modes.

Co-located mode runs prefill and decode in one worker with all threads. Disaggregated
mode runs a prefill worker and a decode worker with half the threads each, and moves
every request's KV blocks from one to the other through Ray's object store.
"""

from __future__ import annotations

from molten.bench.concurrent import run_key, served_measurement
from molten.bench.context import DOOR_LABELS, BenchContext, Measurement, Skipped
from molten.bench.metrics import RunMetrics
from molten.bench.report import Section, Table, format_number, format_ratio

NAME = "disagg"
ARRIVAL = "together"


def plan(context: BenchContext) -> list[Measurement]:
    door = context.preferred_serve_door()
    if door is None:
        return []
    return [served_measurement(context, ARRIVAL, door, mode) for mode in ("colocated", "disaggregated")]


def _results(context: BenchContext) -> tuple[str | None, object, object]:
    door = context.preferred_serve_door()
    if door is None:
        return None, None, None
    dtype = context.first_dtype
    return door, context.results.get(run_key(ARRIVAL, door, dtype)), context.results.get(
        run_key(ARRIVAL, f"{door}-disaggregated", dtype)
    )


def section(context: BenchContext) -> Section:
    door, colocated, disaggregated = _results(context)
    if door is None:
        return Section(
            title="Disaggregated against co-located",
            paragraphs=["Not measured: this workload needs the `handle` or `http` door (see `--doors`)."],
        )
    rows = []
    for mode, result in (("co-located", colocated), ("disaggregated", disaggregated)):
        if isinstance(result, Skipped):
            rows.append([mode, "skipped: " + result.reason] + [""] * 7)
        elif isinstance(result, RunMetrics):
            rows.append([
                mode,
                format_number(result.output_tokens_per_s),
                format_number(result.ttft.p50_ms if result.ttft else None),
                format_number(result.ttft.p99_ms if result.ttft else None),
                format_number(result.itl.p50_ms if result.itl else None),
                format_number(result.itl.p99_ms if result.itl else None),
                format_number(result.handoff_bytes_mean / 2**20, 2) if result.handoff_bytes_mean else "-",
                format_number(result.handoff_ms.mean_ms if result.handoff_ms else None, 2),
                format_number(result.handoff_ms.p99_ms if result.handoff_ms else None, 2),
            ])
    ratios = []
    if isinstance(colocated, RunMetrics) and isinstance(disaggregated, RunMetrics):
        ratios.append(
            "disaggregated / co-located, output tokens/s = "
            f"{format_ratio(disaggregated.output_tokens_per_s, colocated.output_tokens_per_s)}"
        )
        if colocated.ttft and disaggregated.ttft:
            ttft_ratio = format_ratio(disaggregated.ttft.p50_ms, colocated.ttft.p50_ms)
            ratios.append(f"disaggregated / co-located, TTFT p50 = {ttft_ratio}")
        if colocated.itl and disaggregated.itl:
            itl_ratio = format_ratio(disaggregated.itl.p50_ms, colocated.itl.p50_ms)
            ratios.append(f"disaggregated / co-located, ITL p50 = {itl_ratio}")
    return Section(
        title="Disaggregated against co-located",
        paragraphs=[
            f"The concurrent workload (all requests together) through {DOOR_LABELS[door]}, {context.first_dtype}. "
            "Handoff: KV bytes a request moves from the prefill to the decode worker, and the time from export "
            "start to import end (export + object-store transfer + import), as the decode worker reports it.",
        ],
        tables=[Table(["mode", "output tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                       "handoff MiB/request", "handoff ms mean", "handoff ms p99"], rows)],
        ratios=ratios,
    )

"""Scheduler trace and roofline of the playground, from the engine steps the ingress reports.

The input follows `MoltenIngress.steps()`: `{"peaks": {...}, "workers": {role: [step, ...]}}`.
Each step records when it ended (`time`, unix seconds) and how long it took (`duration_ms`). It also
records what it computed (prefill chunks per request, the decode batch, preemptions) and
what that cost (`flops`, bytes of weights and KV read, the achieved rates). This module has
no Gradio import. The roofline is a matplotlib figure built without pyplot, so no GUI
backend and no global figure state are involved.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from molten.ui.telemetry_view import unix_to_datetime

TRACE_COLUMNS = ("time", "tokens", "part", "worker", "step_id", "batch_size", "duration_ms", "ran")

STEP_TABLE_COLUMNS = (
    "worker",
    "step",
    "time",
    "duration (ms)",
    "forward (ms)",
    "batch size",
    "prefill chunks (request: tokens)",
    "decode batch (requests)",
    "preempted",
    "GB/s",
    "GFLOP/s",
    "bandwidth utilization (%)",
    "FLOP utilization (%)",
)

ROOFLINE_COLORS = {"prefill": "#f28e2b", "decode": "#4e79a7", "colocated": "#59a14f"}


def describe_step(step: Mapping[str, Any]) -> str:
    """Summarize what one step ran, e.g. `prefill chat-1: 64; decode 3 requests; 1 preempted`."""
    parts = []
    chunks = step.get("prefill_chunks") or []
    if chunks:
        parts.append("prefill " + ", ".join(f"{chunk['request_id']}: {chunk['num_tokens']}" for chunk in chunks))
    decode_ids = step.get("decode_request_ids") or []
    if decode_ids:
        parts.append(f"decode {len(decode_ids)} request{'s' if len(decode_ids) != 1 else ''}")
    preempted = int(step.get("num_preemptions") or 0)
    if preempted:
        parts.append(f"{preempted} preempted")
    for admitted in step.get("admitted") or []:
        parts.append(f"admitted {admitted['request_id']} after {float(admitted['queue_ms']):.1f} ms in the queue")
    return "; ".join(parts) or "nothing scheduled"


def trace_frame(steps_by_worker: Mapping[str, Sequence[Mapping[str, Any]]]) -> pd.DataFrame:
    """Build the scheduler trace: per step, one row for its prefill tokens and one for its decode tokens.

    x (`time`) is the step's wall-clock end time, so steps of every worker share one clock
    with the telemetry plots. `part` names the worker and the kind of tokens, the plot's color.
    A step that only preempted still gets a row (0 tokens), so its preemption shows in the tooltip.
    """
    rows = []
    for worker, steps in steps_by_worker.items():
        for step in steps:
            seconds = float(step["time"])
            common = (worker, int(step["step_id"]), int(step.get("batch_size") or 0),
                      round(float(step.get("duration_ms") or 0.0), 2), describe_step(step))
            num_prefill = int(step.get("num_prefill_tokens") or 0)
            num_decode = int(step.get("num_decode_tokens") or 0)
            if num_prefill or not num_decode:
                rows.append((seconds, num_prefill, f"{worker}: prefill tokens", *common))
            if num_decode:
                rows.append((seconds, num_decode, f"{worker}: decode tokens", *common))
    frame = pd.DataFrame(rows, columns=list(TRACE_COLUMNS))
    frame = frame.astype({
        "time": "float64", "tokens": "int64", "part": "string", "worker": "string", "step_id": "int64",
        "batch_size": "int64", "duration_ms": "float64", "ran": "string",
    })
    return frame.assign(time=unix_to_datetime(frame["time"]))


def _rounded(value: Any, scale: float) -> float | None:
    return None if value is None else round(float(value) / scale, 2)


def clock_time(unix_time: float) -> str:
    """Write a unix time as local wall-clock time with milliseconds, e.g. `00:27:15.042`."""
    return time.strftime("%H:%M:%S", time.localtime(unix_time)) + f".{int(unix_time * 1000) % 1000:03d}"


def steps_table(steps_by_worker: Mapping[str, Sequence[Mapping[str, Any]]], limit: int = 12) -> pd.DataFrame:
    """List the `limit` most recent steps of all workers, newest first, with what each ran and its achieved rates."""
    rows = []
    for worker, steps in steps_by_worker.items():
        for step in steps:
            chunks = step.get("prefill_chunks") or []
            decode_ids = step.get("decode_request_ids") or []
            rows.append((
                worker,
                int(step["step_id"]),
                float(step["time"]),
                round(float(step.get("duration_ms") or 0.0), 2),
                _rounded(step.get("forward_ms"), 1.0),
                int(step.get("batch_size") or 0),
                ", ".join(f"{chunk['request_id']}: {chunk['num_tokens']}" for chunk in chunks),
                f"{len(decode_ids)}: {', '.join(decode_ids)}" if decode_ids else "",
                int(step.get("num_preemptions") or 0),
                _rounded(step.get("achieved_bandwidth_bytes_per_s"), 1e9),
                _rounded(step.get("achieved_flops_per_s"), 1e9),
                _rounded(step.get("bandwidth_utilization"), 0.01),
                _rounded(step.get("flop_utilization"), 0.01),
            ))
    rows.sort(key=lambda row: row[2], reverse=True)
    rows = [(*row[:2], clock_time(row[2]), *row[3:]) for row in rows[:limit]]
    return pd.DataFrame(rows, columns=list(STEP_TABLE_COLUMNS))


def step_intensity(step: Mapping[str, Any]) -> tuple[float, float] | None:
    """Return (FLOP per byte read, achieved FLOP/s) of a step, or None when it did no measured work.

    Bytes read are the weights plus the KV cache the step's attention read.
    """
    flops = float(step.get("flops") or 0.0)
    bytes_read = float(step.get("weight_bytes") or 0) + float(step.get("kv_bytes_read") or 0)
    achieved = step.get("achieved_flops_per_s")
    if achieved is None and step.get("duration_ms"):
        achieved = flops / (float(step["duration_ms"]) / 1000.0)
    if flops <= 0 or bytes_read <= 0 or not achieved:
        return None
    return flops / bytes_read, float(achieved)


def _step_kind(step: Mapping[str, Any]) -> str:
    return "prefill" if int(step.get("num_prefill_tokens") or 0) else "decode"


def roofline_figure(steps_by_worker: Mapping[str, Sequence[Mapping[str, Any]]], peaks: Mapping[str, Any] | None) -> Figure:
    """Draw the roofline (log-log): each step at (FLOP per byte, achieved FLOP/s) under the machine's two ceilings.

    The memory roof is `intensity × peak bandwidth` and the compute roof is the peak FLOP
    rate. The two meet at the ridge point. A step left of the ridge is bound by memory
    bandwidth (decode steps, which read every weight for a few tokens), right of it by compute.
    """
    figure = Figure(figsize=(6.4, 3.6), dpi=90, layout="constrained")
    axes = figure.add_subplot()
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("arithmetic intensity (FLOP per byte of weights and KV read)")
    axes.set_ylabel("achieved GFLOP/s")
    axes.grid(True, which="both", alpha=0.25)

    intensities = []
    for worker, steps in steps_by_worker.items():
        by_kind: dict[str, list[tuple[float, float]]] = {}
        for step in steps:
            point = step_intensity(step)
            if point is not None:
                by_kind.setdefault(_step_kind(step), []).append(point)
        for kind, points in sorted(by_kind.items()):
            intensities += [x for x, _ in points]
            axes.scatter(
                [x for x, _ in points], [y / 1e9 for _, y in points], s=14, alpha=0.7,
                marker="o" if kind == "decode" else "^", color=ROOFLINE_COLORS.get(worker, "#9c755f"),
                label=f"{worker} worker, {kind} steps ({len(points)})",
            )

    bandwidth = float((peaks or {}).get("bandwidth_bytes_per_s") or 0.0)
    peak_flops = float((peaks or {}).get("flops_per_s") or 0.0)
    if bandwidth > 0 and peak_flops > 0:
        ridge = peak_flops / bandwidth
        low = min([ridge / 100.0, *intensities])
        high = max([ridge * 10.0, *intensities])
        xs = [low, ridge, high]
        axes.plot(xs, [min(peak_flops, x * bandwidth) / 1e9 for x in xs], color="black", linewidth=1.5,
                  label=f"roof: {bandwidth / 1e9:.1f} GB/s, {peak_flops / 1e9:.0f} GFLOP/s")
        axes.axvline(ridge, color="black", linestyle=":", linewidth=1)
        axes.annotate(f"ridge {ridge:.1f} FLOP/B", (ridge, peak_flops / 1e9), textcoords="offset points",
                      xytext=(4, -12), fontsize=8)
        axes.set_title("Roofline: each dot is one engine step", fontsize=10)
    else:
        axes.set_title("Roofline (machine peaks not measured yet)", fontsize=10)
    if intensities or (bandwidth > 0 and peak_flops > 0):
        axes.legend(fontsize=7, loc="lower right")
    else:
        axes.text(0.5, 0.5, "no engine steps yet", transform=axes.transAxes, ha="center", va="center")
    return figure


def _percent_text(achieved: float, peak: float, what: str) -> tuple[str, bool]:
    """Write `achieved` as a percentage of `peak`, flagged when it exceeds the peak; return (text, above peak)."""
    percent = 100.0 * achieved / peak
    if percent > 100.0:
        return f"{percent:.0f}% of peak {what} (above the measured peak, see the note below)", True
    return f"{percent:.0f}% of peak {what}", False


def _above_peak(step: Mapping[str, Any]) -> bool:
    return any(float(step.get(name) or 0.0) > 1.0 for name in ("bandwidth_utilization", "flop_utilization"))


def _peaks_were_measured(peaks: Mapping[str, Any] | None) -> bool:
    source = str((peaks or {}).get("source") or "")
    return source.startswith("measured") or " measured " in source


def peaks_source_text(peaks: Mapping[str, Any] | None) -> str:
    """Say where the roofline's peaks came from: a setting, a start-up measurement, or why they are unknown."""
    source = str((peaks or {}).get("source") or "source unknown")
    if _peaks_were_measured(peaks):
        return (f"{source}. They were measured once, when the server started, while the workers were still "
                "loading, so they can be lower than what the machine can do")
    return source


def above_peak_note(peaks: Mapping[str, Any] | None) -> str:
    """Explain a step that runs above 100% of a peak, and how to get better peaks."""
    if not _peaks_were_measured(peaks):
        return (
            "⚠️ **Above 100% of a peak**: the peaks come from the telemetry settings "
            f"({(peaks or {}).get('source') or 'source unknown'}), and an engine step ran faster, so a setting is "
            "lower than what this machine does. Raise `peak_bandwidth_bytes_per_s` or `peak_flops_per_s`."
        )
    return (
        "⚠️ **Above 100% of a peak**: each peak is the rate of one simple kernel (a memory copy, a matrix "
        "product), measured once at server start-up while the workers were loading and other programs ran. "
        "Under that load the peak can come out low, and then an engine step beats it. Restart `molten serve` "
        "on an idle machine to measure the peaks again, and meanwhile compare the steps with each other rather "
        "than with 100%."
    )


def roofline_summary_markdown(steps_by_worker: Mapping[str, Sequence[Mapping[str, Any]]], peaks: Mapping[str, Any] | None) -> str:
    """State each worker's newest step as a fraction of the peaks, the number a reader compares with the plot.

    When any step held (so any row of the steps table) is above 100% of a peak, a note explains
    why that can happen and how to measure the peaks again.
    """
    bandwidth = float((peaks or {}).get("bandwidth_bytes_per_s") or 0.0)
    peak_flops = float((peaks or {}).get("flops_per_s") or 0.0)
    lines = []
    any_above_peak = any(_above_peak(step) for steps in steps_by_worker.values() for step in steps)
    for worker, steps in steps_by_worker.items():
        measured = [step for step in steps if step_intensity(step) is not None]
        if not measured:
            continue
        step = measured[-1]
        achieved_bandwidth = float(step.get("achieved_bandwidth_bytes_per_s") or 0.0)
        achieved_flops = float(step.get("achieved_flops_per_s") or 0.0)
        text = (f"**{worker}** step {step['step_id']} ({_step_kind(step)}, batch {step.get('batch_size')}): "
                f"{achieved_bandwidth / 1e9:.2f} GB/s, {achieved_flops / 1e9:.2f} GFLOP/s")
        if bandwidth > 0 and peak_flops > 0:
            bandwidth_text, bandwidth_above = _percent_text(achieved_bandwidth, bandwidth, "bandwidth")
            flops_text, flops_above = _percent_text(achieved_flops, peak_flops, "FLOP/s")
            any_above_peak = any_above_peak or bandwidth_above or flops_above
            text += f", that is {bandwidth_text} and {flops_text}"
        lines.append(text + ".")
    if not lines:
        lines.append("No measured engine steps yet.")
    if bandwidth > 0 and peak_flops > 0:
        lines.append(f"Peaks: {bandwidth / 1e9:.1f} GB/s and {peak_flops / 1e9:.0f} GFLOP/s, {peaks_source_text(peaks)}.")
        if any_above_peak:
            lines.append(above_peak_note(peaks))
    return "\n\n".join(lines)

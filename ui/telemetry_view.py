"""Telemetry plots of the playground: turn the ingress's telemetry samples into plot frames and a table.

The samples follow `MoltenIngress.telemetry()`: each has a unix `time`, a list of `gpus`
(read through NVML) and a `cpu` entry (psutil and torch). A field that could not be read
is None and named in the sample's `errors`, so every reader here skips None values
instead of plotting them as zero. This module has no Gradio import.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from molten.ui.stats import format_bytes

GIB = 1024**3
MB = 1e6

SERIES_COLUMNS = ("time", "series", "value")
"""Every telemetry frame is long-form: x = the sample's wall-clock time, one row per series
and sample, so one plot can draw several lines."""


@dataclass
class TelemetryFrames:
    """One frame per telemetry plot, each with the columns in `SERIES_COLUMNS`."""

    utilization_pct: pd.DataFrame
    """CPU utilization and, with a GPU, the time its kernels ran and its memory was busy, in percent."""
    system_memory_gib: pd.DataFrame
    """Memory used by the whole machine in GiB: system RAM and, with a GPU, each device's memory."""
    process_memory_gib: pd.DataFrame
    """Memory of Molten's own processes in GiB: each actor's RSS, torch allocations and GPU memory per process.

    They sit in their own plot because they are a few GiB at most, and next to the system
    total (which counts every other program on the machine) their lines would lie flat at zero."""
    pcie_mb_per_s: pd.DataFrame
    """PCIe receive and transmit throughput per GPU in MB/s (10^6 bytes); empty without a GPU."""
    power_w: pd.DataFrame
    """Power draw per GPU in watts; empty without a GPU."""


def series_frame(rows: Iterable[tuple[float, str, float]]) -> pd.DataFrame:
    """Build a long-form frame with numeric dtypes even when empty (Gradio picks axis types from them)."""
    frame = pd.DataFrame(list(rows), columns=list(SERIES_COLUMNS))
    return frame.astype({"time": "float64", "series": "string", "value": "float64"}).assign(
        time=lambda frame: unix_to_datetime(frame["time"])
    )


def unix_to_datetime(seconds: pd.Series) -> pd.Series:
    """Convert unix seconds to naive UTC datetimes, which Gradio sends as epoch milliseconds.

    The browser's plot then labels the axis in its own local time.
    """
    return pd.to_datetime(seconds, unit="s")


def process_label(name: Any) -> str:
    """Shorten a telemetry actor name for a plot legend: `molten:decode:smollm2-135m-instruct` -> `decode:smollm2-135m-instruct`.

    Every process in the plot is Molten's, so the `molten:` prefix adds nothing there.
    """
    return str(name).removeprefix("molten:")


def _append(rows: list, unix_time: float, series: str, value: Any, scale: float = 1.0) -> None:
    if value is None:
        return
    rows.append((unix_time, series, round(float(value) / scale, 4)))


def telemetry_frames(samples: Sequence[Mapping[str, Any]]) -> TelemetryFrames:
    """Build the telemetry plots' frames from samples, with x the time each sample was taken."""
    utilization: list = []
    system_memory: list = []
    process_memory: list = []
    pcie: list = []
    power: list = []
    for sample in samples:
        seconds = float(sample["time"])
        cpu = sample.get("cpu") or {}
        _append(utilization, seconds, "CPU (all cores)", cpu.get("utilization_pct"))
        for gpu in sample.get("gpus") or []:
            name = f"GPU {gpu.get('index', '?')}"
            _append(utilization, seconds, f"{name} kernels running", gpu.get("utilization_gpu_pct"))
            _append(utilization, seconds, f"{name} memory busy", gpu.get("utilization_memory_pct"))
            _append(system_memory, seconds, f"{name} memory used", gpu.get("memory_used_bytes"), GIB)
            for process in gpu.get("processes") or []:
                _append(process_memory, seconds, f"{name} pid {process.get('pid')}", process.get("used_bytes"), GIB)
            _append(pcie, seconds, f"{name} PCIe receive", gpu.get("pcie_rx_bytes_per_s"), MB)
            _append(pcie, seconds, f"{name} PCIe transmit", gpu.get("pcie_tx_bytes_per_s"), MB)
            _append(power, seconds, f"{name} power", gpu.get("power_w"))
        _append(system_memory, seconds, "system RAM used", cpu.get("system_memory_used_bytes"), GIB)
        _append(process_memory, seconds, "torch allocated", cpu.get("torch_allocated_bytes"), GIB)
        for actor in cpu.get("actors") or []:
            _append(process_memory, seconds, process_label(actor.get("name")), actor.get("rss_bytes"), GIB)
    return TelemetryFrames(
        series_frame(utilization), series_frame(system_memory), series_frame(process_memory), series_frame(pcie),
        series_frame(power),
    )


def _value(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{float(value):.{digits}f}{unit}"


def _bytes(value: Any) -> str:
    return "–" if value is None else format_bytes(int(value))


def _used_of_total(used: Any, total: Any) -> str:
    if used is None:
        return "–"
    if not total:
        return _bytes(used)
    return f"{_bytes(used)} of {_bytes(total)} ({100.0 * used / total:.0f}%)"


def format_latest_sample_markdown(sample: Mapping[str, Any] | None, source: str | None, notice: str | None) -> str:
    """Render the newest telemetry sample as a Markdown table, with the notice and any unreadable fields."""
    lines = []
    if notice:
        lines.append(f"ℹ️ {notice}")
    if sample is None:
        lines.append("No telemetry sample yet.")
        return "\n\n".join(lines)

    rows: list[tuple[str, str]] = []
    errors: list[str] = []
    for gpu in sample.get("gpus") or []:
        name = f"GPU {gpu.get('index', '?')} ({gpu.get('name') or 'unknown'})"
        rows += [
            (f"{name} memory", _used_of_total(gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes"))),
            (f"{name} utilization (kernels / memory)",
             f"{_value(gpu.get('utilization_gpu_pct'), ' %')} / {_value(gpu.get('utilization_memory_pct'), ' %')}"),
            (f"{name} clocks (SM / memory)",
             f"{_value(gpu.get('sm_clock_mhz'), ' MHz')} / {_value(gpu.get('memory_clock_mhz'), ' MHz')}"),
            (f"{name} power, temperature", f"{_value(gpu.get('power_w'), ' W', 1)}, {_value(gpu.get('temperature_c'), ' °C')}"),
            (f"{name} PCIe receive / transmit",
             f"{_value(_scaled(gpu.get('pcie_rx_bytes_per_s'), MB), ' MB/s', 1)} / "
             f"{_value(_scaled(gpu.get('pcie_tx_bytes_per_s'), MB), ' MB/s', 1)}"),
        ]
        for process in gpu.get("processes") or []:
            rows.append((f"{name} process {process.get('pid')}", _bytes(process.get("used_bytes"))))
        errors += [f"{name} `{field}`: {message}" for field, message in (gpu.get("errors") or {}).items()]
    cpu = sample.get("cpu") or {}
    rows += [
        ("CPU utilization (all cores)", _value(cpu.get("utilization_pct"), " %")),
        ("System memory", _used_of_total(cpu.get("system_memory_used_bytes"), cpu.get("system_memory_total_bytes"))),
        ("torch allocated", _bytes(cpu.get("torch_allocated_bytes"))),
    ]
    for actor in cpu.get("actors") or []:
        rows.append((f"{actor.get('name')} (pid {actor.get('pid')}) RSS", _bytes(actor.get("rss_bytes"))))
    errors += [f"CPU `{field}`: {message}" for field, message in (cpu.get("errors") or {}).items()]

    table = ["| Reading | Latest value |", "| --- | --- |"] + [f"| {name} | {value} |" for name, value in rows]
    lines.append(f"Source: **{source or 'unknown'}**.")
    lines.append("\n".join(table))
    if errors:
        lines.append("Fields that could not be read: " + "; ".join(errors))
    return "\n\n".join(lines)


def _scaled(value: Any, scale: float) -> float | None:
    return None if value is None else float(value) / scale

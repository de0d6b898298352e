"""Orders and runs the planned measurements, shows progress, and assembles the report.

Measurements run machine first, then everything in-process, then the Serve stages, so
the engine door and the peers run before this run starts Ray. A measurement that
fails is recorded as failed on the page and the run continues.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from molten.bench import bounds, concurrent, disagg, kernels, long_context, profile, shared_prefix, single
from molten.bench.context import (
    CEILINGS_KEY,
    BenchContext,
    BenchOptions,
    LogEntry,
    Measurement,
    ResultsByKey,
    Skipped,
    Stage,
)
from molten.bench.hardware import hardware_line
from molten.bench.report import BenchReport, Section, Table, format_number
from molten.bench.roofline import COPY_BYTES, MATMUL_SIZE, Ceilings, measure_ceilings
from molten.bench.targets import evaluate_targets, targets_section

logger = logging.getLogger(__name__)

WORKLOAD_MODULES = {
    single.NAME: single,
    concurrent.NAME: concurrent,
    shared_prefix.NAME: shared_prefix,
    long_context.NAME: long_context,
    disagg.NAME: disagg,
}
QUICK_MATMUL_TIMEOUT_S = 30.0
"""Limit of one dtype's matmul measurement in a quick run (a slow bfloat16 kernel otherwise takes 90 s)."""


class Progress:
    """Prints one line per measurement to `stream`, with the time since the run started."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.started = time.perf_counter()

    def line(self, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:7.1f} s] {text}", file=self.stream, flush=True)


def plan_measurements(context: BenchContext) -> list[Measurement]:
    """Collect the measurements of the selected workloads, each key once, in stage order."""
    planned = [
        Measurement(CEILINGS_KEY, Stage.MACHINE, "machine: copy bandwidth and matmul rate", _measure_ceilings)
    ]
    planned += kernels.plan(context)
    for name in context.options.workloads:
        planned += WORKLOAD_MODULES[name].plan(context)
    planned += profile.plan(context)
    unique: dict[str, Measurement] = {}
    for measurement in planned:
        unique.setdefault(measurement.key, measurement)
    return sorted(unique.values(), key=lambda measurement: measurement.stage)


def _measure_ceilings(context: BenchContext) -> Ceilings:
    if context.options.quick:
        return measure_ceilings(context.options.dtypes, repeats=3, matmul_timeout_s=QUICK_MATMUL_TIMEOUT_S)
    return measure_ceilings(context.options.dtypes, repeats=10)


def run_measurements(context: BenchContext, measurements: list[Measurement], progress: Progress) -> None:
    for number, measurement in enumerate(measurements, start=1):
        progress.line(f"({number}/{len(measurements)}) {measurement.description} ...")
        started = time.perf_counter()
        try:
            result = measurement.run(context)
        except Exception as exc:
            logger.exception("measurement %s failed", measurement.key)
            result = Skipped(f"failed: {type(exc).__name__}: {exc}", failed=True)
        context.results[measurement.key] = result
        if isinstance(result, ResultsByKey):
            context.results.update(result.results)
        took = time.perf_counter() - started
        status = "done"
        if isinstance(result, Skipped):
            status = "failed" if result.failed else "skipped"
        context.log.append(LogEntry(measurement.description, took, os.getloadavg()[0], status))
        if isinstance(result, Skipped):
            progress.line(f"({number}/{len(measurements)}) {'FAILED' if result.failed else 'skipped'} after "
                          f"{took:.1f} s: {result.reason}")
            continue
        progress.line(f"({number}/{len(measurements)}) done in {took:.1f} s")
        parts = result.results.items() if isinstance(result, ResultsByKey) else ()
        for part_key, part in parts:
            if isinstance(part, Skipped):
                progress.line(f"    {part_key} {'FAILED' if part.failed else 'skipped'}: {part.reason}")


def ceilings_section(context: BenchContext) -> Section:
    ceilings = context.results.get(CEILINGS_KEY)
    if not isinstance(ceilings, Ceilings):
        reason = ceilings.reason if isinstance(ceilings, Skipped) else "not measured"
        return Section(title="Machine ceilings", paragraphs=[f"Not available: {reason}."])
    rows = [[f"copy {COPY_BYTES // 2**20} MiB float32 (read + write)", f"{ceilings.copy_gb_per_s:.1f} GB/s"]]
    for dtype, rate in ceilings.matmul_gflop_per_s.items():
        if dtype in ceilings.matmul_timed_out:
            rows.append([f"matmul {MATMUL_SIZE}^3 {dtype}",
                         f"under {rate:.2f} GFLOP/s (one product did not finish in "
                         f"{ceilings.matmul_timeout_s:.0f} s)"])
        else:
            rows.append([f"matmul {MATMUL_SIZE}^3 {dtype}", f"{rate:.1f} GFLOP/s"])
    derived = []
    for dtype in context.options.dtypes:
        facts = context.facts(dtype)
        derived.append([
            dtype,
            f"{facts.num_parameters / 1e6:.1f}M",
            f"{facts.weight_bytes / 1e6:.0f} MB",
            format_number(ceilings.decode_tokens_per_s(facts.weight_bytes)),
            format_number(ceilings.batched_tokens_per_s(facts.num_parameters, dtype)),
        ])
    return Section(
        title="Machine ceilings",
        paragraphs=[
            f"Best of {ceilings.repeats} runs each, measured in this run with torch. Single-stream decode ceiling = "
            "copy bandwidth / weight bytes (one step reads every weight once); batched ceiling = matmul rate / "
            "(2 x parameters) FLOPs per token. Both ignore attention and KV reads.",
        ],
        tables=[
            Table(["measurement", "rate"], rows),
            Table(["dtype", "parameters", "weights", "decode ceiling tokens/s", "batched ceiling tokens/s"], derived,
                  title=f"Ceilings implied for {context.options.model}"),
        ],
    )


def log_section(context: BenchContext) -> Section:
    rows = [
        [str(number), entry.description, entry.status, f"{entry.seconds:.1f}", f"{entry.load_average:.1f}"]
        for number, entry in enumerate(context.log, start=1)
    ]
    return Section(
        title="Run log",
        paragraphs=[
            "Every measurement in the order it ran, with the 1-minute load average when it ended. On a machine with "
            f"{os.cpu_count()} logical cores, a load above {os.cpu_count()} means other processes competed for the "
            "CPU, so figures measured then are slower than the machine allows.",
        ],
        tables=[Table(["#", "measurement", "status", "seconds", "load average"], rows)],
    )


def build_report(context: BenchContext, date: str, load_averages: tuple[float, float]) -> BenchReport:
    """Assemble the page; `load_averages` is the 1-minute load average at the start and end of the run."""
    options = context.options
    notes = []
    if options.quick:
        notes.append(
            "**Quick run** (`--quick`): fewer requests and shorter outputs than the benchmark protocol's workloads "
            "(sizes are stated in each section), so the figures are indicative, not the protocol's."
        )
    if options.note:
        notes.append(options.note)
    if options.dtype_note:
        notes.append(options.dtype_note)
    notes.append(
        f"1-minute load average: {load_averages[0]:.1f} when the run started, {load_averages[1]:.1f} when it ended "
        f"({os.cpu_count()} logical cores). A load above the core count means other processes shared the CPU."
    )
    notes.append(
        "Every figure comes from this one run on this machine; compare ratios, not absolute times. Molten ran with "
        f"{options.num_threads} torch threads, greedy decoding, EOS ignored so every system generates the same "
        "number of tokens."
    )
    targets = evaluate_targets(context)
    sections = [
        targets_section(targets),
        bounds.bounds_section(targets, bounds.inputs_from_context(context)),
        ceilings_section(context),
    ]
    sections += [WORKLOAD_MODULES[name].section(context) for name in options.workloads]
    profile_section = profile.section(context)
    if profile_section is not None:
        sections.append(profile_section)
    sections.append(log_section(context))
    return BenchReport(command=options.command, date=date, hardware=hardware_line(), notes=notes, sections=sections)


def run_bench(options: BenchOptions, stream: TextIO = sys.stderr) -> tuple[BenchReport, BenchContext]:
    """Run every selected workload and return the report and the run's context (with its raw results)."""
    options.validate()
    torch.set_num_threads(options.num_threads)
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    context = BenchContext(options)
    load_at_start = os.getloadavg()[0]
    try:
        progress = Progress(stream)
        progress.line(f"loading {options.model} and planning; {options.num_threads} torch threads"
                      f"{', quick run' if options.quick else ''}")
        measurements = plan_measurements(context)
        progress.line(f"{len(measurements)} measurements planned")
        run_measurements(context, measurements, progress)
        load_averages = (load_at_start, os.getloadavg()[0])
        if options.save_results is not None:
            save_results(context, date, load_averages, options.save_results)
        return build_report(context, date, load_averages), context
    finally:
        context.close()


@dataclass(frozen=True)
class SavedRun:
    """Everything `build_report` needs to render a finished run's page again with newer report code."""

    options: BenchOptions
    results: dict
    log: list[LogEntry]
    date: str
    load_averages: tuple[float, float]


def save_results(context: BenchContext, date: str, load_averages: tuple[float, float], path: Path) -> None:
    """Pickle the run's options, results and log to `path`, logging a failure instead of raising it."""
    saved = SavedRun(context.options, dict(context.results), list(context.log), date, load_averages)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(saved))
    except Exception:
        logger.exception("saving the raw results to %s failed", path)


def render_saved(path: Path) -> tuple[BenchReport, BenchContext]:
    """Rebuild the report of a run saved by `save_results` (a file this tool wrote; pickle runs code)."""
    saved = pickle.loads(path.read_bytes())
    if not isinstance(saved, SavedRun):
        raise ValueError(f"{path} is not a saved molten bench run; pass a file written by --save-results")
    # The hardware line reports torch's thread count, so set the run's own.
    torch.set_num_threads(saved.options.num_threads)
    context = BenchContext(saved.options)
    context.results.update(saved.results)
    context.log.extend(saved.log)
    report = build_report(context, saved.date, saved.load_averages)
    report.notes.insert(0, f"Rendered again from this run's saved results (`--render-from {path.name}`).")
    return report, context

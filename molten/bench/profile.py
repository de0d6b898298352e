"""Decode step profile: time per engine phase (cProfile) and per torch operator (torch.profiler).

Both profilers slow the step down, so their per-step times are larger than the
benchmark's; read the shares, not the absolute values.
"""

from __future__ import annotations

from functools import partial
import cProfile
import pstats
import time
from dataclasses import dataclass

from molten.bench.context import BenchContext, Measurement, Stage
from molten.bench.report import Section, Table, format_number
from molten.bench.workloads import sweep_requests

NUM_PROFILED_STEPS = 16
TOP_OPERATORS = 12

PHASES = (
    ("step (total)", "llm_engine.py", "step"),
    ("schedule", "scheduler.py", "schedule"),
    ("runner: prepare inputs", "model_runner.py", "prepare"),
    ("runner: execute (prepare + forward + sample)", "model_runner.py", "execute"),
    ("attention (paged_attention)", "attention.py", "paged_attention"),
    ("sample", "sampler.py", "sample"),
    ("update (detokenize, stop checks)", "llm_engine.py", "_update"),
)
"""(label, source file name, function name) of the engine functions whose cumulative time is reported."""

MATMUL_OPERATORS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
})
"""Torch operators that do the matrix products of the linear layers (their self time is the kernel)."""


@dataclass(frozen=True)
class DecodeProfile:
    batch_size: int
    num_steps: int
    step_ms: float
    """Mean wall time of one unprofiled decode step."""
    phases: list[tuple[str, float]]
    """(label, ms per step) from cProfile's cumulative times."""
    operators: list[tuple[str, float, float]]
    """(torch operator, self CPU ms per step, share of all operator self time)."""
    profiled_step_ms: float = 0.0
    """Mean wall time of one step under torch.profiler."""
    operator_ms: float = 0.0
    """Self CPU time of all torch operators per step under torch.profiler."""
    matmul_ms: float = 0.0
    """Self CPU time of the matrix-product operators (MATMUL_OPERATORS) per step."""
    operator_calls: float = 0.0
    """Torch operator calls per step."""

    @property
    def outside_operators_ms(self) -> float:
        """Wall time per profiled step spent outside torch operators: Python, scheduling, bookkeeping."""
        return max(self.profiled_step_ms - self.operator_ms, 0.0)


def key(batch_size: int) -> str:
    return f"profile/decode/{batch_size}"


def plan(context: BenchContext) -> list[Measurement]:
    if not context.options.profile:
        return []
    batch_sizes = sorted({1, context.sizes.static_batch_size})
    return [
        Measurement(
            key(batch_size), Stage.IN_PROCESS,
            f"profile: Molten engine decode step, {context.first_dtype}, batch {batch_size}",
            partial(profile_decode, batch_size=batch_size),
        )
        for batch_size in batch_sizes
    ]


def profile_decode(context: BenchContext, batch_size: int) -> DecodeProfile:
    """Prefill `batch_size` requests, then time, cProfile and torch-profile NUM_PROFILED_STEPS decode steps each."""
    import torch.profiler

    from molten.bench.door_engine import EngineDoor, benchmark_params

    dtype = context.first_dtype
    door = EngineDoor.build(context.engine_config(dtype), context.engine_model(dtype))
    engine = door.engine
    requests = sweep_requests(context.sizes, context.facts(dtype).vocab_size, context.options.seed, batch_size)
    for index, spec in enumerate(requests):
        engine.add_request(f"profile-{index}", spec.prompt_token_ids, benchmark_params(4 * NUM_PROFILED_STEPS + 8))
    try:
        # Run until every request has its first token, so the profiled steps are pure decode.
        num_started = 0
        max_prefill_steps = sum(len(spec.prompt_token_ids) for spec in requests) + 1
        for _ in range(max_prefill_steps):
            num_started += sum(1 for event in engine.step() if event.index == 0)
            if num_started == batch_size:
                break
        else:
            missing = batch_size - num_started
            raise RuntimeError(f"{missing} requests had no first token after {max_prefill_steps} engine steps")
        engine.step()

        started = time.perf_counter()
        for _ in range(NUM_PROFILED_STEPS):
            engine.step()
        step_ms = (time.perf_counter() - started) * 1000 / NUM_PROFILED_STEPS

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(NUM_PROFILED_STEPS):
            engine.step()
        profiler.disable()

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as torch_profile:
            started = time.perf_counter()
            for _ in range(NUM_PROFILED_STEPS):
                engine.step()
            profiled_step_ms = (time.perf_counter() - started) * 1000 / NUM_PROFILED_STEPS
    finally:
        for index in range(batch_size):
            engine.abort_request(f"profile-{index}")
    return DecodeProfile(
        batch_size=batch_size,
        num_steps=NUM_PROFILED_STEPS,
        step_ms=step_ms,
        phases=_phase_times(pstats.Stats(profiler), NUM_PROFILED_STEPS),
        operators=_top_operators(torch_profile, NUM_PROFILED_STEPS),
        profiled_step_ms=profiled_step_ms,
        **_operator_totals(torch_profile, NUM_PROFILED_STEPS),
    )


def _phase_times(stats: pstats.Stats, num_steps: int) -> list[tuple[str, float]]:
    totals = {label: 0.0 for label, _, _ in PHASES}
    for (filename, _line, function), (_, _, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        for label, file_suffix, name in PHASES:
            if function == name and filename.endswith(file_suffix):
                totals[label] += cumulative
    return [(label, seconds * 1000 / num_steps) for label, seconds in totals.items()]


def _top_operators(torch_profile, num_steps: int) -> list[tuple[str, float, float]]:
    averages = [event for event in torch_profile.key_averages() if event.self_cpu_time_total > 0]
    total_us = sum(event.self_cpu_time_total for event in averages) or 1.0
    averages.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    return [
        (event.key, event.self_cpu_time_total / 1000 / num_steps, event.self_cpu_time_total / total_us)
        for event in averages[:TOP_OPERATORS]
    ]


def _operator_totals(torch_profile, num_steps: int) -> dict[str, float]:
    averages = torch_profile.key_averages()
    return {
        "operator_ms": sum(event.self_cpu_time_total for event in averages) / 1000 / num_steps,
        "matmul_ms": sum(event.self_cpu_time_total for event in averages if event.key in MATMUL_OPERATORS)
        / 1000 / num_steps,
        "operator_calls": sum(event.count for event in averages) / num_steps,
    }


def _operator_rows(profile: DecodeProfile) -> list[list[str]]:
    if profile.profiled_step_ms <= 0:
        return []
    return [
        ["step under torch.profiler", format_number(profile.profiled_step_ms, 2)],
        ["all torch operators (self CPU)", format_number(profile.operator_ms, 2)],
        ["matrix products (mm, addmm, bmm, int8 and int4 kernels)", format_number(profile.matmul_ms, 2)],
        ["outside torch operators (Python, bookkeeping)", format_number(profile.outside_operators_ms, 2)],
        ["torch operator calls per step (count)", format_number(profile.operator_calls, 0)],
    ]


def section(context: BenchContext) -> Section | None:
    profiles = [context.results.get(key(b)) for b in sorted({1, context.sizes.static_batch_size})]
    profiles = [p for p in profiles if isinstance(p, DecodeProfile)]
    if not profiles:
        return None
    section = Section(
        title="Decode step profile",
        paragraphs=[
            f"Molten engine, {context.first_dtype}, {NUM_PROFILED_STEPS} decode steps per profiler after every request "
            "had its first token. Phase times are cProfile cumulative times (nested phases overlap, and "
            "profiling slows each step); operator times are torch.profiler self CPU times, and the rows below "
            "the phases compare them with the step's wall time under torch.profiler.",
        ],
    )
    for profile in profiles:
        section.tables.append(Table(
            ["phase", "ms per step"],
            [["step, unprofiled", format_number(profile.step_ms, 2)]]
            + [[label, format_number(ms, 2)] for label, ms in profile.phases]
            + _operator_rows(profile),
            title=f"Batch {profile.batch_size}: engine phases",
        ))
        section.tables.append(Table(
            ["torch operator", "self CPU ms per step", "share"],
            [[name, format_number(ms, 2), f"{share * 100:.1f}%"] for name, ms, share in profile.operators],
            title=f"Batch {profile.batch_size}: top torch operators",
        ))
    return section

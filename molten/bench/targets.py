"""Molten's performance targets, checked against the ratios measured in this run.

Each target is a ratio with a bound: `at_least` targets are met when the measured ratio
is >= the bound, `at_most` targets when it is <= the bound. A missed target also
reports the factor by which the measured ratio must still improve.
"""

from __future__ import annotations

from dataclasses import dataclass

from molten.bench import concurrent, long_context, shared_prefix, single
from molten.bench.context import CEILINGS_KEY, BenchContext, Skipped
from molten.bench.metrics import RunMetrics
from molten.bench.report import Section, Table


TARGET_LLAMACPP = "single/llamacpp"
TARGET_TRANSFORMERS = "single/transformers"
TARGET_STATIC_BATCH = "concurrent/static-batch"
TARGET_MATMUL_CEILING = "concurrent/matmul-ceiling"
TARGET_HTTP = "http"
TARGET_SHARED_PREFIX = "shared-prefix"
TARGET_INTERFERENCE = "interference"


@dataclass(frozen=True)
class TargetResult:
    name: str
    bound: float
    at_least: bool
    measured: float | None
    """None when a side of the ratio was not measured."""
    detail: str
    """Description of the numerator and denominator, or the reason the ratio was not measured."""
    kind: str = ""
    """Target identifier, one of the TARGET_* names, by which `molten.bench.bounds` explains a miss."""

    @property
    def met(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured >= self.bound if self.at_least else self.measured <= self.bound

    @property
    def status(self) -> str:
        if self.met is None:
            return "not measured"
        if self.met:
            return "met"
        if self.measured <= 0:
            return "missed"
        shortfall = self.bound / self.measured if self.at_least else self.measured / self.bound
        return f"missed: needs {shortfall:.2f}x"

    @property
    def bound_text(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.bound:.3g}"


def _value(result, attribute: str) -> float | None:
    if not isinstance(result, RunMetrics):
        return None
    return getattr(result, attribute)


def _ratio(
    name: str, bound: float, at_least: bool, numerator, denominator, detail: str, missing: str, kind: str
) -> TargetResult:
    if numerator is None or not denominator:
        return TargetResult(name, bound, at_least, None, missing, kind)
    return TargetResult(name, bound, at_least, numerator / denominator, detail, kind)


def _why_missing(context: BenchContext, *keys: str) -> str:
    reasons = []
    for key in keys:
        result = context.results.get(key)
        if result is None:
            reasons.append(f"{key} not run")
        elif isinstance(result, Skipped):
            reasons.append(f"{key}: {result.reason}")
    return "; ".join(reasons) or "a side of the ratio has no value"


def evaluate_targets(context: BenchContext) -> list[TargetResult]:
    results = context.results
    first = context.first_dtype
    targets = []

    fastest = single.fastest_molten(context)
    targets.append(_ratio(
        "single stream: Molten fastest precision / llama.cpp (same GGUF), decode tokens/s", 1.0, True,
        _value(fastest, "decode_tokens_per_s"), _value(results.get(single.LLAMACPP_KEY), "decode_tokens_per_s"),
        f"Molten {fastest.dtype if fastest else '?'} against llama.cpp",
        _why_missing(context, single.key("engine", first), single.LLAMACPP_KEY), TARGET_LLAMACPP,
    ))
    engine_key, peer_key = single.key("engine", "float32"), single.key("transformers", "float32")
    targets.append(_ratio(
        "single stream: Molten float32 / transformers float32 generate(), decode tokens/s", 1.5, True,
        _value(results.get(engine_key), "decode_tokens_per_s"), _value(results.get(peer_key), "decode_tokens_per_s"),
        "engine door", _why_missing(context, engine_key, peer_key), TARGET_TRANSFORMERS,
    ))

    batch = context.sizes.static_batch_size
    for dtype in context.options.dtypes:
        engine_key = concurrent.run_key("together", "engine", dtype)
        peer_key = concurrent.run_key("together", concurrent.TRANSFORMERS_BATCH, dtype)
        targets.append(_ratio(
            f"concurrent: Molten {dtype} / transformers {dtype} static batch {batch}, output tokens/s", 3.0, True,
            _value(results.get(engine_key), "output_tokens_per_s"),
            _value(results.get(peer_key), "output_tokens_per_s"),
            "engine door, requests arriving together", _why_missing(context, engine_key, peer_key),
            TARGET_STATIC_BATCH,
        ))
        ceilings = context.ceilings()
        if ceilings is not None and dtype in ceilings.matmul_timed_out:
            # A product that did not finish within the limit reflects how busy the machine
            # was, not its matmul rate, so a fraction of that figure says nothing about Molten.
            targets.append(TargetResult(
                f"concurrent: Molten {dtype} output tokens/s / matmul-rate ceiling", 0.5, True, None,
                f"matmul rate not measured: one {dtype} product did not finish within "
                f"{ceilings.matmul_timeout_s:g} s (the machine was too busy)", TARGET_MATMUL_CEILING,
            ))
            continue
        targets.append(_ratio(
            f"concurrent: Molten {dtype} output tokens/s / matmul-rate ceiling", 0.5, True,
            _value(results.get(engine_key), "output_tokens_per_s"), concurrent.flop_ceiling(context, dtype),
            "ceiling = matmul GFLOP/s / (2 x parameters)", _why_missing(context, engine_key, CEILINGS_KEY),
            TARGET_MATMUL_CEILING,
        ))

    engine_key = concurrent.run_key("together", "engine", first)
    http_key = concurrent.run_key("together", "http", first)
    targets.append(_ratio(
        "HTTP streaming / engine called directly, output tokens/s", 0.9, True,
        _value(results.get(http_key), "output_tokens_per_s"), _value(results.get(engine_key), "output_tokens_per_s"),
        f"concurrent workload, {first}", _why_missing(context, http_key, engine_key), TARGET_HTTP,
    ))

    on, off = results.get(shared_prefix.key(True)), results.get(shared_prefix.key(False))
    targets.append(_ratio(
        "shared prefix: mean TTFT with prefix caching / without", 1 / 3, False,
        on.ttft.mean_ms if isinstance(on, RunMetrics) and on.ttft else None,
        off.ttft.mean_ms if isinstance(off, RunMetrics) and off.ttft else None,
        "engine door", _why_missing(context, shared_prefix.key(True), shared_prefix.key(False)),
        TARGET_SHARED_PREFIX,
    ))

    interference = long_context.chosen_interference(context)
    itl = interference.decode.itl if interference is not None else None
    budget = f"budget {interference.max_num_batched_tokens} tokens/step, " if interference is not None else ""
    targets.append(_ratio(
        "long prompts during decode, chunked prefill on: ITL p99 / ITL p50", 3.0, False,
        itl.p99_ms if itl else None, itl.p50_ms if itl else None,
        f"{budget}decoding streams only", _why_missing(context, *long_context.chunked_interference_keys(context)),
        TARGET_INTERFERENCE,
    ))
    return targets


def targets_section(targets: list[TargetResult]) -> Section:
    rows = [
        [t.name, t.bound_text, f"{t.measured:.2f}" if t.measured is not None else "-", t.status, t.detail]
        for t in targets
    ]
    return Section(
        title="Targets",
        paragraphs=["Each target is a ratio measured in this run; `needs` is the factor still missing."],
        tables=[Table(["target", "bound", "measured", "status", "notes"], rows)],
    )

"""The shared-prefix workload: requests sharing one system prompt, with prefix caching on and off.

All requests arrive together at an engine with an empty prefix cache. With caching on,
a request admitted after the system prompt's blocks were computed reuses them, so
only its own suffix is prefilled.
"""

from __future__ import annotations

from functools import partial
from molten.bench.context import BenchContext, Measurement, Skipped, Stage
from molten.bench.metrics import RunMetrics
from molten.bench.report import Section, Table, format_number, format_ratio
from molten.bench.workloads import shared_prefix_requests

NAME = "shared-prefix"


def key(caching: bool) -> str:
    return f"shared-prefix/{'on' if caching else 'off'}"


def plan(context: BenchContext) -> list[Measurement]:
    if "engine" not in context.options.doors:
        return []
    sizes = context.sizes
    return [
        Measurement(
            key(caching),
            Stage.IN_PROCESS,
            f"shared prefix: Molten engine, {sizes.shared_prefix_requests} requests, prefix caching "
            f"{'on' if caching else 'off'}",
            partial(_measure, caching=caching),
        )
        for caching in (True, False)
    ]


def _measure(context: BenchContext, caching: bool) -> RunMetrics:
    dtype = context.first_dtype
    requests = shared_prefix_requests(context.sizes, context.facts(dtype).vocab_size, context.options.seed)
    return context.measure_engine(requests, dtype, enable_prefix_caching=caching)


def section(context: BenchContext) -> Section:
    sizes = context.sizes
    rows = []
    for caching in (True, False):
        result = context.results.get(key(caching))
        if isinstance(result, Skipped):
            rows.append(["on" if caching else "off", "skipped: " + result.reason, "", "", "", "", ""])
        elif isinstance(result, RunMetrics):
            rows.append([
                "on" if caching else "off",
                f"{result.prefix_hit_rate * 100:.1f}%",
                format_number(result.ttft.mean_ms if result.ttft else None),
                format_number(result.ttft.p50_ms if result.ttft else None),
                format_number(result.ttft.p99_ms if result.ttft else None),
                format_number(result.output_tokens_per_s),
                format_number(result.e2e.p50_ms if result.e2e else None, 0),
            ])
    ratios = []
    on, off = context.results.get(key(True)), context.results.get(key(False))
    if isinstance(on, RunMetrics) and isinstance(off, RunMetrics) and on.ttft and off.ttft:
        ratios.append(f"mean TTFT with prefix caching / without = {format_ratio(on.ttft.mean_ms, off.ttft.mean_ms)}")
    return Section(
        title="Shared prefix",
        paragraphs=[
            f"{sizes.shared_prefix_requests} requests arriving together, each a {sizes.shared_prefix_len}-token "
            f"system prompt (the same for all) followed by {sizes.shared_suffix_len} tokens of its own, "
            f"{sizes.shared_new_tokens} new tokens; Molten engine, {context.first_dtype}. The hit rate counts prompt "
            "tokens whose KV came from the prefix cache.",
        ],
        tables=[Table(["prefix caching", "hit rate", "TTFT mean ms", "TTFT p50 ms", "TTFT p99 ms",
                       "output tokens/s", "e2e p50 ms"], rows)],
        ratios=ratios,
    )

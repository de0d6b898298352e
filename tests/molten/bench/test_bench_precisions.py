"""Molten's fastest precision over float and integer weights, and the chunk budget picked for the ITL target."""

from __future__ import annotations

from molten.bench import long_context, single
from molten.bench.context import BenchContext, BenchOptions
from molten.bench.long_context import InterferenceResult, chosen_interference, interference_key
from molten.bench.metrics import LatencySummary, RunMetrics
from molten.bench.targets import evaluate_targets
from molten.cli import build_parser


def run_metrics(dtype: str, decode_tokens_per_s: float, itl_p50_ms: float = 100.0, itl_p99_ms: float = 150.0):
    itl = LatencySummary(mean_ms=itl_p50_ms, p50_ms=itl_p50_ms, p99_ms=itl_p99_ms, count=100)
    return RunMetrics(
        system="Molten engine", dtype=dtype, num_requests=1, num_output_tokens=32, duration_s=1.0,
        output_tokens_per_s=decode_tokens_per_s, decode_tokens_per_s=decode_tokens_per_s,
        ttft=itl, itl=itl, e2e=itl, prefix_hit_rate=0.0,
    )


def interference(budget: int, p50_ms: float, p99_ms: float) -> InterferenceResult:
    return InterferenceResult(
        decode=run_metrics("float32", 10.0, p50_ms, p99_ms), long=run_metrics("float32", 10.0), max_num_batched_tokens=budget
    )


def quick_context(**options) -> BenchContext:
    return BenchContext(BenchOptions(model="tiny-random-llama", quick=True, **options))


def test_quantized_flag_defaults_and_empty():
    assert build_parser().parse_args(["bench"]).quantized == ["int8", "int4"]
    assert build_parser().parse_args(["bench", "--quantized", ""]).quantized == []


def test_single_plans_engine_per_precision():
    context = quick_context(quantized=["int8", "int4"], peers=[], doors=["engine"])
    assert single.engine_precisions(context) == ["float32", "int8", "int4"]
    (measurement,) = single.plan(context)
    assert "engine/int8" in measurement.description
    assert "engine/int4" in measurement.description


def test_fastest_precision_includes_integer_weights():
    context = quick_context(quantized=["int8", "int4"])
    context.results[single.key("engine", "float32")] = run_metrics("float32", 20.0)
    context.results[single.key("engine", "int8")] = run_metrics("int8", 45.0)
    context.results[single.key("engine", "int4")] = run_metrics("int4", 30.0)
    context.results[single.LLAMACPP_KEY] = run_metrics("GGUF", 90.0)

    assert single.fastest_molten(context).dtype == "int8"
    target = next(t for t in evaluate_targets(context) if "llama.cpp" in t.name)
    assert target.measured == 0.5
    assert "int8" in target.detail


def test_interference_picks_largest_budget_meeting_bound():
    context = quick_context()
    budgets = context.sizes.interference_chunk_budgets
    assert len(budgets) >= 3
    large, middle, small = budgets[0], budgets[1], budgets[-1]
    context.results[interference_key(True, large)] = interference(large, 100.0, 900.0)
    context.results[interference_key(True, middle)] = interference(middle, 100.0, 280.0)
    context.results[interference_key(True, small)] = interference(small, 100.0, 150.0)

    assert chosen_interference(context).max_num_batched_tokens == middle
    target = next(t for t in evaluate_targets(context) if "ITL" in t.name)
    assert target.measured == 2.8
    assert f"budget {middle}" in target.detail


def test_interference_falls_back_to_lowest_ratio():
    context = quick_context()
    large, small = context.sizes.interference_chunk_budgets[0], context.sizes.interference_chunk_budgets[-1]
    context.results[interference_key(True, large)] = interference(large, 100.0, 900.0)
    context.results[interference_key(True, small)] = interference(small, 100.0, 400.0)

    assert chosen_interference(context).max_num_batched_tokens == small


def test_interference_plans_each_budget_and_off():
    context = quick_context(workloads=["long-context"], doors=["engine"])
    keys = {m.key for m in long_context.plan(context)}
    for budget in context.sizes.interference_chunk_budgets:
        assert interference_key(True, budget) in keys
    assert interference_key(False) in keys


def test_timed_out_matmul_leaves_ceiling_unmeasured():
    from molten.bench import concurrent
    from molten.bench.context import CEILINGS_KEY
    from molten.bench.roofline import Ceilings

    context = quick_context()
    context.results[CEILINGS_KEY] = Ceilings(
        copy_gb_per_s=1.0, matmul_gflop_per_s={"float32": 0.5}, matmul_timed_out=frozenset({"float32"}),
        matmul_timeout_s=30.0, repeats=3,
    )
    context.results[concurrent.run_key("together", "engine", "float32")] = run_metrics("float32", 8.0)

    target = next(t for t in evaluate_targets(context) if "matmul-rate ceiling" in t.name)

    assert target.measured is None
    assert target.status == "not measured"
    assert "did not finish within 30 s" in target.detail

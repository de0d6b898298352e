"""The 'What bounds the missed targets' section, built from synthetic results of one run."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from molten.bench import bounds, concurrent, kernels, profile, shared_prefix, single
from molten.bench.cli import main as bench_main
from molten.bench.context import CEILINGS_KEY, BenchContext, BenchOptions, LogEntry
from molten.bench.kernels import KernelTiming, LinearKernels
from molten.bench.metrics import LatencySummary, RunMetrics
from molten.bench.profile import DecodeProfile
from molten.bench.roofline import Ceilings
from molten.bench.runner import render_saved, save_results
from molten.bench.targets import (
    TARGET_INTERFERENCE,
    TARGET_LLAMACPP,
    TARGET_MATMUL_CEILING,
    TARGET_SHARED_PREFIX,
    TARGET_STATIC_BATCH,
    TARGET_TRANSFORMERS,
    TargetResult,
)
from molten.bench.workloads import WorkloadSizes
from molten.cli import build_parser

FLOAT_BYTES = 538_000_000
INT4_BYTES = 170_000_000
GGUF_BYTES = 98_000_000


def latency(mean: float, p50: float | None = None, p99: float | None = None) -> LatencySummary:
    return LatencySummary(mean, mean if p50 is None else p50, mean if p99 is None else p99, 8)


def run(tokens_per_s: float = 10.0, decode: float | None = None, ttft: LatencySummary | None = None,
        itl: LatencySummary | None = None, hit_rate: float = 0.0, dtype: str = "float32") -> RunMetrics:
    return RunMetrics(
        system="test", dtype=dtype, num_requests=8, num_output_tokens=128, duration_s=1.0,
        output_tokens_per_s=tokens_per_s, decode_tokens_per_s=decode, ttft=ttft or latency(100.0),
        itl=itl or latency(50.0), e2e=latency(1000.0), prefix_hit_rate=hit_rate,
    )


def decode_profile(batch_size: int, matmul_ms: float, step_ms: float = 100.0) -> DecodeProfile:
    return DecodeProfile(
        batch_size=batch_size, num_steps=16, step_ms=step_ms * 0.8,
        phases=[(bounds.STEP_PHASE, step_ms), (bounds.ATTENTION_PHASE, 20.0)], operators=[],
        profiled_step_ms=step_ms, operator_ms=step_ms * 0.7, matmul_ms=matmul_ms, operator_calls=1500.0,
    )


def synthetic_results(batch_one_matmul_ms: float = 80.0) -> dict:
    sizes = WorkloadSizes.quick()
    return {
        CEILINGS_KEY: Ceilings(5.6, {"float32": 18.9}, frozenset(), 30.0, 3),
        kernels.KEY: LinearKernels(576, 49152, [
            KernelTiming("float32", 1, 20.0, 113_246_208),
            KernelTiming("float32", 4, 50.0, 113_246_208),
            KernelTiming("float32", 8, 60.0, 113_246_208),
            KernelTiming("int4", 1, 10.0, 15_925_248),
        ]),
        profile.key(1): decode_profile(1, batch_one_matmul_ms),
        profile.key(sizes.static_batch_size): decode_profile(sizes.static_batch_size, 60.0),
        single.key("engine", "float32"): run(decode=3.2),
        single.key("engine", "int4"): run(decode=22.9, dtype="int4"),
        single.key("transformers", "float32"): run(decode=3.2),
        single.LLAMACPP_KEY: run(decode=57.8),
        concurrent.run_key("together", "engine", "float32"): run(tokens_per_s=19.1),
        concurrent.sweep_key("engine", "float32", 1): run(tokens_per_s=6.3, itl=latency(100.0)),
        concurrent.sweep_key("engine", "float32", 4): run(tokens_per_s=15.9, itl=latency(160.0)),
        concurrent.sweep_key("engine", "float32", 8): run(tokens_per_s=17.9, itl=latency(270.0)),
        concurrent.sweep_key("transformers", "float32", 4): run(tokens_per_s=13.2),
        shared_prefix.key(True): run(ttft=latency(6000.0, p99=6000.0), hit_rate=0.824),
        shared_prefix.key(False): run(ttft=latency(13000.0, p99=22000.0)),
    }


def synthetic_inputs(**overrides) -> bounds.BoundInputs:
    return bounds.BoundInputs(
        results=synthetic_results(**overrides), sizes=WorkloadSizes.quick(), dtype="float32",
        weight_bytes={"float32": FLOAT_BYTES, "int4": INT4_BYTES}, num_layers=30, llamacpp_weight_bytes=GGUF_BYTES,
    )


def missed(kind: str, bound: float, measured: float, at_least: bool = True) -> TargetResult:
    return TargetResult(f"target {kind}", bound, at_least, measured, "", kind)


def test_transformers_bound_matmul_share():
    text = " ".join(bounds.explain_transformers(missed(TARGET_TRANSFORMERS, 1.5, 1.0), synthetic_inputs()))
    # 80 of 100 ms in matmuls, but the step must shrink to 1 / 1.5 = 67% of its time.
    assert "took 80% of the step (80.0 of 100.0 ms" in text
    assert "shrink to 67% of its time" in text
    assert "cannot be met while both use the same matmul kernels" in text
    # Ceiling: 5.6 GB/s / 538 MB = 10.4 tokens/s; 3.2 tokens/s is 31% of it.
    assert "at most 10.4 tokens/s" in text
    assert "3.2 tokens/s (31% of that ceiling)" in text
    assert "1.5x transformers would be 4.8 tokens/s, 46% of the ceiling" in text
    # 113 MB in 20 ms = 5.7 GB/s, just over the copy bandwidth.
    assert "It read its weights at 5.7 GB/s, 101% of the measured copy bandwidth" in text


def test_transformers_bound_small_matmul_share():
    text = " ".join(bounds.explain_transformers(missed(TARGET_TRANSFORMERS, 1.5, 1.0),
                                                synthetic_inputs(batch_one_matmul_ms=40.0)))
    assert "took 40% of the step" in text
    assert "the gap has to close in the rest of the step" in text


def test_llamacpp_bound_kernel_and_python():
    text = " ".join(bounds.explain_llamacpp(missed(TARGET_LLAMACPP, 1.0, 22.9 / 57.8), synthetic_inputs()))
    assert "llama.cpp decoded 57.8 tokens/s, a step every 17.3 ms" in text
    assert "Molten int4 decoded 22.9 tokens/s, a step every 43.7 ms" in text
    assert "torch._weight_int4pack_mm_for_cpu" in text
    assert "The same product in float32 took 20.00 ms." in text
    # 15.9 MB in 10 ms is 1.59 GB/s, so 170 MB take 106.7 ms: more than either whole step.
    assert "It read its weights at 1.6 GB/s" in text
    assert "takes about 106.7 ms per step, 617% of llama.cpp's whole step" in text
    assert "1,500 torch operator calls (nested ones included) per step over 30 layers" in text
    assert "30.0 ms of a 100.0 ms step (30%" in text
    assert "The rest of Molten's int4 step" in text
    assert "conversions to and from bfloat16" in text
    assert "no faster than" not in text


def test_llamacpp_bound_when_float32_was_fastest():
    inputs = synthetic_inputs()
    results = dict(inputs.results)
    results[single.key("engine", "int4")] = run(decode=2.0, dtype="int4")
    slow_int4 = bounds.BoundInputs(results, inputs.sizes, "float32", inputs.weight_bytes, 30, GGUF_BYTES)
    text = " ".join(bounds.explain_llamacpp(missed(TARGET_LLAMACPP, 1.0, 3.2 / 57.8), slow_int4))
    assert "Molten float32 decoded 3.2 tokens/s" in text
    assert "no faster than float32 in this run (int4 2.0 tokens/s)" in text
    # The kernel explanation still uses the int4 kernel, against the int4 run's 500 ms step.
    assert "PyTorch's int4 kernel" in text
    assert "The other 393.3 ms of Molten's 500.0 ms int4 step" in text


def test_static_batch_bound_from_sweep():
    text = " ".join(bounds.explain_static_batch(missed(TARGET_STATIC_BATCH, 3.0, 1.11), synthetic_inputs()))
    # Best sweep rate 17.9 at batch 8 over transformers' 13.2 at batch 4.
    assert "17.9 tokens/s at batch 8, is 1.36x transformers' static batch 4" in text
    assert "short of 3x even with every request in one batch" in text
    assert "uneven prompts give the measured 1.11x" in text
    assert "from 100 ms at batch 1 to 160 ms at batch 4 (1.60x the time for 4x the tokens, so 2.50x" in text
    assert "20.00 ms at batch 1 and 50.00 ms at batch 4 (2.50x)" in text
    assert "matrix products took 60% of the step" in text
    assert "KV blocks, 20% (20.0 of 100.0 ms, cProfile)" in text


def test_matmul_ceiling_bound_small_batch_rate():
    text = " ".join(bounds.explain_matmul_ceiling(missed(TARGET_MATMUL_CEILING, 0.5, 0.27), synthetic_inputs()))
    # 2 * 8 * 576 * 49152 FLOPs in 60 ms = 7.5 GFLOP/s, 40% of 18.9 GFLOP/s.
    assert "40% of that rate at batch 8 (7.5 GFLOP/s)" in text
    ceiling = 19.1 / 0.27
    assert f"instead of {ceiling:.1f}" in text
    at_batch = ceiling * (2 * 8 * 576 * 49152 / 0.060 / 1e9) / 18.9
    assert f"would be {at_batch:.1f} tokens/s" in text


def test_shared_prefix_bound_splits_ttft():
    text = " ".join(bounds.explain_shared_prefix(missed(TARGET_SHARED_PREFIX, 1 / 3, 0.46, False), synthetic_inputs()))
    # 8 x 544 prompt tokens; 82.4% cached leaves 766 to prefill.
    assert "prefilled 766 tokens instead of 4,352, 0.18 of the work" in text
    assert "would meet the bound; the measured ratio is 0.46" in text
    # 766 tokens by 6 s = 128 tokens/s; 4,352 by 22 s = 198 tokens/s.
    assert "128 tokens/s, against 198 tokens/s without caching" in text
    assert "The cached prompts prefilled more slowly" in text
    # Own 32-token suffix at 198 tokens/s = 162 ms; 6,000 - 162 = 5,838 ms waiting.
    assert "accounts for 162 ms. The other 5,838 ms is queueing" in text


def test_section_lists_only_missed_targets():
    targets = [
        missed(TARGET_TRANSFORMERS, 1.5, 1.02),
        TargetResult("met one", 0.9, True, 0.95, "", "http"),
        TargetResult("not measured one", 1.0, True, None, "llama.cpp not installed", TARGET_LLAMACPP),
        missed(TARGET_INTERFERENCE, 3.0, 4.0, at_least=False),
    ]
    section = bounds.bounds_section(targets, synthetic_inputs())
    assert section.title == "What bounds the missed targets"
    text = "\n".join(section.paragraphs)
    assert "**target single/transformers** (missed: needs 1.47x)." in text
    assert "**target interference** (missed: needs 1.33x). This run measured nothing" in text
    assert "met one" not in text
    assert "not measured one" not in text


def test_section_drops_unmeasured_sentences():
    inputs = synthetic_inputs()
    results = dict(inputs.results)
    del results[kernels.KEY], results[profile.key(1)]
    bare = bounds.BoundInputs(results, inputs.sizes, "float32", inputs.weight_bytes, 30, GGUF_BYTES)
    text = " ".join(bounds.explain_transformers(missed(TARGET_TRANSFORMERS, 1.5, 1.0), bare))
    assert "at most 10.4 tokens/s" in text
    assert "profiler" not in text
    assert "LM head" not in text


def test_section_when_all_met():
    section = bounds.bounds_section([TargetResult("fine", 1.0, True, 2.0, "", "http")], synthetic_inputs())
    assert section.paragraphs == ["This run met every target it measured."]


def test_saved_run_renders_again(tmp_path: Path):
    output = tmp_path / "page.md"
    options = BenchOptions(model="tiny-random-llama", quick=True, workloads=["shared-prefix"], output=output,
                           kv_cache_memory_mib=16)
    context = BenchContext(options)
    results = synthetic_results()
    context.results.update({key: results[key] for key in (shared_prefix.key(True), shared_prefix.key(False))})
    context.log.append(LogEntry("shared prefix", 1.0, 0.5, "done"))
    saved_path = tmp_path / "results.pickle"
    save_results(context, "2026-01-01 00:00 UTC", (1.0, 2.0), saved_path)

    report, rendered = render_saved(saved_path)
    assert rendered.results[shared_prefix.key(True)] == results[shared_prefix.key(True)]
    assert "--render-from results.pickle" in report.notes[0]
    section = next(section for section in report.sections if section.title == bounds.TITLE)
    assert any("0.18 of the work" in paragraph for paragraph in section.paragraphs)

    args = build_parser().parse_args(["bench", "--render-from", str(saved_path)])
    assert bench_main(args, []) == 0
    page = output.read_text()
    assert "## What bounds the missed targets" in page
    assert "0.18 of the work" in page


def test_render_from_rejects_other_files(tmp_path: Path, capsys):
    args = build_parser().parse_args(["bench", "--render-from", str(tmp_path / "missing.pickle")])
    assert bench_main(args, []) == 2
    assert "file not found" in capsys.readouterr().err
    other = tmp_path / "other.pickle"
    other.write_bytes(pickle.dumps({"not": "a run"}))
    with pytest.raises(ValueError, match="--save-results"):
        render_saved(other)


def test_linear_kernels_time_each_precision():
    layers = kernels.build_layers(64, 256, ["int8", "int4"])
    timings = LinearKernels(64, 256, kernels.time_layers(layers, 64, [1, 4]))
    assert [(t.precision, t.batch_size) for t in timings.timings] == [
        ("float32", 1), ("float32", 4), ("int8", 1), ("int4", 1)]
    float_bytes = timings.find("float32", 1).weight_bytes
    assert float_bytes == 64 * 256 * 4
    assert timings.find("int8", 1).weight_bytes < float_bytes / 3
    assert timings.find("int4", 1).weight_bytes < timings.find("int8", 1).weight_bytes
    assert all(t.ms > 0 for t in timings.timings)


def test_operator_totals_count_matmuls():
    import torch
    import torch.profiler

    a, b = torch.randn(64, 64), torch.randn(64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as torch_profile:
        for _ in range(4):
            torch.relu(torch.mm(a, b))
    totals = profile._operator_totals(torch_profile, num_steps=2)
    assert totals["matmul_ms"] > 0
    assert totals["operator_ms"] > totals["matmul_ms"]
    # Two mm and two relu calls per step at least, plus what they call inside.
    assert totals["operator_calls"] >= 4

"""The measurement runner and the single workload's systems taking turns, on tiny-random-llama."""

from __future__ import annotations

import io

import torch

from molten.bench import single
from molten.bench.context import BenchContext, BenchOptions, Measurement, ResultsByKey, Skipped, Stage
from molten.bench.metrics import RunMetrics
from molten.bench.runner import Progress, run_measurements


def test_run_measurements_stores_results_and_failures():
    context = BenchContext(BenchOptions(model="tiny-random-llama"))

    def fail(_context):
        raise RuntimeError("boom")

    measurements = [
        Measurement("a", Stage.IN_PROCESS, "returns a value", lambda _context: 41),
        Measurement("b", Stage.IN_PROCESS, "raises", fail),
        Measurement("c", Stage.IN_PROCESS, "returns parts",
                    lambda _context: ResultsByKey({"c/x": 1, "c/y": Skipped("not installed")})),
    ]
    output = io.StringIO()
    run_measurements(context, measurements, Progress(output))

    assert context.results["a"] == 41
    assert context.results["b"].failed
    assert "RuntimeError: boom" in context.results["b"].reason
    assert context.results["c/x"] == 1
    assert context.results["c/y"] == Skipped("not installed")
    progress_lines = output.getvalue()
    assert "(2/3) FAILED" in progress_lines
    assert "c/y skipped: not installed" in progress_lines
    assert [entry.status for entry in context.log] == ["done", "failed", "done"]
    assert [entry.description for entry in context.log] == ["returns a value", "raises", "returns parts"]
    assert all(entry.seconds >= 0 for entry in context.log)


def test_single_systems_take_turns():
    torch.set_num_threads(1)
    options = BenchOptions(
        model="tiny-random-llama", quick=True, doors=["engine"], peers=["transformers", "llamacpp"],
        kv_cache_memory_mib=16,
    )
    context = BenchContext(options)
    measurements = single.plan(context)
    assert [m.key for m in measurements] == ["single/in-process"]

    result = measurements[0].run(context)

    engine = result.results[single.key("engine", "float32")]
    peer = result.results[single.key("transformers", "float32")]
    assert isinstance(engine, RunMetrics)
    assert isinstance(peer, RunMetrics)
    assert engine.num_output_tokens == context.sizes.single_new_tokens
    assert peer.num_output_tokens == context.sizes.single_new_tokens
    # The tiny model has no GGUF file, so llama.cpp is skipped whether or not it is installed.
    assert isinstance(result.results[single.LLAMACPP_KEY], Skipped)

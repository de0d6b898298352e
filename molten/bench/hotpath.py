"""Decode-step timing of the engine's hot path: whole step, the runner's `prepare()`, and the forward.

Run it as a module to reproduce the tables in docs/hot-path.md:

    .venv/bin/python -m molten.bench.hotpath --models tiny-random-llama,smollm2-135m-instruct --batches 1,16

Each case prefills `batch` random prompts, runs until every request has its first
token, then times `--steps` decode steps (wall and this thread's CPU time), and
finally calls the runner's `prepare()` alone on one captured decode step. CPU times
are what to compare on a shared machine: with one torch thread they exclude the time
other processes hold the core.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass

import torch

from molten.config import CacheConfig, EngineConfig, SchedulerConfig
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams

FIRST_ORDINARY_TOKEN_ID = 3


@dataclass(frozen=True)
class StepTiming:
    model: str
    batch_size: int
    num_steps: int
    step_ms: float
    """Mean wall time of one engine step (schedule, prepare, forward, sample, update)."""
    step_cpu_ms: float
    """Mean CPU time of this thread per step. With one torch thread, torch runs its kernels on
    this thread, so this is close to the step's whole CPU time."""
    forward_ms: float
    """Mean `RunnerOutput.forward_ms` per step (prepare plus the model call), wall time."""
    prepare_cpu_ms: float
    """Median CPU time of one `ModelRunner.prepare` call on a decode step, over PREPARE_REPEATS calls."""
    warm_up_s: float
    """Wall time of the prefill steps and the first decode step (includes torch.compile's compilation)."""


PREPARE_REPEATS = 200
"""`prepare` calls timed on one captured decode step (it does not change engine state)."""


def load(model: str, dtype: str = "float32"):
    from molten.models import load_model

    return load_model(model, dtype=getattr(torch, dtype))


def build_engine(loaded, batch_size: int, prompt_len: int, **engine_settings) -> LLMEngine:
    config = EngineConfig(
        model=loaded.model_id,
        max_model_len=max(2048, 2 * prompt_len),
        cache=CacheConfig(kv_block_size=16, kv_cache_memory_mib=256),
        scheduler=SchedulerConfig(max_num_seqs=max(64, batch_size), max_num_batched_tokens=max(512, prompt_len)),
        **engine_settings,
    )
    return LLMEngine(config, loaded)


def time_decode_steps(
    engine: LLMEngine, batch_size: int, *, prompt_len: int = 128, num_steps: int = 32, seed: int = 0
) -> StepTiming:
    """Prefill `batch_size` prompts, then time `num_steps` pure decode steps."""
    warm_up_started = time.perf_counter()
    rng = random.Random(seed)
    vocab = engine.model.config.vocab_size
    # Early requests decode while later ones prefill, so leave room for every step; all are aborted at the end.
    params = SamplingParams(max_tokens=engine.facts.max_model_len - prompt_len - 1, temperature=0.0, ignore_eos=True)
    for index in range(batch_size):
        prompt = [rng.randrange(FIRST_ORDINARY_TOKEN_ID, vocab) for _ in range(prompt_len)]
        engine.add_request(f"hotpath-{index}", prompt, params)
    for _ in range(batch_size * prompt_len + 2):
        if all(seq.num_output_tokens >= 1 for seq in engine.live_sequences()):
            break
        engine.step()
    engine.step()  # one decode step to warm up
    warm_up_s = time.perf_counter() - warm_up_started

    runner = engine.runner
    forward_ms = 0.0
    try:
        started, started_cpu = time.perf_counter(), time.thread_time()
        for _ in range(num_steps):
            scheduler_output = engine.scheduler.schedule()
            runner_output = runner.execute(scheduler_output)
            engine._update(scheduler_output, runner_output)
            forward_ms += runner_output.forward_ms
        elapsed, elapsed_cpu = time.perf_counter() - started, time.thread_time() - started_cpu

        scheduler_output = engine.scheduler.schedule()
        if len(scheduler_output.scheduled) != batch_size or scheduler_output.num_prefill_tokens:
            raise RuntimeError(f"expected {batch_size} decode rows, got {len(scheduler_output.scheduled)}")
        prepare_cpu_s = []
        with torch.inference_mode():
            for _ in range(PREPARE_REPEATS):
                call_started = time.thread_time()
                runner.prepare(scheduler_output)
                prepare_cpu_s.append(time.thread_time() - call_started)
        engine._update(scheduler_output, runner.execute(scheduler_output))
    finally:
        for index in range(batch_size):
            engine.abort_request(f"hotpath-{index}")
    return StepTiming(
        model=engine.facts.model_id,
        batch_size=batch_size,
        num_steps=num_steps,
        step_ms=elapsed * 1000 / num_steps,
        step_cpu_ms=elapsed_cpu * 1000 / num_steps,
        forward_ms=forward_ms / num_steps,
        prepare_cpu_ms=statistics.median(prepare_cpu_s) * 1000,
        warm_up_s=warm_up_s,
    )


def compile_modules(model: torch.nn.Module, variant: str) -> None:
    """Compile parts of a loaded model in place with inductor: `mlp` (each layer's MLP) or `layers` (whole layers).

    `dynamic=True` because the token count changes every step. With `layers`, the paged
    attention function stays eager (torch.compiler.disable) since it branches on step metadata.
    """
    from molten.engine import attention

    if variant == "mlp":
        for layer in model.model.layers:
            layer.mlp.compile(dynamic=True)
    elif variant == "layers":
        torch.compiler.disable(attention.paged_attention)
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    elif variant != "none":
        raise ValueError(f"unknown compile variant {variant!r}; choose none, mlp or layers")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-random-llama,smollm2-135m-instruct",
                        help="comma-separated model ids, a `:int8` or `:int4` suffix included (default: %(default)s)")
    parser.add_argument("--batches", default="1,16", help="comma-separated decode batch sizes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per case (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16 weights (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (default: %(default)s)")
    parser.add_argument("--compile", choices=("none", "mlp", "layers"), default="none",
                        help="torch.compile each layer's MLP or whole decoder layers before timing (default: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"loadavg {open('/proc/loadavg').read().strip()}, torch threads {args.threads}")
    print("| model | batch | step wall ms | step CPU ms | prepare CPU ms | warm-up s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model in args.models.split(","):
        loaded = load(model, args.dtype)
        compile_modules(loaded.model, args.compile)
        for batch_size in [int(b) for b in args.batches.split(",")]:
            engine = build_engine(loaded, batch_size, args.prompt_len)
            timing = time_decode_steps(engine, batch_size, prompt_len=args.prompt_len, num_steps=args.steps)
            print(
                f"| {model} | {batch_size} | {timing.step_ms:.2f} | {timing.step_cpu_ms:.2f} | {timing.prepare_cpu_ms:.3f} | {timing.warm_up_s:.1f} |",
                flush=True,
            )
    print(f"loadavg {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()

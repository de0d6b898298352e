"""Explain each missed target with the run's own measurements: what bounds it, and by how much.

Every sentence is computed from figures measured in the same run (the machine
ceilings, the LM-head-sized kernel timings of `molten.bench.kernels`, the decode-step
profile of `--profile`, and the workloads' results), so the explanation stays true
when the page is regenerated. A figure that was not measured drops its sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from molten.bench import concurrent, kernels, profile, shared_prefix, single
from molten.bench.context import CEILINGS_KEY, BenchContext
from molten.bench.kernels import LinearKernels
from molten.bench.metrics import RunMetrics
from molten.bench.profile import DecodeProfile
from molten.bench.report import Section
from molten.bench.roofline import MATMUL_SIZE, Ceilings
from molten.bench.targets import (
    TARGET_HTTP,
    TARGET_LLAMACPP,
    TARGET_MATMUL_CEILING,
    TARGET_SHARED_PREFIX,
    TARGET_STATIC_BATCH,
    TARGET_TRANSFORMERS,
    TargetResult,
)
from molten.bench.workloads import WorkloadSizes

TITLE = "What bounds the missed targets"

KERNEL_NAMES = {
    "float32": "torch.mm",
    "bfloat16": "torch.mm",
    "int8": "torch._weight_int8pack_mm",
    "int4": "torch._weight_int4pack_mm_for_cpu",
}
INTEGER_PRECISIONS = ("int4", "int8")
"""Integer weight precisions, smallest weights first."""
ATTENTION_PHASE = "attention (paged_attention)"
STEP_PHASE = "step (total)"


@dataclass(frozen=True)
class BoundInputs:
    """The figures of one run that the explanations read."""

    results: Mapping[str, Any]
    """The run's results by key, as in `BenchContext.results`."""
    sizes: WorkloadSizes
    dtype: str
    """The run's first dtype: the one the profile, the concurrent runs and the shared-prefix runs used."""
    weight_bytes: Mapping[str, int]
    """Bytes of Molten's weights by precision (`float32`, `int8`, `int4`, ...)."""
    num_layers: int
    llamacpp_weight_bytes: int | None = None
    """Size of the GGUF file llama.cpp ran, when it ran."""

    def run(self, key: str) -> RunMetrics | None:
        result = self.results.get(key)
        return result if isinstance(result, RunMetrics) else None

    @property
    def ceilings(self) -> Ceilings | None:
        result = self.results.get(CEILINGS_KEY)
        return result if isinstance(result, Ceilings) else None

    @property
    def kernels(self) -> LinearKernels | None:
        result = self.results.get(kernels.KEY)
        return result if isinstance(result, LinearKernels) else None

    def profile(self, batch_size: int) -> DecodeProfile | None:
        result = self.results.get(profile.key(batch_size))
        if isinstance(result, DecodeProfile) and result.profiled_step_ms > 0:
            return result
        return None


def inputs_from_context(context: BenchContext) -> BoundInputs:
    """Collect the figures the explanations need; model facts come from the loaded models."""
    precisions = [context.first_dtype, "float32"]
    precisions += [key.rsplit("/", 1)[1] for key, result in context.results.items()
                   if key.startswith("single/engine/") and isinstance(result, RunMetrics)]
    weight_bytes = {precision: context.facts(precision).weight_bytes for precision in dict.fromkeys(precisions)}
    llamacpp = context.results.get(single.LLAMACPP_KEY)
    gguf_bytes = None
    if isinstance(llamacpp, RunMetrics):
        gguf_bytes = single.weight_bytes_of(context, single.LLAMACPP_KEY, llamacpp)
    return BoundInputs(
        results=context.results,
        sizes=context.sizes,
        dtype=context.first_dtype,
        weight_bytes=weight_bytes,
        num_layers=context.engine_model(context.first_dtype).config.num_hidden_layers,
        llamacpp_weight_bytes=gguf_bytes,
    )


def _share(part: float, whole: float) -> str:
    return f"{part / whole * 100:.0f}%"


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:,.0f} MB"


def _kernel_sentence(inputs: BoundInputs, precision: str) -> str | None:
    """Describe how fast one LM-head-sized product reads its weights in `precision`, against the copy bandwidth."""
    timings, ceilings = inputs.kernels, inputs.ceilings
    timing = timings.find(precision, 1) if timings else None
    if timing is None or ceilings is None:
        return None
    return (
        f"One {precision} product of the LM head's size ({timings.in_features} x {timings.out_features}, "
        f"{_mb(timing.weight_bytes)} of weights, {KERNEL_NAMES.get(precision, precision)}) took {timing.ms:.2f} ms at "
        f"batch 1. It read its weights at {timing.weight_gb_per_s:.1f} GB/s, "
        f"{_share(timing.weight_gb_per_s, ceilings.copy_gb_per_s)} of the measured copy bandwidth"
        f"{' (the weights partly fit in the CPU caches)' if timing.weight_gb_per_s > ceilings.copy_gb_per_s else ''}."
    )


def explain_transformers(target: TargetResult, inputs: BoundInputs) -> list[str]:
    """Explain Molten float32 against transformers float32, single stream: the shared matmuls and the copy bandwidth."""
    sentences = []
    engine = inputs.run(single.key("engine", "float32"))
    peer = inputs.run(single.key("transformers", "float32"))
    step_fraction = 1 / (target.bound / target.measured)
    batch_one = inputs.profile(1) if inputs.dtype == "float32" else None
    if batch_one is not None and batch_one.matmul_ms > 0:
        share = batch_one.matmul_ms / batch_one.profiled_step_ms
        verdict = (
            "so the target cannot be met while both use the same matmul kernels"
            if share > step_fraction
            else "so the gap has to close in the rest of the step (attention, norms, sampling, Python)"
        )
        sentences.append(
            "Both systems multiply the same float32 weights with the same torch kernels. In Molten's batch-1 "
            f"decode step the matrix products took {_share(batch_one.matmul_ms, batch_one.profiled_step_ms)} of the "
            f"step ({batch_one.matmul_ms:.1f} of {batch_one.profiled_step_ms:.1f} ms under the profiler). To meet "
            f"the target the step must shrink to {step_fraction * 100:.0f}% of its time, {verdict}."
        )

    ceilings = inputs.ceilings
    weights = inputs.weight_bytes.get("float32")
    if ceilings is not None and weights and engine and peer and engine.decode_tokens_per_s and peer.decode_tokens_per_s:
        ceiling = ceilings.decode_tokens_per_s(weights)
        target_rate = target.bound * peer.decode_tokens_per_s
        sentences.append(
            f"A decode step reads all {_mb(weights)} of weights; at the measured copy bandwidth of "
            f"{ceilings.copy_gb_per_s:.1f} GB/s that allows at most {ceiling:.1f} tokens/s. Molten decoded "
            f"{engine.decode_tokens_per_s:.1f} tokens/s ({_share(engine.decode_tokens_per_s, ceiling)} of that "
            f"ceiling) and transformers {peer.decode_tokens_per_s:.1f} "
            f"({_share(peer.decode_tokens_per_s, ceiling)}); {target.bound:g}x transformers would be "
            f"{target_rate:.1f} tokens/s, {_share(target_rate, ceiling)} of the ceiling."
        )

    kernel = _kernel_sentence(inputs, "float32")
    if kernel:
        sentences.append(kernel)
    return sentences


def _engine_runs(inputs: BoundInputs) -> list[tuple[str, RunMetrics]]:
    """Return (precision, run) of each single-stream engine run with a decode rate."""
    return [(key.rsplit("/", 1)[1], result) for key, result in inputs.results.items()
            if key.startswith("single/engine/") and isinstance(result, RunMetrics) and result.decode_tokens_per_s]


def _fastest_engine(inputs: BoundInputs) -> tuple[str, RunMetrics] | None:
    return max(_engine_runs(inputs), key=lambda pair: pair[1].decode_tokens_per_s, default=None)


def explain_llamacpp(target: TargetResult, inputs: BoundInputs) -> list[str]:
    """Explain Molten's fastest precision against llama.cpp: the integer kernel's rate and the Python time per step."""
    sentences = []
    fastest = _fastest_engine(inputs)
    llama = inputs.run(single.LLAMACPP_KEY)
    if fastest is None or llama is None or not llama.decode_tokens_per_s:
        return sentences
    precision, molten = fastest
    ceilings = inputs.ceilings
    llama_step_ms = 1000 / llama.decode_tokens_per_s
    molten_step_ms = 1000 / molten.decode_tokens_per_s
    weights = inputs.weight_bytes.get(precision)
    if ceilings is not None and weights and inputs.llamacpp_weight_bytes:
        llama_rate = inputs.llamacpp_weight_bytes * llama.decode_tokens_per_s / 1e9
        molten_rate = weights * molten.decode_tokens_per_s / 1e9
        sentences.append(
            f"llama.cpp decoded {llama.decode_tokens_per_s:.1f} tokens/s, a step every {llama_step_ms:.1f} ms, "
            f"reading its {_mb(inputs.llamacpp_weight_bytes)} GGUF file at {llama_rate:.1f} GB/s "
            f"({_share(llama_rate, ceilings.copy_gb_per_s)} of the measured copy bandwidth). Molten {precision} "
            f"decoded {molten.decode_tokens_per_s:.1f} tokens/s, a step every {molten_step_ms:.1f} ms, reading its "
            f"{_mb(weights)} of weights at {molten_rate:.1f} GB/s ({_share(molten_rate, ceilings.copy_gb_per_s)})."
        )

    runs = dict(_engine_runs(inputs))
    integer = [name for name in INTEGER_PRECISIONS if name in runs]
    if precision not in INTEGER_PRECISIONS and integer:
        speeds = ", ".join(f"{name} {runs[name].decode_tokens_per_s:.1f} tokens/s" for name in integer)
        sentences.append(f"Molten's integer precisions decoded no faster than {precision} in this run ({speeds}).")

    # Explain with the integer kernel even when float32 won this run, because its
    # rate, not float32's, is what a fast quantized Molten is bound by.
    timings = inputs.kernels
    kernel_precision = next(
        (name for name in (precision, *INTEGER_PRECISIONS)
         if name in INTEGER_PRECISIONS and timings and timings.find(name, 1) and inputs.weight_bytes.get(name)),
        precision,
    )
    kernel = _kernel_sentence(inputs, kernel_precision)
    timing = timings.find(kernel_precision, 1) if timings else None
    float_timing = timings.find("float32", 1) if timings else None
    kernel_weights = inputs.weight_bytes.get(kernel_precision)
    kernel_run = runs.get(kernel_precision, molten)
    kernel_step_ms = 1000 / kernel_run.decode_tokens_per_s
    kernel_ms = None
    if kernel and timing and kernel_weights:
        kernel_ms = kernel_weights / (timing.weight_gb_per_s * 1e9) * 1000
        against = ""
        if float_timing and kernel_precision != "float32":
            against = f" The same product in float32 took {float_timing.ms:.2f} ms."
        sentences.append(
            f"The first bound is PyTorch's {kernel_precision} kernel, where llama.cpp runs its own hand-written "
            f"quantized kernels. {kernel} At that rate, reading all of Molten's {kernel_precision} "
            f"weights takes about {kernel_ms:.1f} ms per step, {_share(kernel_ms, llama_step_ms)} of llama.cpp's "
            f"whole step.{against}"
        )

    batch_one = inputs.profile(1)
    if batch_one is not None:
        rest = f"The rest of Molten's {kernel_precision} step"
        if kernel_ms is not None and kernel_ms < kernel_step_ms:
            rest = f"The other {kernel_step_ms - kernel_ms:.1f} ms of Molten's {kernel_step_ms:.1f} ms {kernel_precision} step"
        conversions = " conversions to and from bfloat16," if kernel_precision in INTEGER_PRECISIONS else ""
        outside_share = _share(batch_one.outside_operators_ms, batch_one.profiled_step_ms)
        sentences.append(
            f"{rest} is attention, norms,{conversions} sampling and Python. The second bound is that Python: the "
            f"{inputs.dtype} profile counts {batch_one.operator_calls:,.0f} torch operator calls (nested ones included) "
            "per step over "
            f"{inputs.num_layers} layers, and {batch_one.outside_operators_ms:.1f} ms of a "
            f"{batch_one.profiled_step_ms:.1f} ms step ({outside_share}, under the profiler) passed outside torch "
            f"operators. That time does not shrink with the weights; it alone is "
            f"{_share(batch_one.outside_operators_ms, llama_step_ms)} of llama.cpp's step."
        )
    return sentences


def explain_static_batch(target: TargetResult, inputs: BoundInputs) -> list[str]:
    """Explain continuous batching against static batches: what the batch sweep allows at best."""
    sentences = []
    sizes, dtype = inputs.sizes, inputs.dtype
    static = sizes.static_batch_size
    engine_sweep = {b: inputs.run(concurrent.sweep_key("engine", dtype, b)) for b in sizes.sweep_batch_sizes}
    engine_sweep = {b: run for b, run in engine_sweep.items() if run is not None}
    peer_static = inputs.run(concurrent.sweep_key("transformers", dtype, static))
    if engine_sweep and peer_static:
        best_batch, best = max(engine_sweep.items(), key=lambda pair: pair[1].output_tokens_per_s)
        best_ratio = best.output_tokens_per_s / peer_static.output_tokens_per_s
        verdict = "short of" if best_ratio < target.bound else "enough for"
        sentences.append(
            f"Both systems run the same {dtype} matmuls, so continuous batching wins only by keeping more sequences "
            "in each step and wasting fewer steps. The batch sweep's prompts all have one length, so static batches "
            f"there waste nothing on padding. Molten's best sweep rate, {best.output_tokens_per_s:.1f} tokens/s "
            f"at batch {best_batch}, is {best_ratio:.2f}x transformers' static batch {static} "
            f"({peer_static.output_tokens_per_s:.1f} tokens/s), {verdict} {target.bound:g}x even with every request "
            f"in one batch. The concurrent workload's uneven prompts give the measured {target.measured:.2f}x."
        )

    steps = {b: run.itl.p50_ms for b, run in engine_sweep.items() if run.itl}
    if 1 in steps and static in steps and static != 1:
        growth = steps[static] / steps[1]
        timings = inputs.kernels
        k1 = timings.find(dtype, 1) if timings else None
        kb = timings.find(dtype, static) if timings else None
        kernel = (
            f" One {dtype} LM-head-sized product took {k1.ms:.2f} ms at batch 1 and {kb.ms:.2f} ms at batch "
            f"{static} ({kb.ms / k1.ms:.2f}x)." if k1 and kb else ""
        )
        sentences.append(
            f"A step's cost grows with its batch on this CPU: Molten's ITL p50 in the sweep went from "
            f"{steps[1]:.0f} ms at batch 1 to {steps[static]:.0f} ms at batch {static} ({growth:.2f}x the time "
            f"for {static}x the tokens, so {static / growth:.2f}x the throughput).{kernel}"
        )

    batch_profile = inputs.profile(static)
    if batch_profile is not None:
        phases = dict(batch_profile.phases)
        attention, step = phases.get(ATTENTION_PHASE), phases.get(STEP_PHASE)
        parts = [f"matrix products took {_share(batch_profile.matmul_ms, batch_profile.profiled_step_ms)} of the "
                 f"step ({batch_profile.matmul_ms:.1f} of {batch_profile.profiled_step_ms:.1f} ms, torch.profiler)"]
        if attention and step:
            parts.append(f"attention, which gathers each sequence's KV blocks, {_share(attention, step)} "
                         f"({attention:.1f} of {step:.1f} ms, cProfile)")
        sentences.append(f"In the batch-{static} decode profile, " + " and ".join(parts) + ".")
    return sentences


def explain_matmul_ceiling(target: TargetResult, inputs: BoundInputs) -> list[str]:
    """Explain Molten's throughput against the FLOP ceiling: decode's few-row products do not reach that rate."""
    sentences = []
    dtype = inputs.dtype
    ceilings, timings = inputs.ceilings, inputs.kernels
    engine = inputs.run(concurrent.run_key("together", "engine", dtype))
    rate = ceilings.matmul_gflop_per_s.get(dtype) if ceilings else None
    if rate is None or timings is None or engine is None:
        return sentences

    rows = inputs.sizes.concurrent_requests
    measured = sorted((t for t in timings.timings if t.precision == dtype), key=lambda t: t.batch_size)
    if not measured:
        return sentences

    widest = measured[-1]
    rates = ", ".join(
        f"{_share(timings.gflop_per_s(t), rate)} of that rate at batch {t.batch_size} ({timings.gflop_per_s(t):.1f} "
        "GFLOP/s)"
        for t in measured
    )
    ceiling = engine.output_tokens_per_s / target.measured
    at_batch = ceiling * timings.gflop_per_s(widest) / rate
    sentences.append(
        f"The ceiling assumes the {rate:.1f} GFLOP/s of a {MATMUL_SIZE}^3 product, which has enough rows to keep the "
        f"arithmetic units busy. Decode multiplies one row per running sequence, at most {rows} here. One {dtype} "
        f"LM-head-sized product reached {rates}. At the batch-{widest.batch_size} rate the ceiling "
        f"would be {at_batch:.1f} tokens/s instead of {ceiling:.1f}, and Molten's "
        f"{engine.output_tokens_per_s:.1f} tokens/s is {_share(engine.output_tokens_per_s, at_batch)} of it."
    )

    batch_profile = inputs.profile(inputs.sizes.static_batch_size)
    if batch_profile is not None and batch_profile.matmul_ms > 0:
        sentences.append(
            f"The rest is time outside the products: in the batch-{batch_profile.batch_size} profile they took "
            f"{_share(batch_profile.matmul_ms, batch_profile.profiled_step_ms)} of the step, and "
            f"{batch_profile.outside_operators_ms:.1f} of {batch_profile.profiled_step_ms:.1f} ms passed outside "
            "torch operators."
        )
    return sentences


def explain_shared_prefix(target: TargetResult, inputs: BoundInputs) -> list[str]:
    """Explain prefix caching: the tokens it saves against the TTFT it saves, and where the rest of TTFT goes."""
    sizes = inputs.sizes
    on = inputs.run(shared_prefix.key(True))
    off = inputs.run(shared_prefix.key(False))
    if on is None or off is None or not on.ttft or not off.ttft:
        return []
    num_prompt = sizes.shared_prefix_requests * (sizes.shared_prefix_len + sizes.shared_suffix_len)
    prefilled_on = num_prompt * (1 - on.prefix_hit_rate)
    prefilled_off = num_prompt * (1 - off.prefix_hit_rate)
    token_ratio = prefilled_on / prefilled_off
    verdict = "would meet" if token_ratio <= target.bound else "would still miss"
    sentences = [
        f"With caching on, {on.prefix_hit_rate * 100:.0f}% of the prompt tokens came from the cache, so the engine "
        f"prefilled {prefilled_on:,.0f} tokens instead of {prefilled_off:,.0f}, {token_ratio:.2f} of the work. "
        f"A TTFT ratio equal to that {verdict} the bound; the measured ratio is {target.measured:.2f}."
    ]

    rate_on = prefilled_on / (on.ttft.p99_ms / 1000)
    rate_off = prefilled_off / (off.ttft.p99_ms / 1000)
    rates = (
        f"{prefilled_on:,.0f} tokens by about the last first token (TTFT p99 {on.ttft.p99_ms:,.0f} ms), "
        f"{rate_on:,.0f} tokens/s, against {rate_off:,.0f} tokens/s without caching"
    )
    if rate_on < rate_off:
        sentences.append(
            f"The cached prompts prefilled more slowly: {rates}. Each {sizes.shared_suffix_len}-token suffix attends "
            f"to the whole {sizes.shared_prefix_len + sizes.shared_suffix_len}-token prompt, and short prefill steps "
            "pay the per-step cost (Python and the layer loop) for fewer tokens."
        )
    else:
        sentences.append(f"The cached run prefilled {rates}, so the token rate is not what holds TTFT up.")

    own_ms = sizes.shared_suffix_len / rate_off * 1000
    shared_ms = sizes.shared_prefix_len / rate_off * 1000
    waiting_ms = on.ttft.mean_ms - own_ms
    sentences.append(
        f"Of the {on.ttft.mean_ms:,.0f} ms mean TTFT with caching, prefilling a request's own "
        f"{sizes.shared_suffix_len} tokens at the uncached rate accounts for {own_ms:,.0f} ms. The other "
        f"{waiting_ms:,.0f} ms is queueing: first for the shared {sizes.shared_prefix_len}-token prompt to be prefilled "
        f"once ({shared_ms:,.0f} ms at that rate), then for the steps of the other requests, which also decode "
        f"their {sizes.shared_new_tokens} new tokens in those steps once they have a first token."
    )
    return sentences


def explain_http(target: TargetResult, inputs: BoundInputs) -> list[str]:
    """Explain the HTTP door against the engine: what a token costs on the way out."""
    engine = inputs.run(concurrent.run_key("together", "engine", inputs.dtype))
    http = inputs.run(concurrent.run_key("together", "http", inputs.dtype))
    if engine is None or http is None or not engine.itl or not http.itl:
        return []
    return [
        f"Every token crosses Ray Serve and becomes an SSE event: the HTTP door's ITL p50 was {http.itl.p50_ms:.0f} ms "
        f"against the engine's {engine.itl.p50_ms:.0f} ms, and its TTFT p50 {http.ttft.p50_ms:,.0f} ms against "
        f"{engine.ttft.p50_ms:,.0f} ms."
    ]


EXPLAINERS: dict[str, Callable[[TargetResult, BoundInputs], list[str]]] = {
    TARGET_TRANSFORMERS: explain_transformers,
    TARGET_LLAMACPP: explain_llamacpp,
    TARGET_STATIC_BATCH: explain_static_batch,
    TARGET_MATMUL_CEILING: explain_matmul_ceiling,
    TARGET_SHARED_PREFIX: explain_shared_prefix,
    TARGET_HTTP: explain_http,
}


def bounds_section(targets: list[TargetResult], inputs: BoundInputs) -> Section:
    """Build one paragraph per missed target: how far it is and what bounds it, with this run's measurements."""
    missed = [target for target in targets if target.met is False]
    paragraphs = []
    if not missed:
        paragraphs.append("This run met every target it measured.")
    else:
        paragraphs.append(
            "For each target this run missed: what limits it, from figures measured in this same run (the machine "
            "ceilings, an LM-head-sized linear layer timed in each precision, the decode-step profile, and the "
            "workloads below). Profiler times are inflated by the profiler itself; read them as shares."
        )
    for target in missed:
        explainer = EXPLAINERS.get(target.kind)
        sentences = explainer(target, inputs) if explainer else []
        if not sentences:
            sentences = ["This run measured nothing that explains this miss further; the workload's section has "
                         "its figures."]
        paragraphs.append(f"**{target.name}** ({target.status}). " + " ".join(sentences))
    return Section(title=TITLE, paragraphs=paragraphs)

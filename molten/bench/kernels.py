"""Time one linear layer in each weight precision and at each decode batch size.

The layer has the shape of the model's LM head (hidden size in, vocabulary out), the
largest single product of a decode step, with seeded random weights. Timing it in
float32, int8 and int4 shows what each weight kernel reads per second, and timing the
float32 product at the batch sizes the benchmark uses shows how a step's matmuls grow
with the batch. `molten.bench.bounds` compares these rates with the machine ceilings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from molten.bench.context import BenchContext, Measurement, Stage
from molten.bench.roofline import best_seconds

KEY = "machine/linear-kernels"
"""Result key of the linear-layer timing."""
REPEATS = 5
"""Timed calls per case; the fastest is kept."""
TIME_BUDGET_S = 5.0
"""Time after which one case stops repeating."""


@dataclass(frozen=True)
class KernelTiming:
    precision: str
    """`float32`, `int8` or `int4` (weights; activations enter the integer kernels in bfloat16)."""
    batch_size: int
    """Rows multiplied at once: the number of sequences in a decode step."""
    ms: float
    """Fastest call, in milliseconds."""
    weight_bytes: int
    """Bytes of the layer's weights (integer codes, scales and zero points included)."""

    @property
    def weight_gb_per_s(self) -> float:
        """Weight bytes read per second, in GB/s (10^9 bytes)."""
        return self.weight_bytes / (self.ms / 1000) / 1e9


@dataclass(frozen=True)
class LinearKernels:
    in_features: int
    out_features: int
    timings: list[KernelTiming]

    def find(self, precision: str, batch_size: int) -> KernelTiming | None:
        return next((t for t in self.timings if t.precision == precision and t.batch_size == batch_size), None)

    def gflop_per_s(self, timing: KernelTiming) -> float:
        return 2 * timing.batch_size * self.in_features * self.out_features / (timing.ms / 1000) / 1e9


def batch_sizes(context: BenchContext) -> list[int]:
    """Return batch 1, transformers' static batch and the largest batch of the sweep, sorted."""
    sizes = context.sizes
    return sorted({1, sizes.static_batch_size, max(sizes.sweep_batch_sizes)})


def plan(context: BenchContext) -> list[Measurement]:
    return [Measurement(KEY, Stage.MACHINE, "machine: LM-head-sized linear layer in each precision", measure)]


def _module_bytes(module: nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in [*module.parameters(), *module.buffers()])


def build_layers(in_features: int, out_features: int, precisions: list[str]) -> dict[str, nn.Module]:
    """Build one seeded random linear layer and its quantized copies, by precision name."""
    from molten.quant.modules import Int4Linear, Int8Linear, quantize_int4
    from molten.quant.quantize import DEFAULT_INT4_GROUP_SIZE

    generator = torch.Generator().manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.02)
    layers: dict[str, nn.Module] = {"float32": linear}
    if "int8" in precisions:
        layers["int8"] = Int8Linear.from_linear(linear)
    if "int4" in precisions and in_features % DEFAULT_INT4_GROUP_SIZE == 0:
        codes, scales_and_zeros = quantize_int4(linear.weight, DEFAULT_INT4_GROUP_SIZE)
        layers["int4"] = Int4Linear.from_codes(codes, scales_and_zeros, DEFAULT_INT4_GROUP_SIZE)
    return layers


def time_layers(layers: dict[str, nn.Module], in_features: int, float_batch_sizes: list[int]) -> list[KernelTiming]:
    """Time every layer at batch 1, and the float32 layer at each of `float_batch_sizes` too."""
    timings = []
    generator = torch.Generator().manual_seed(1)
    for precision, layer in layers.items():
        sizes = float_batch_sizes if precision == "float32" else [1]
        for batch_size in sizes:
            x = torch.randn(batch_size, in_features, generator=generator)  # [batch, in]
            with torch.no_grad():
                seconds = best_seconds(lambda: layer(x), REPEATS, TIME_BUDGET_S)
            timings.append(KernelTiming(precision, batch_size, seconds * 1000, _module_bytes(layer)))
    return timings


def measure(context: BenchContext) -> LinearKernels:
    config = context.engine_model(context.first_dtype).config
    in_features, out_features = config.hidden_size, config.vocab_size
    layers = build_layers(in_features, out_features, list(context.options.quantized))
    return LinearKernels(in_features, out_features, time_layers(layers, in_features, batch_sizes(context)))

"""The roofline's two ceilings: peak memory bandwidth and peak FLOP rate, from settings or measured once.

On CPU the measurement reuses `molten.bench.roofline`: a 512 MiB float32 copy (bytes
read plus bytes written per second) and a 2048^3 matrix product in a child process. On a
CUDA device the same two kernels run on the GPU. Both are achievable peaks of simple
kernels, not datasheet numbers, so utilizations against them are estimates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from molten.telemetry.config import TelemetryConfig

logger = logging.getLogger(__name__)

CUDA_COPY_BYTES = 1024 * 2**20
"""Size of the tensor copied on a GPU to measure its bandwidth (1 GiB)."""
CUDA_MATMUL_SIZE = 8192
"""Side of the square matrices multiplied on a GPU to measure its FLOP rate."""


@dataclass(frozen=True)
class Peaks:
    bandwidth_bytes_per_s: float | None
    flops_per_s: float | None
    source: str
    """Origin of the values: `setting`, `measured ...`, `measuring`, or the reason they are unknown."""

    def to_dict(self) -> dict:
        return {
            "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "flops_per_s": self.flops_per_s,
            "source": self.source,
        }


def measure_cpu_peaks(dtype: str, repeats: int) -> tuple[float, float, str]:
    """Return (bytes/s, FLOP/s, description) of the CPU, measured with molten.bench.roofline."""
    from molten.bench import roofline

    bandwidth = roofline.measure_copy_gb_per_s(repeats) * 1e9
    gflops, timed_out = roofline.measure_matmul(dtype, repeats)
    description = (
        f"measured on cpu: {roofline.COPY_BYTES // 2**20} MiB float32 copy, "
        f"{roofline.MATMUL_SIZE}^3 {dtype} matmul, best of {repeats}"
    )
    if timed_out:
        description += f" (the matmul timed out, so its rate is an upper bound)"
    return bandwidth, gflops * 1e9, description


def measure_cuda_peaks(dtype: str, repeats: int) -> tuple[float, float, str]:
    """Return (bytes/s, FLOP/s, description) of GPU 0, measured with a device copy and a matrix product."""
    import torch

    from molten.bench.roofline import best_seconds

    device = torch.device("cuda", 0)

    def synchronized(run):
        def call():
            run()
            torch.cuda.synchronize(device)

        return call

    source = torch.ones(CUDA_COPY_BYTES // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy_s = best_seconds(synchronized(lambda: target.copy_(source)), repeats)
    del source, target

    generator = torch.Generator(device=device).manual_seed(0)
    size = CUDA_MATMUL_SIZE
    a = torch.randn(size, size, generator=generator, device=device).to(getattr(torch, dtype))
    b = torch.randn(size, size, generator=generator, device=device).to(getattr(torch, dtype))
    matmul_s = best_seconds(synchronized(lambda: torch.mm(a, b)), repeats)
    del a, b
    torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device)
    description = (
        f"measured on {name}: {CUDA_COPY_BYTES // 2**20} MiB float32 copy, {size}^3 {dtype} matmul, best of {repeats}"
    )
    return 2 * CUDA_COPY_BYTES / copy_s, 2 * size**3 / matmul_s, description


def resolve_peaks(config: TelemetryConfig, device: str, repeats: int = 3) -> Peaks:
    """Take each ceiling from `config`, and measure the unset ones on `device` ("cpu" or "cuda")."""
    bandwidth = config.peak_bandwidth_bytes_per_s
    flops = config.peak_flops_per_s
    if bandwidth is not None and flops is not None:
        return Peaks(bandwidth, flops, "setting")
    if not config.measure_peaks:
        return Peaks(bandwidth, flops, "setting (unset ceilings stay unknown: measure_peaks is off)")
    measure = measure_cuda_peaks if device == "cuda" else measure_cpu_peaks
    measured_bandwidth, measured_flops, description = measure(config.peak_dtype, repeats)
    logger.info(
        "roofline peaks %s: %.1f GB/s, %.1f GFLOP/s", description, measured_bandwidth / 1e9, measured_flops / 1e9
    )
    if bandwidth is None and flops is None:
        return Peaks(measured_bandwidth, measured_flops, description)
    if bandwidth is None:
        return Peaks(measured_bandwidth, flops, f"bandwidth {description}; FLOP rate from the setting")
    return Peaks(bandwidth, measured_flops, f"FLOP rate {description}; bandwidth from the setting")

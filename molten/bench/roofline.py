"""The machine's own ceilings: memory copy bandwidth and matrix-product rate, measured with torch.

A decode step that reads every weight once cannot produce more than
`bandwidth / weight bytes` steps per second, and a token costs at least
`2 * parameters` floating-point operations, so `FLOP rate / (2 * parameters)` bounds
tokens per second at any batch size. Both ignore attention and KV reads, so real
ceilings are a little lower; fractions of them are upper-bound estimates of efficiency.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass

import torch

COPY_BYTES = 512 * 2**20
"""Size of the float32 tensor copied to measure bandwidth (512 MiB)."""
MATMUL_SIZE = 2048
"""Side of the square matrices multiplied to measure the FLOP rate."""
TIME_BUDGET_S = 20.0
"""Time after which one ceiling measurement stops repeating."""
MATMUL_TIMEOUT_S = 90.0
"""Time after which one dtype's matmul measurement (child process start included) is stopped."""


@dataclass(frozen=True)
class Ceilings:
    copy_gb_per_s: float
    """Bytes read plus bytes written per second, in GB/s (10^9 bytes)."""
    matmul_gflop_per_s: dict[str, float]
    """FLOP rate of a MATMUL_SIZE^3 matrix product, by dtype name, in GFLOP/s."""
    matmul_timed_out: frozenset[str]
    """Dtypes whose product did not finish within `matmul_timeout_s`; their rate is an upper bound."""
    matmul_timeout_s: float
    repeats: int

    def decode_tokens_per_s(self, weight_bytes: int) -> float:
        """Single-stream ceiling: one decode step reads every weight once."""
        return self.copy_gb_per_s * 1e9 / weight_bytes

    def batched_tokens_per_s(self, num_parameters: int, dtype: str) -> float | None:
        """Ceiling at any batch size from the FLOP rate; None when `dtype` was not measured."""
        rate = self.matmul_gflop_per_s.get(dtype)
        return None if rate is None else rate * 1e9 / (2 * num_parameters)


def best_seconds(run, repeats: int, time_budget_s: float = TIME_BUDGET_S) -> float:
    """Call `run` once to warm up, then up to `repeats` times; return the fastest timed call in seconds.

    Calls stop once `time_budget_s` is spent. When even the warm-up used it up (a slow
    kernel, such as bfloat16 on a CPU without bfloat16 instructions), the warm-up call
    is the only measurement.
    """
    deadline = time.perf_counter() + time_budget_s
    started = time.perf_counter()
    run()
    best = time.perf_counter() - started
    timed = []
    for _ in range(repeats):
        if time.perf_counter() > deadline:
            break
        started = time.perf_counter()
        run()
        timed.append(time.perf_counter() - started)
    return min(timed) if timed else best


def measure_copy_gb_per_s(repeats: int) -> float:
    source = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    seconds = best_seconds(lambda: target.copy_(source), repeats)
    return 2 * COPY_BYTES / seconds / 1e9


def time_matmul(size: int, dtype: torch.dtype, repeats: int) -> float:
    """Return the fastest of `repeats` products of two size x size matrices, in seconds."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    return best_seconds(lambda: torch.mm(a, b), repeats)


def measure_matmul(dtype: str, repeats: int, timeout_s: float = MATMUL_TIMEOUT_S) -> tuple[float, bool]:
    """Return (GFLOP/s of a MATMUL_SIZE^3 product in `dtype`, whether it timed out).

    The product runs in a child process with this process's torch thread count, so a
    kernel that is unusably slow (bfloat16 on a CPU without bfloat16 instructions can
    take minutes) is stopped after `timeout_s`. A timed-out rate is an upper bound:
    one product did not finish in `timeout_s`.
    """
    command = [sys.executable, "-m", "molten.bench.roofline", str(MATMUL_SIZE), dtype, str(repeats),
               str(torch.get_num_threads())]
    flops = 2 * MATMUL_SIZE**3
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=True)
    except subprocess.TimeoutExpired:
        return flops / timeout_s / 1e9, True
    return flops / float(finished.stdout.strip().splitlines()[-1]) / 1e9, False


def measure_ceilings(dtypes: list[str], repeats: int, matmul_timeout_s: float = MATMUL_TIMEOUT_S) -> Ceilings:
    """Measure copy bandwidth, and the matmul rate in float32, bfloat16 and `dtypes`; best of `repeats` runs."""
    names = list(dict.fromkeys(["float32", "bfloat16", *dtypes]))
    matmuls = {name: measure_matmul(name, repeats, matmul_timeout_s) for name in names}
    return Ceilings(
        copy_gb_per_s=measure_copy_gb_per_s(repeats),
        matmul_gflop_per_s={name: rate for name, (rate, _) in matmuls.items()},
        matmul_timed_out=frozenset(name for name, (_, timed_out) in matmuls.items() if timed_out),
        matmul_timeout_s=matmul_timeout_s,
        repeats=repeats,
    )


if __name__ == "__main__":
    # Child process of measure_matmul: python -m molten.bench.roofline SIZE DTYPE REPEATS THREADS
    matrix_size, dtype_name, num_repeats, num_threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    torch.set_num_threads(int(num_threads))
    print(time_matmul(int(matrix_size), getattr(torch, dtype_name), int(num_repeats)))

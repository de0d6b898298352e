"""The hardware line printed with every result: CPU, cores, memory, torch build and threads."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import psutil
import torch

CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""CPU features that decide which torch kernels are fast (bfloat16 needs avx512_bf16 or AMX)."""


def read_cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """Return the CPU model name and the flags of interest it reports; ("unknown", []) without /proc/cpuinfo."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or "unknown", []
    model = "unknown"
    flags: list[str] = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            present = set(value.split())
            flags = [flag for flag in CPU_FLAGS_OF_INTEREST if flag in present]
    return model, flags


def hardware_line() -> str:
    model, flags = read_cpu_model()
    memory_gib = psutil.virtual_memory().total / 2**30
    flag_text = ", ".join(flags) if flags else "none of " + ", ".join(CPU_FLAGS_OF_INTEREST)
    return (
        f"CPU {model} ({flag_text}), {os.cpu_count()} logical cores, {memory_gib:.1f} GiB memory; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; Python {platform.python_version()}"
    )


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def default_dtypes() -> tuple[list[str], str | None]:
    """Return the dtypes to benchmark by default, and a note when bfloat16 is left out.

    bfloat16 is included only on CPUs with bfloat16 instructions; elsewhere torch falls
    back to kernels that are many times slower than float32.
    """
    _, flags = read_cpu_model()
    if any(flag in flags for flag in BF16_FLAGS):
        return ["float32", "bfloat16"], None
    return ["float32"], (
        f"bfloat16 was not benchmarked: this CPU reports neither {' nor '.join(BF16_FLAGS)}, so torch's bfloat16 "
        "kernels are slow here (see the bfloat16 matmul rate under Machine ceilings). Pass "
        "`--dtypes float32,bfloat16` to measure it anyway."
    )

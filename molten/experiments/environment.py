"""The machine and software a record was measured on, so figures from two machines are not mixed up."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import psutil
import torch

from molten.bench.hardware import read_cpu_model

PACKAGES = ("molten", "torch", "transformers", "ray", "gradio", "matplotlib", "numpy")


def package_versions() -> dict[str, str]:
    """Return the installed version of each package in PACKAGES ("not installed" when absent)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def gpu_description() -> str:
    """Return the names of the CUDA devices torch detects, or "none"."""
    if not torch.cuda.is_available():
        return "none"
    names = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    return ", ".join(names)


def collect_environment() -> dict[str, str]:
    """Return a flat dict of strings describing this machine, its load and the package versions."""
    cpu_model, flags = read_cpu_model()
    load_1, load_5, load_15 = os.getloadavg()
    environment = {
        "cpu": cpu_model,
        "cpu_flags": ", ".join(flags) or "-",
        "logical_cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
        "gpu": gpu_description(),
        "load_average": f"{load_1:.2f} {load_5:.2f} {load_15:.2f}",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    environment.update(package_versions())
    return environment

"""A stand-in for the `pynvml` module: the same function names, constants and error class.

Each fake GPU keeps its readings in NVML's own units (milliwatts, KB/s) and a map from
function name to the NVML error code that function raises, so a test can make one query
unsupported or a whole GPU lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_TEMPERATURE_GPU = 0
NVML_PCIE_UTIL_TX_BYTES = 0
NVML_PCIE_UTIL_RX_BYTES = 1

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
}


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML error {self.value}")


@dataclass
class FakeGpu:
    name: str = "NVIDIA Fake H100"
    memory_used: int = 30 * 2**30
    memory_total: int = 80 * 2**30
    processes: list[tuple[int, int | None]] = field(default_factory=lambda: [(4242, 20 * 2**30)])
    utilization_gpu: int = 87
    utilization_memory: int = 41
    sm_clock: int = 1755
    memory_clock: int = 2619
    power_mw: int = 312_500
    temperature: int = 64
    pcie_rx_kb: int = 2000
    pcie_tx_kb: int = 500
    failures: dict[str, int] = field(default_factory=dict)
    """Function name -> NVML error code it raises; "*" makes every query fail."""


class FakeNvml:
    """Module-like object with pynvml's API over a list of FakeGpu."""

    NVMLError = NVMLError
    NVML_CLOCK_SM = NVML_CLOCK_SM
    NVML_CLOCK_MEM = NVML_CLOCK_MEM
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_PCIE_UTIL_TX_BYTES = NVML_PCIE_UTIL_TX_BYTES
    NVML_PCIE_UTIL_RX_BYTES = NVML_PCIE_UTIL_RX_BYTES

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None):
        self.gpus = gpus
        self.init_error = init_error
        self.num_calls = 0

    def _gpu(self, handle: int, function: str) -> FakeGpu:
        self.num_calls += 1
        gpu = self.gpus[handle]
        code = gpu.failures.get(function, gpu.failures.get("*"))
        if code is not None:
            raise NVMLError(code)
        return gpu

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index, "nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return self._gpu(handle, "nvmlDeviceGetName").name.encode()

    def nvmlDeviceGetMemoryInfo(self, handle: int):
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(used=gpu.memory_used, total=gpu.memory_total, free=gpu.memory_total - gpu.memory_used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int):
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int):
        self._gpu(handle, "nvmlDeviceGetGraphicsRunningProcesses")
        return []

    def nvmlDeviceGetUtilizationRates(self, handle: int):
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=gpu.utilization_gpu, memory=gpu.utilization_memory)

    def nvmlDeviceGetClockInfo(self, handle: int, clock_type: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetClockInfo")
        return gpu.sm_clock if clock_type == NVML_CLOCK_SM else gpu.memory_clock

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return self._gpu(handle, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetPcieThroughput(self, handle: int, counter: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetPcieThroughput")
        return gpu.pcie_rx_kb if counter == NVML_PCIE_UTIL_RX_BYTES else gpu.pcie_tx_kb

"""GPU readings through NVML (the `pynvml` module of nvidia-ml-py), one field at a time.

Every query is wrapped on its own. When a query fails (the GPU does not support it, the
GPU fell off the bus, the driver went away), that field is None and the device's
`errors` maps the field's name to the NVML message. Nothing here raises after `open()`.

Units follow the telemetry sample: bytes, bytes/s, percent, MHz, watts, degrees Celsius.
NVML itself reports power in milliwatts and PCIe throughput in KB/s (taken as 1024
bytes, as nvidia-smi does), over a 20 ms window per PCIe query.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

GPU_FIELDS = (
    "name",
    "memory_used_bytes",
    "memory_total_bytes",
    "processes",
    "utilization_gpu_pct",
    "utilization_memory_pct",
    "sm_clock_mhz",
    "memory_clock_mhz",
    "power_w",
    "temperature_c",
    "pcie_rx_bytes_per_s",
    "pcie_tx_bytes_per_s",
)
"""Keys of one GPU reading, besides `index` and `errors`."""


class NvmlUnavailableError(RuntimeError):
    """NVML failed to start or found no GPU. The message gives the reason."""


def import_pynvml():
    """Import `pynvml` (nvidia-ml-py). Raises NvmlUnavailableError when the package is missing."""
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlUnavailableError(f"the nvidia-ml-py package is not installed ({exc})") from exc
    return pynvml


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlReader:
    """Reads every visible GPU through an NVML module (pynvml, or a stand-in with the same API in tests)."""

    def __init__(self, nvml=None):
        self.nvml = nvml
        self.num_gpus = 0
        self._handles: dict[int, Any] = {}

    def open(self) -> int:
        """Start NVML and return the number of GPUs. Raises NvmlUnavailableError with the reason."""
        if self.nvml is None:
            self.nvml = import_pynvml()
        try:
            self.nvml.nvmlInit()
            self.num_gpus = self.nvml.nvmlDeviceGetCount()
        except self.nvml.NVMLError as exc:
            raise NvmlUnavailableError(f"NVML failed to start: {_text(exc)}") from exc
        if self.num_gpus == 0:
            self.close()
            raise NvmlUnavailableError("NVML started but sees no GPU")
        logger.info("NVML started: %d GPU(s)", self.num_gpus)
        return self.num_gpus

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError as exc:
            logger.warning("nvmlShutdown failed: %s", _text(exc))

    def _handle(self, index: int) -> Any:
        # A handle that failed once (a lost GPU) is asked for again on the next read.
        if index not in self._handles:
            self._handles[index] = self.nvml.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    def read(self) -> list[dict]:
        """Read every GPU once: each reading has every field of GPU_FIELDS (None where it failed) and `errors`."""
        return [self.read_device(index) for index in range(self.num_gpus)]

    def read_device(self, index: int) -> dict:
        reading: dict[str, Any] = {"index": index, **{name: None for name in GPU_FIELDS}, "errors": {}}
        try:
            handle = self._handle(index)
        except self.nvml.NVMLError as exc:
            message = f"nvmlDeviceGetHandleByIndex failed: {_text(exc)}"
            reading["errors"] = {name: message for name in GPU_FIELDS}
            return reading

        nvml = self.nvml
        self._read(reading, ("name",), lambda: (_text(nvml.nvmlDeviceGetName(handle)),))
        self._read(reading, ("memory_used_bytes", "memory_total_bytes"), lambda: self._memory(handle))
        self._read(reading, ("processes",), lambda: (self._processes(handle),))
        self._read(reading, ("utilization_gpu_pct", "utilization_memory_pct"), lambda: self._utilization(handle))
        self._read(reading, ("sm_clock_mhz",), lambda: (nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),))
        self._read(reading, ("memory_clock_mhz",), lambda: (nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),))
        self._read(reading, ("power_w",), lambda: (nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,))
        self._read(
            reading, ("temperature_c",), lambda: (nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),)
        )
        self._read(reading, ("pcie_rx_bytes_per_s",), lambda: (self._pcie(handle, nvml.NVML_PCIE_UTIL_RX_BYTES),))
        self._read(reading, ("pcie_tx_bytes_per_s",), lambda: (self._pcie(handle, nvml.NVML_PCIE_UTIL_TX_BYTES),))
        return reading

    def _read(self, reading: dict, fields: tuple[str, ...], query: Callable[[], tuple]) -> None:
        """Store `query()`'s values under `fields`, or None and the NVML message for each field."""
        try:
            values = query()
        except self.nvml.NVMLError as exc:
            for name in fields:
                reading["errors"][name] = _text(exc)
            return
        for name, value in zip(fields, values):
            reading[name] = value

    def _memory(self, handle) -> tuple[int, int]:
        info = self.nvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.used), int(info.total)

    def _utilization(self, handle) -> tuple[float, float]:
        rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
        return float(rates.gpu), float(rates.memory)

    def _pcie(self, handle, counter: int) -> float:
        return self.nvml.nvmlDeviceGetPcieThroughput(handle, counter) * 1024.0

    def _processes(self, handle) -> list[dict]:
        """Compute and graphics processes on the GPU, merged by pid; `used_bytes` is None where NVML hides it."""
        by_pid: dict[int, int | None] = {}
        for process in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
            by_pid[int(process.pid)] = _used_bytes(process)
        try:
            graphics = self.nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)
        except self.nvml.NVMLError:
            graphics = []  # compute processes are the ones Molten runs; graphics ones are extra
        for process in graphics:
            by_pid.setdefault(int(process.pid), _used_bytes(process))
        return [{"pid": pid, "used_bytes": used} for pid, used in sorted(by_pid.items())]


def _used_bytes(process) -> int | None:
    used = getattr(process, "usedGpuMemory", None)
    return None if used is None else int(used)

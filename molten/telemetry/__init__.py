"""Telemetry readers: NVML for GPUs, psutil for CPU and memory, a ring buffer, and the roofline peaks.

Nothing here imports Ray; `molten.deployments.telemetry` wraps `TelemetrySampler` in the
`molten:telemetry` actor.
"""

from molten.telemetry.config import TelemetryConfig
from molten.telemetry.peaks import Peaks, resolve_peaks
from molten.telemetry.ring_buffer import RingBuffer
from molten.telemetry.sampler import TelemetrySampler

__all__ = ["Peaks", "RingBuffer", "TelemetryConfig", "TelemetrySampler", "resolve_peaks"]

"""Telemetry settings: sampling interval, history length, the roofline peaks and the actor's CPU share."""

from __future__ import annotations

from dataclasses import dataclass

from molten.config import DTYPES, ConfigError


@dataclass
class TelemetryConfig:
    interval_s: float = 0.5
    """Seconds between two telemetry samples."""
    history_samples: int = 1200
    """Samples kept in the ring buffer (1200 at 0.5 s is ten minutes); older ones are dropped."""
    peak_bandwidth_bytes_per_s: float | None = None
    """Memory bandwidth ceiling of the roofline, in bytes/s; None measures it once at start."""
    peak_flops_per_s: float | None = None
    """Compute ceiling of the roofline, in FLOP/s; None measures it once at start."""
    peak_dtype: str = "float32"
    """Dtype of the matrix product that measures the compute ceiling; use the served model's dtype."""
    measure_peaks: bool = True
    """Measure the ceilings that are not set once at start; False leaves them unknown (None)."""
    num_cpus: float = 0.05
    """Ray logical CPUs reserved for the telemetry actor."""

    def validate(self) -> None:
        if self.interval_s < 0.05:
            raise ConfigError("interval_s", f"interval_s must be at least 0.05 seconds, got {self.interval_s}")
        if self.history_samples < 1:
            raise ConfigError("history_samples", f"history_samples must be at least 1, got {self.history_samples}")
        for name in ("peak_bandwidth_bytes_per_s", "peak_flops_per_s"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(name, f"{name} must be positive or None (measure at start), got {value}")
        if self.peak_dtype not in DTYPES:
            raise ConfigError("peak_dtype", f"peak_dtype must be one of {', '.join(DTYPES)}, got {self.peak_dtype!r}")
        if self.num_cpus < 0:
            raise ConfigError("num_cpus", f"num_cpus must be 0 or more, got {self.num_cpus}")

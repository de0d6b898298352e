"""The `molten:telemetry` actor: samples NVML or CPU and memory on an interval, and keeps the roofline peaks.

One actor serves a Ray cluster (it is created with `get_if_exists`, so every Molten
application shares it). Engine workers and the ingress register their pids with it, so
the CPU view can show each Molten actor's RSS. The actor reads only its own node.

The actor is owned by the process that created it (`molten serve`, or a test), and
exits with it.
"""

from __future__ import annotations

import logging
import os
import threading

import ray

from molten.telemetry import Peaks, TelemetryConfig, TelemetrySampler, resolve_peaks

logger = logging.getLogger(__name__)

TELEMETRY_ACTOR_NAME = "molten:telemetry"
TELEMETRY_NAMESPACE = "molten"
"""Ray namespace of the actor, so Serve replicas (which run in Serve's namespace) find it by name."""

_actor_handles: list = []
"""Handles of the telemetry actors this process started or found, one per actor. Ray destroys
a non-detached actor, named or not, once its owner drops its last handle. A later lookup
returns a new handle to the same actor, so the first one must be kept, not replaced."""


@ray.remote
class TelemetryActor:
    def __init__(self, config: TelemetryConfig):
        self.config = config
        self.sampler = TelemetrySampler(config)
        self.sampler.cpu.register(TELEMETRY_ACTOR_NAME, os.getpid())
        self.sampler.start()
        self._peaks = Peaks(config.peak_bandwidth_bytes_per_s, config.peak_flops_per_s, "measuring")
        threading.Thread(target=self._find_peaks, name="molten-telemetry-peaks", daemon=True).start()

    def _find_peaks(self) -> None:
        device = "cpu"
        try:
            if self.sampler.source == "nvml":
                import torch

                # NOTE: this assumes the engine runs on GPU 0 whenever torch sees a GPU; the
                # engine's own device is not known here.
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self._peaks = resolve_peaks(self.config, device)
        except Exception as exc:
            logger.exception("measuring the roofline peaks on %s failed", device)
            self._peaks = Peaks(
                self.config.peak_bandwidth_bytes_per_s,
                self.config.peak_flops_per_s,
                f"measurement failed ({exc}); set peak_bandwidth_bytes_per_s and peak_flops_per_s",
            )

    def register_process(self, name: str, pid: int, torch_allocated_bytes: int | None = None) -> None:
        self.sampler.cpu.register(name, pid, torch_allocated_bytes)

    def snapshot(self, since: float | None = None) -> dict:
        return self.sampler.snapshot(since)

    def peaks(self) -> dict:
        return self._peaks.to_dict()


def start_telemetry_actor(config: TelemetryConfig | None = None):
    """Return the cluster's telemetry actor, creating it with `config` if it does not exist yet."""
    config = config or TelemetryConfig()
    config.validate()
    actor = TelemetryActor.options(
        name=TELEMETRY_ACTOR_NAME,
        namespace=TELEMETRY_NAMESPACE,
        get_if_exists=True,
        num_cpus=config.num_cpus,
        # Snapshots, registrations and peak requests run on threads next to the sampler,
        # so a slow snapshot never delays a registration.
        max_concurrency=4,
    ).remote(config)
    if actor not in _actor_handles:
        _actor_handles.append(actor)
    return actor


def find_telemetry_actor():
    """Return the running telemetry actor, or None when none was started."""
    try:
        return ray.get_actor(TELEMETRY_ACTOR_NAME, namespace=TELEMETRY_NAMESPACE)
    except ValueError:
        return None


UNAVAILABLE_NOTICE = "The molten:telemetry actor is not running, so there are no telemetry samples."


async def read_telemetry(since: float | None = None) -> dict:
    """Return the telemetry actor's samples after `since`, or an empty view with a notice when it is not running."""
    actor = find_telemetry_actor()
    if actor is not None:
        try:
            return await actor.snapshot.remote(since)
        except ray.exceptions.RayActorError as exc:
            logger.warning("reading %s failed: %s", TELEMETRY_ACTOR_NAME, exc)
    return {"source": None, "notice": UNAVAILABLE_NOTICE, "interval_s": None, "num_failed_samples": 0, "samples": []}


async def read_peaks() -> dict:
    """Return the roofline peaks from the telemetry actor; unknown (None) when it is not running."""
    actor = find_telemetry_actor()
    if actor is not None:
        try:
            return await actor.peaks.remote()
        except ray.exceptions.RayActorError as exc:
            logger.warning("reading the peaks from %s failed: %s", TELEMETRY_ACTOR_NAME, exc)
    return {"bandwidth_bytes_per_s": None, "flops_per_s": None, "source": "the telemetry actor is not running"}


def register_with_telemetry(name: str, torch_allocated_bytes: int | None = None) -> None:
    """Ask the telemetry actor to watch this process; log and go on when there is none."""
    actor = find_telemetry_actor()
    if actor is None:
        logger.info("no %s actor is running, so %s (pid %d) is not watched", TELEMETRY_ACTOR_NAME, name, os.getpid())
        return
    actor.register_process.remote(name, os.getpid(), torch_allocated_bytes)

"""The telemetry sampler: reads NVML (or CPU and memory) on an interval into a ring buffer.

`TelemetrySampler` picks its source once, at start. With NVML and at least one GPU the
source is "nvml" and each sample contains one reading per GPU. Otherwise the source is
"cpu", the reason is logged once and kept as the `notice` every snapshot carries, and
`gpus` stays empty. CPU, memory and per-process RSS are read in both cases.

A sample is a plain dict, so it crosses Ray and HTTP unchanged:
    {"time": unix seconds, "gpus": [GPU reading, ...], "cpu": CPU reading}
with the readings described in `molten.telemetry.nvml` and `molten.telemetry.cpu`.
"""

from __future__ import annotations

import logging
import threading
import time

from molten.telemetry.config import TelemetryConfig
from molten.telemetry.cpu import CpuReader
from molten.telemetry.nvml import NvmlReader, NvmlUnavailableError
from molten.telemetry.ring_buffer import RingBuffer

logger = logging.getLogger(__name__)

MAX_LOGGED_FAILURES = 5
"""Failed samples logged with a traceback; later failures are only counted."""


class TelemetrySampler:
    def __init__(self, config: TelemetryConfig, nvml=None):
        """`nvml` is the NVML module to use; None imports pynvml. Tests pass a stand-in."""
        config.validate()
        self.config = config
        self.buffer: RingBuffer[dict] = RingBuffer(config.history_samples)
        self.cpu = CpuReader()
        self.nvml_reader: NvmlReader | None = NvmlReader(nvml)
        self.notice: str | None = None
        try:
            self.nvml_reader.open()
        except NvmlUnavailableError as exc:
            self.nvml_reader = None
            self.notice = f"No NVIDIA GPU found ({exc}): showing CPU and memory"
            logger.warning("%s", self.notice)
        self.num_failed_samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def source(self) -> str:
        return "nvml" if self.nvml_reader is not None else "cpu"

    def sample(self) -> dict:
        """Read every source once, append the sample to the buffer and return it."""
        now = time.time()
        gpus = self.nvml_reader.read() if self.nvml_reader is not None else []
        sample = {"time": now, "gpus": gpus, "cpu": self.cpu.read()}
        self.buffer.append(sample)
        return sample

    def start(self) -> None:
        """Sample every `interval_s` on a daemon thread until `stop()`."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="molten-telemetry-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        logger.info("telemetry sampling started: source=%s interval=%.2fs", self.source, self.config.interval_s)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.sample()
            except Exception:
                # A failed sample leaves a gap in the history; it must never end the sampler.
                self.num_failed_samples += 1
                if self.num_failed_samples <= MAX_LOGGED_FAILURES:
                    logger.exception("telemetry sample %d failed", self.num_failed_samples)
            elapsed = time.monotonic() - started
            self._stop.wait(max(0.0, self.config.interval_s - elapsed))
        logger.info("telemetry sampling stopped")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.config.interval_s + 1)
        if self.nvml_reader is not None:
            self.nvml_reader.close()

    def snapshot(self, since: float | None = None) -> dict:
        """Return the telemetry view: source, notice, interval and the samples taken after `since` (unix seconds)."""
        return {
            "source": self.source,
            "notice": self.notice,
            "interval_s": self.config.interval_s,
            "num_failed_samples": self.num_failed_samples,
            "samples": self.buffer.items_after(lambda sample: sample["time"], since),
        }

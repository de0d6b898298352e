"""CPU and memory readings through psutil: utilization, system memory, and the Molten processes' RSS.

Molten's processes (engine workers, the ingress, the telemetry actor itself) register by
pid. A registered process that has exited is dropped at the next read. Engine workers
also report the bytes of their tensors (weights and the KV pool). Torch keeps no
allocation counter for CPU memory, so the sum of those reports is the sample's
`torch_allocated_bytes`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import psutil

logger = logging.getLogger(__name__)


@dataclass
class MoltenProcess:
    name: str
    """Actor name as shown in the Ray dashboard, e.g. `molten:decode:smollm2-135m-instruct`."""
    pid: int
    torch_allocated_bytes: int | None = None
    """Bytes of the process's tensors (weights and KV pool), or None for a process without a model."""
    process: psutil.Process | None = field(default=None, repr=False)


class CpuReader:
    def __init__(self) -> None:
        self._processes: dict[int, MoltenProcess] = {}
        self._lock = threading.Lock()
        # psutil's utilization counters report the time since the previous call, so the
        # first call only sets the starting point.
        psutil.cpu_percent(interval=None)

    def register(self, name: str, pid: int, torch_allocated_bytes: int | None = None) -> None:
        """Start reporting a process; a second registration of the same pid replaces the first."""
        try:
            process = psutil.Process(pid)
            process.cpu_percent(interval=None)
        except psutil.Error as exc:
            logger.warning("cannot watch process %s (pid %d): %s", name, pid, exc)
            return
        with self._lock:
            self._processes[pid] = MoltenProcess(name, pid, torch_allocated_bytes, process)
        logger.info("watching %s (pid %d)", name, pid)

    def registered(self) -> list[MoltenProcess]:
        with self._lock:
            return list(self._processes.values())

    def read(self) -> dict:
        """Read CPU utilization, system memory, torch bytes and each live Molten process once."""
        memory = psutil.virtual_memory()
        actors = []
        torch_bytes = None
        for entry in self.registered():
            try:
                with entry.process.oneshot():
                    rss = entry.process.memory_info().rss
                    cpu_pct = entry.process.cpu_percent(interval=None)
            except psutil.NoSuchProcess:
                logger.info("%s (pid %d) exited; no longer watched", entry.name, entry.pid)
                with self._lock:
                    self._processes.pop(entry.pid, None)
                continue
            except psutil.Error as exc:
                actors.append({"name": entry.name, "pid": entry.pid, "rss_bytes": None, "cpu_pct": None,
                               "error": str(exc)})
                continue
            actors.append({"name": entry.name, "pid": entry.pid, "rss_bytes": rss, "cpu_pct": cpu_pct})
            if entry.torch_allocated_bytes is not None:
                torch_bytes = (torch_bytes or 0) + entry.torch_allocated_bytes
        return {
            "utilization_pct": psutil.cpu_percent(interval=None),
            "num_cores": psutil.cpu_count(),
            # total - available counts what the system cannot hand out without swapping,
            # which is what "memory used" means to a person watching for pressure.
            "system_memory_used_bytes": memory.total - memory.available,
            "system_memory_total_bytes": memory.total,
            "torch_allocated_bytes": torch_bytes,
            "actors": actors,
        }

"""The model manager: which models are deployed, their state and memory; load, unload, swap.

`ModelManager` is a Serve deployment named `molten:model-manager` inside the Molten
application. It deploys each loaded model's engine workers as their own Serve
applications, with no HTTP route (`<app>:<model>:prefill` and `...:decode`, or
`...:colocated`), and deletes them on unload. The ingress requests a *lease* from it before
each request: the lease names the worker deployments that serve the requested model
(after resolving aliases and A/B weights) and counts the request as in flight until the
ingress releases it. Counting leases here, not in the workers, closes the race between
picking a route and deleting its workers: a model is deleted only when no lease on it is
left, or when the drain timeout passes.

States: loading → ready → draining → unloaded, or loading → failed (with the error).

Memory ledger: each worker measures its own process (weights, KV pool, the rest; see
`molten.deployments.workers.measure_worker_memory`), and the manager snapshots the
system view (system memory used, the RSS of the manager, ingress and worker processes,
NVML per-process GPU memory) before load, after load and after unload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field

import psutil
import ray
from ray import serve

from molten.deployments.router import PreparedRequest, RequestRouter
from molten.deployments.settings import MODES, ServeSettings, served_model_id
from molten.deployments.workers import ColocatedWorker, DecodeWorker, PrefillWorker
from molten.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

MANAGER_NAME = "molten:model-manager"

STATES = ("loading", "ready", "draining", "unloaded", "failed")

WORKER_CLASSES = {"prefill": PrefillWorker, "decode": DecodeWorker, "colocated": ColocatedWorker}

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")

CPU_TOLERANCE = 1e-6
"""Slack when comparing Ray CPU shares, which are fractions."""

CPU_RECHECK_S = 2.0
"""How long a load that finds too few free Ray CPUs re-reads the count before it is rejected."""

CPU_RECHECK_INTERVAL_S = 0.25

POLL_INTERVAL_S = 0.05
"""How often a waiting call re-checks a model's state or in-flight count."""

DEPLOY_PROGRESS_INTERVAL_S = 1.0
"""How often a load re-reads Serve's status of its worker applications."""

DEPLOY_PROGRESS_REPEAT_S = 15.0
"""A deploy progress line that did not change is repeated this often, with the time waited so far."""

UNSCHEDULED_MARKER = "to be scheduled"
"""Text of Serve's status message for a replica that Ray could not place for lack of resources."""

CANCEL_CLEANUP_TIMEOUT_S = 60.0
"""Seconds a cancelled load waits for its Serve deploy call to return before deleting its applications."""

WORKER_SHUTDOWN_WAIT_LOOP_S = 0.5
"""Serve's check interval for ongoing requests when a worker stops; the manager drains first, so short."""

DEFAULT_RUNTIME_BYTES = 400 * 2**20
"""Estimated memory of one worker process before weights (Python, torch, Ray), used until a load measures it."""


BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
"""Approximate bytes per weight at each precision, for estimating a model's size before it loads."""


def _explicit_precision(spec: str) -> str | None:
    """Return the precision suffix of `<model>:<precision>`, or None when the spec names none."""
    base, _, suffix = spec.rpartition(":")
    return suffix if base and suffix in PRECISIONS else None


def _split_precision(spec: str) -> tuple[str, str]:
    """Split `<model>:<precision>` into (model, precision); no suffix means fp32."""
    base, _, suffix = spec.rpartition(":")
    return (base, suffix) if base and suffix in PRECISIONS else (spec, "fp32")


def roles_for_mode(mode: str) -> tuple[str, ...]:
    return ("colocated",) if mode == "colocated" else ("prefill", "decode")


def model_spec_with_precision(model: str, precision: str | None) -> str:
    """Join a model and a precision into the `<model>:<precision>` spec that model loading reads.

    The spec is passed to the workers' `load_model` unchanged. Raises ValueError for an
    unknown precision or one that contradicts a suffix already on `model`.
    """
    if not precision:
        return model
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    base, _, suffix = model.rpartition(":")
    if base and suffix in PRECISIONS:
        if suffix != precision:
            raise ValueError(f"model {model!r} already names precision {suffix!r}, which contradicts {precision!r}")
        return model
    return f"{model}:{precision}"


@dataclass
class ModelRecord:
    """One deployed (or once deployed) model, as the manager tracks it."""

    model_id: str
    """Id clients send in `model`, e.g. `tiny-random-llama` or `smollm2-135m-instruct:int8`."""
    spec: str
    """Argument of the workers' `load_model`: catalog name, path or hub id, with any precision suffix."""
    mode: str
    worker_num_cpus: float = 0.25
    """Ray CPUs reserved by each of this model's workers."""
    state: str = "loading"
    error: str | None = None
    generation: int = 0
    """Counts loads of this model id, so the ingress drops routers of an earlier deployment."""
    app_names: dict[str, str] = field(default_factory=dict)
    """Serve application of each worker role."""
    deployment_names: dict[str, str] = field(default_factory=dict)
    progress: list[dict] = field(default_factory=list)
    """Load stages so far: {"stage", "message", "elapsed_s"}; the last one is the current stage."""
    requested_at: float = field(default_factory=time.time)
    ready_at: float | None = None
    load_seconds: float | None = None
    """Load request → every worker deployed and healthy."""
    cold_start_seconds: float | None = None
    """Load request → first token of the warm-up request."""
    unload_seconds: float | None = None
    drain_seconds: float | None = None
    max_model_len: int | None = None
    in_flight: int = 0
    last_used: float = field(default_factory=time.time)
    workers: list[dict] = field(default_factory=list)
    """Each worker's memory ledger, measured after load."""
    memory_before_load: dict | None = None
    memory_after_load: dict | None = None
    memory_after_unload: dict | None = None
    estimated_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        """Measured memory of this model's worker processes, or the estimate until they are measured."""
        if self.workers:
            return sum(worker["total_bytes"] for worker in self.workers)
        return self.estimated_bytes or 0

    def to_dict(self) -> dict:
        """The record as JSON; `memory` sums the ledgers over `num_workers` workers.

        An unloaded or failed model holds no memory: its figures are 0 and `released_bytes` is
        what its workers held (the before and after snapshots stay in the record). A loading
        model's `total_bytes` is the estimate (`estimated` is true) until its workers are measured.
        """
        data = dataclasses.asdict(self)
        memory = {
            "weight_bytes": sum(worker["weight_bytes"] for worker in self.workers),
            "kv_pool_bytes": sum(worker["kv_pool_bytes"] for worker in self.workers),
            "other_bytes": sum(worker["other_bytes"] for worker in self.workers),
            "total_bytes": self.total_bytes,
            "num_workers": len(self.workers) or len(roles_for_mode(self.mode)),
            "estimated": not self.workers,
            "released_bytes": 0,
        }
        if self.state in ("unloaded", "failed"):
            released = sum(worker["total_bytes"] for worker in self.workers)
            memory.update(weight_bytes=0, kv_pool_bytes=0, other_bytes=0, total_bytes=0, released_bytes=released)
        data["memory"] = memory
        data["progress_stage"] = self.progress[-1]["stage"] if self.progress else None
        return data


class ManagerError(Exception):
    """A manager call the client must see as an HTTP error."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, retry_after_s: int | None = None
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict:
        return {
            "error": {
                "status": self.status,
                "message": str(self),
                "code": self.code,
                "param": self.param,
                "retry_after_s": self.retry_after_s,
            }
        }


def ray_cpus() -> tuple[float, float]:
    """Return (free, total) logical CPUs of the Ray cluster this process belongs to."""
    return ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)


def process_rss_bytes(pids: set[int]) -> dict[int, int]:
    """Return the RSS of each pid that still exists on this node."""
    sizes = {}
    for pid in sorted(pids):
        try:
            sizes[pid] = psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sizes


def gpu_memory_snapshot(pids: set[int]) -> dict | None:
    """Return NVML's device memory in use and each listed pid's share, or None without an NVIDIA GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU, or no pynvml
        return None
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            processes = {
                process.pid: process.usedGpuMemory
                for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if process.pid in pids
            }
            devices.append({"index": index, "used_bytes": info.used, "total_bytes": info.total, "processes": processes})
        return {"devices": devices}
    finally:
        pynvml.nvmlShutdown()


def measure_memory(pids: set[int]) -> dict:
    """Measure system memory, the RSS of `pids` and their GPU memory (NVML) at this moment."""
    rss = process_rss_bytes(pids)
    system = psutil.virtual_memory()
    return {
        "time": time.time(),
        "system_used_bytes": system.total - system.available,
        "system_total_bytes": system.total,
        "process_rss_bytes": {str(pid): size for pid, size in rss.items()},
        "molten_rss_bytes": sum(rss.values()),
        "gpu": gpu_memory_snapshot(pids),
    }


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=10)
class ModelManager:
    """Owns the deployed models: loads, unloads and swaps them, hands out routing leases, keeps memory ledgers."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.records: dict[str, ModelRecord] = {}
        self.aliases: dict[str, dict[str, float]] = {}
        """Alias → {model id: weight}; a request for the alias goes to one target, chosen by weight."""
        # A lease points at the record it counted on, so a late release after a reload of the
        # same model id cannot decrement the new record's in-flight count.
        self.leases: dict[str, ModelRecord] = {}
        """Lease id → model id, for requests in flight."""
        self.cold_starts: list[dict] = []
        """Every finished load: model, mode, load and cold-start seconds, and the swap it was part of."""
        self.client_pids: set[int] = set()
        """Ingress processes that took leases; their RSS belongs to the system view of memory."""
        self._tasks: set[asyncio.Task] = set()
        self._load_tasks: dict[str, asyncio.Task] = {}
        """Model id → the task running its latest load, so an unload can cancel it."""
        self._deploy_calls: dict[str, asyncio.Future] = {}
        """Model id → its Serve deploy call, which a cancelled load waits for before deleting the applications."""
        self._random = random.Random()
        logger.info("model manager ready (app %s, pid %d)", settings.app_name, os.getpid())

    # -- status ------------------------------------------------------------------------

    async def status(self) -> dict:
        """Return every model's record, the aliases, the memory budget and the cold-start history."""
        return {
            "models": [record.to_dict() for record in self.records.values()],
            "aliases": {alias: dict(targets) for alias, targets in self.aliases.items()},
            "memory": self._budget_view(),
            "system": await self._memory_snapshot_off_loop(),
            "cold_starts": list(self.cold_starts),
            "manager_pid": os.getpid(),
            "settings": dataclasses.asdict(self.settings.manager),
        }

    async def model_status(self, model: str) -> dict:
        record = self.records.get(model)
        if record is None:
            return ManagerError(404, f"model {model!r} was never loaded here", "model_not_found", "model").to_dict()
        return record.to_dict()

    async def served_model_ids(self) -> list[str]:
        """Model ids and aliases a request can name now: ready or loading models, then aliases."""
        ids = [record.model_id for record in self.records.values() if record.state in ("ready", "loading")]
        return ids + sorted(self.aliases)

    async def routing_table(self) -> dict:
        """Return the worker deployments of every ready model, for the ingress's info and KV views."""
        return {record.model_id: self._route(record) for record in self.records.values() if record.state == "ready"}

    def _budget_view(self) -> dict:
        """Memory of loaded (ready or draining) models, estimates of loading ones, and what the budget leaves free.

        Loading models count against the budget by their estimate, so two loads started
        together cannot both take the same free memory, but they are not in `used_bytes`.
        """
        budget_mib = self.settings.manager.memory_budget_mib
        used = sum(record.total_bytes for record in self.records.values() if record.state in ("ready", "draining"))
        loading = sum(record.total_bytes for record in self.records.values() if record.state == "loading")
        budget = None if budget_mib is None else budget_mib * 2**20
        return {
            "budget_bytes": budget,
            "used_bytes": used,
            "loading_estimate_bytes": loading,
            "free_bytes": None if budget is None else budget - used - loading,
        }

    def _molten_pids(self) -> set[int]:
        worker_pids = {
            worker["pid"]
            for record in self.records.values()
            if record.state in ("ready", "draining", "loading")
            for worker in record.workers
        }
        return {os.getpid()} | self.client_pids | worker_pids

    def _memory_snapshot(self) -> dict:
        """Measure the system view: system memory, RSS of Molten's processes, GPU memory per process."""
        return measure_memory(self._molten_pids())

    async def _memory_snapshot_off_loop(self) -> dict:
        """Measure the same snapshot in a thread, so psutil and NVML calls do not stall the leases."""
        return await asyncio.to_thread(measure_memory, self._molten_pids())


    # -- leases (called by the ingress for every request) --------------------------------

    async def acquire(self, model: str, client_pid: int | None = None) -> dict:
        """Pick the deployment that serves `model` and count one request in flight on it.

        Waits up to `load_wait_timeout_s` for a model that is loading. Returns the route
        with a `lease_id` to pass to `release`, or {"error": {...}} (404 or 503).
        """
        if client_pid is not None:
            self.client_pids.add(client_pid)
        target = self._pick_target(model)
        record = self.records.get(target)
        if record is not None and record.state == "loading":
            timeout = self.settings.manager.load_wait_timeout_s
            await self._wait_until(lambda: record.state != "loading", timeout)
            if record.state == "loading":
                retry = self.settings.manager.retry_after_s
                stage = record.progress[-1]["message"] if record.progress else "starting"
                return ManagerError(
                    503,
                    f"model {target!r} is still loading ({stage}); retry in {retry} s",
                    "model_loading",
                    "model",
                    retry_after_s=retry,
                ).to_dict()
        if record is None or record.state != "ready" or self.records.get(target) is not record:
            return await self._not_found(model, record)
        lease_id = uuid.uuid4().hex
        self.leases[lease_id] = record
        record.in_flight += 1
        record.last_used = time.time()
        return {"lease_id": lease_id, "requested": model, **self._route(record)}

    async def release(self, lease_id: str) -> None:
        record = self.leases.pop(lease_id, None)
        if record is not None:
            record.in_flight = max(0, record.in_flight - 1)

    def _pick_target(self, model: str) -> str:
        targets = self.aliases.get(model)
        if not targets:
            return model
        names = list(targets)
        return self._random.choices(names, weights=[targets[name] for name in names])[0]

    def _route(self, record: ModelRecord) -> dict:
        return {
            "model_id": record.model_id,
            "spec": record.spec,
            "mode": record.mode,
            "generation": record.generation,
            "max_model_len": record.max_model_len,
            "deployments": {
                role: {"app_name": record.app_names[role], "deployment_name": record.deployment_names[role]}
                for role in roles_for_mode(record.mode)
            },
        }

    async def _not_found(self, model: str, record: ModelRecord | None) -> dict:
        served = await self.served_model_ids()
        if record is not None and record.state == "failed":
            reason = f"model {model!r} failed to load: {record.error}"
        elif record is not None and record.state in ("draining", "unloaded"):
            reason = f"model {model!r} is {record.state}"
        else:
            reason = f"model {model!r} is not loaded"
        served_text = ", ".join(served) if served else "none"
        message = (
            f"{reason}; served models: {served_text}. Load a catalog model with POST /v1/molten/models/load "
            "or `molten models load MODEL`"
        )
        error = ManagerError(404, message, "model_not_found", "model").to_dict()
        error["error"]["served"] = served
        return error

    # -- load --------------------------------------------------------------------------

    async def load(
        self,
        model: str,
        mode: str | None = None,
        precision: str | None = None,
        wait: bool = False,
        worker_num_cpus: float | None = None,
    ) -> dict:
        """Start loading `model` (or return its record if it is already loading or ready).

        With `wait`, returns when the load finished (ready, failed, or unloaded by a cancelling
        unload). A load whose workers need more Ray CPUs than are free is rejected at once
        with HTTP 507 naming the CPUs needed and free. A load past the memory budget first
        unloads idle models, least recently used first; when that is not enough it is
        rejected with HTTP 507 naming the memory needed and free. `worker_num_cpus`
        overrides the server's Ray CPU share per worker for this model.
        """
        try:
            record = await self._start_load(model, mode, precision, worker_num_cpus=worker_num_cpus)
        except ManagerError as exc:
            return exc.to_dict()
        if wait:
            await self._wait_until(lambda: record.state in ("ready", "failed", "unloaded"), None)
        return record.to_dict()

    async def _start_load(
        self,
        model: str,
        mode: str | None,
        precision: str | None,
        *,
        swap_of: str | None = None,
        worker_num_cpus: float | None = None,
        check_cpus: bool = True,
    ) -> ModelRecord:
        mode = mode or self.settings.mode
        num_cpus = self.settings.worker_num_cpus if worker_num_cpus is None else worker_num_cpus
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
            raise ManagerError(
                400, f"worker_num_cpus must be a number > 0, got {num_cpus!r}", "invalid_cpus", "worker_num_cpus"
            )
        if mode not in MODES:
            raise ManagerError(400, f"mode must be one of {', '.join(MODES)}, got {mode!r}", "invalid_mode", "mode")
        if not isinstance(model, str) or not model.strip():
            raise ManagerError(
                400, "model must be a non-empty string naming a catalog model, path or hub id", "invalid_model", "model"
            )
        try:
            spec = model_spec_with_precision(model.strip(), precision)
        except ValueError as exc:
            raise ManagerError(400, str(exc), "invalid_precision", "precision") from None
        model_id = served_model_id(spec)
        if model_id in self.aliases:
            raise ManagerError(
                409,
                f"{model_id!r} is an alias; delete the alias before loading a model of that name",
                "alias_conflict",
                "model",
            )

        existing = self.records.get(model_id)
        if existing is not None and existing.state in ("loading", "ready"):
            return existing
        if existing is not None and existing.state == "draining":
            await self._wait_until(lambda: existing.state != "draining", self.settings.manager.drain_timeout_s + 60)

        if check_cpus:
            needed, free, total = await self._cpu_room(mode, num_cpus)
            if needed > free + CPU_TOLERANCE:
                raise self._cpu_error(model_id, mode, num_cpus, needed, free, total)
        estimated = self._estimate_bytes(spec, mode)
        await self._make_room(estimated, exclude=swap_of)

        generation = existing.generation + 1 if existing is not None else 1
        record = ModelRecord(
            model_id=model_id,
            spec=spec,
            mode=mode,
            worker_num_cpus=float(num_cpus),
            generation=generation,
            estimated_bytes=estimated,
        )
        record.memory_before_load = self._memory_snapshot()
        self.records[model_id] = record
        self._load_tasks[model_id] = self._spawn(self._run_load(record, swap_of))
        logger.info("loading model %s (spec %s, %s mode, generation %d)", model_id, spec, mode, generation)
        return record

    async def _cpu_room(self, mode: str, worker_num_cpus: float) -> tuple[float, float, float]:
        """Return (CPUs the mode's workers need, Ray CPUs free now, Ray CPUs in the cluster)."""
        needed = len(roles_for_mode(mode)) * worker_num_cpus
        # Ray's free count is refreshed a moment after actors start or stop: right after an
        # unload the CPUs may not show as free yet, so a shortfall is re-read for a moment.
        # NOTE: for the same reason a load started right after another may pass this check
        # and wait for CPUs; the deploy stage fails it when Serve reports its workers
        # unscheduled (see _deploy).
        deadline = time.monotonic() + CPU_RECHECK_S
        while True:
            free, total = await asyncio.to_thread(ray_cpus)
            if needed <= free + CPU_TOLERANCE or time.monotonic() >= deadline:
                return needed, free, total
            await asyncio.sleep(CPU_RECHECK_INTERVAL_S)

    @staticmethod
    def _cpu_error(model_id: str, mode: str, worker_num_cpus: float, needed: float, free: float, total: float):
        num_workers = len(roles_for_mode(mode))
        fixes = ["unload a model (`molten models unload MODEL`)"]
        if mode != "colocated":
            fixes.append("load it with --mode colocated (one worker)")
        fixes.append(
            "start the server with a lower `molten serve --worker-cpus` (Ray CPUs per worker)"
        )
        return ManagerError(
            507,
            f"not enough free Ray CPUs to load {model_id!r} in {mode} mode: its {num_workers} worker(s) need "
            f"{needed:.2f} CPU ({worker_num_cpus:g} each, worker_num_cpus) and {free:.2f} of the cluster's "
            f"{total:.2f} CPU are free. To fix: " + ", or ".join(fixes),
            "insufficient_cpu",
            "mode",
        )

    def _estimate_bytes(self, spec: str, mode: str) -> int:
        """Estimate a model's memory before loading it, from earlier measurements in this manager.

        The same spec loaded before: its measured size per worker. Otherwise: the runtime
        measured in earlier workers before their weights arrived, plus the KV pool, plus the
        weights of the same base model at another precision scaled by bytes per weight.
        """
        num_workers = len(roles_for_mode(mode))
        for entry in reversed(self.cold_starts):
            if entry["spec"] == spec and entry.get("total_bytes"):
                return entry["total_bytes"] // entry["num_workers"] * num_workers
        workers = [worker for record in self.records.values() for worker in record.workers]
        runtime = (
            sum(worker["rss_before_load_bytes"] for worker in workers) // len(workers)
            if workers
            else DEFAULT_RUNTIME_BYTES
        )
        kv_pool = self.settings.cache.kv_cache_memory_mib * 2**20
        base, precision = _split_precision(spec)
        weights = 0
        for record in self.records.values():
            other_base, other_precision = _split_precision(record.spec)
            if other_base == base and record.workers:
                weights = int(
                    record.workers[0]["weight_bytes"] * BYTES_PER_WEIGHT[precision] / BYTES_PER_WEIGHT[other_precision]
                )
        # NOTE: a model never loaded here, at any precision, is estimated without its weights;
        # the budget is checked again with measured numbers once its workers are up
        # (see _enforce_budget_after_load).
        return num_workers * (runtime + kv_pool + weights)

    async def _make_room(self, needed_bytes: int, exclude: str | None = None) -> None:
        """Unload idle models, least recently used first, until `needed_bytes` fit the budget. Raises ManagerError 507.

        `exclude` is a model that must stay (the new model of a swap, or one that just loaded).
        """
        budget = self._budget_view()
        if budget["budget_bytes"] is None:
            return
        free = budget["free_bytes"]
        idle = sorted(
            (
                record
                for record in self.records.values()
                if record.state == "ready" and record.in_flight == 0 and record.model_id != exclude
            ),
            key=lambda record: record.last_used,
        )
        # Evict only when evicting can make enough room: a load that cannot fit anyway is
        # rejected without unloading anything.
        victims = []
        for record in idle:
            if free >= needed_bytes:
                break
            victims.append(record)
            free += record.total_bytes
        if free < needed_bytes:
            raise ManagerError(
                507,
                f"not enough memory under the budget: the model needs about {needed_bytes / 2**20:.0f} MiB and "
                f"{max(0, budget['free_bytes']) / 2**20:.0f} MiB of the {budget['budget_bytes'] / 2**20:.0f} MiB "
                f"budget is free ({(free - budget['free_bytes']) / 2**20:.0f} MiB more if every idle model were "
                "unloaded). Unload a model, or raise memory_budget_mib",
                "insufficient_memory",
                "model",
            )
        for victim in victims:
            logger.info(
                "memory budget: unloading idle model %s (last used %.0f s ago)",
                victim.model_id,
                time.time() - victim.last_used,
            )
            await self._unload(victim, reason="evicted")

    async def _run_load(self, record: ModelRecord, swap_of: str | None) -> None:
        started = time.perf_counter()

        def note(stage: str, message: str) -> None:
            record.progress.append(
                {"stage": stage, "message": message, "elapsed_s": round(time.perf_counter() - started, 3)}
            )

        try:
            note("deploy", f"deploying {' and '.join(roles_for_mode(record.mode))} worker(s)")
            applications = self._build_worker_apps(record)
            await self._deploy(record, applications, note)
            record.load_seconds = time.perf_counter() - started
            note("warm-up", "workers are up; generating the first token")
            router = self._router_for(record)
            info = await router.workers[0].info.remote()
            record.max_model_len = info["max_model_len"]
            await self._warm_up(router)
            record.cold_start_seconds = time.perf_counter() - started
            note("measure", "measuring memory")
            record.workers = list(await asyncio.gather(*(w.memory_ledger.remote() for w in router.workers)))
            record.memory_after_load = self._memory_snapshot()
            if record.state == "loading":
                record.state = "ready"
                record.ready_at = time.time()
                note("ready", f"first token {record.cold_start_seconds:.2f} s after the load request")
            self.cold_starts.append(
                {
                    "model_id": record.model_id,
                    "spec": record.spec,
                    "mode": record.mode,
                    "generation": record.generation,
                    "load_seconds": round(record.load_seconds, 3),
                    "cold_start_seconds": round(record.cold_start_seconds, 3),
                    "total_bytes": record.total_bytes,
                    "num_workers": len(record.workers),
                    "swap_of": swap_of,
                    "time": time.time(),
                }
            )
            logger.info("model %s ready: cold start %.2f s", record.model_id, record.cold_start_seconds)
            await self._enforce_budget_after_load(record)
        except asyncio.CancelledError:
            # An unload cancelled this load: delete whatever was deployed, then report it unloaded.
            note("cancelled", "load cancelled by an unload; deleting its workers")
            await self._delete_after_deploy_call(record)
            record.state = "unloaded"
            record.unload_seconds = time.perf_counter() - started
            record.memory_after_unload = self._memory_snapshot()
            logger.info("model %s: load cancelled by an unload", record.model_id)
        except Exception as exc:
            logger.exception("loading model %s failed", record.model_id)
            record.state = "failed"
            record.error = _first_line(exc)
            note("failed", record.error)
            self._drop_from_aliases(record.model_id)
            await self._delete_after_deploy_call(record)
        finally:
            self._deploy_calls.pop(record.model_id, None)

    async def _delete_after_deploy_call(self, record: ModelRecord) -> None:
        """Delete a load's applications once its Serve deploy call returned, so none is created after the delete."""
        call = self._deploy_calls.get(record.model_id)
        if call is not None and not call.done():
            await asyncio.wait([call], timeout=CANCEL_CLEANUP_TIMEOUT_S)
        await self._delete_apps(record)

    async def _enforce_budget_after_load(self, record: ModelRecord) -> None:
        """Check the budget with the measured size; evict idle models or unload this one when it does not fit."""
        budget = self._budget_view()
        if budget["budget_bytes"] is None or budget["free_bytes"] >= 0:
            return
        try:
            # This model is already counted in used_bytes, so only the overshoot must be freed.
            await self._make_room(-budget["free_bytes"], exclude=record.model_id)
        except ManagerError as exc:
            await self._unload(record, reason="over budget")
            record.state = "failed"
            record.error = str(exc)

    def _build_worker_apps(self, record: ModelRecord) -> dict:
        settings = dataclasses.replace(self.settings, model=record.spec, mode=record.mode)
        engine_config = settings.engine_config()
        options: dict = {"num_cpus": record.worker_num_cpus}
        if "MOLTEN_HOME" in os.environ:
            options["runtime_env"] = {"env_vars": {"MOLTEN_HOME": os.environ["MOLTEN_HOME"]}}
        applications = {}
        for role in roles_for_mode(record.mode):
            record.app_names[role] = settings.model_app_name(record.model_id, role)
            record.deployment_names[role] = settings.deployment_name(role)
            applications[role] = (
                WORKER_CLASSES[role]
                .options(
                    name=record.deployment_names[role],
                    ray_actor_options=options,
                    graceful_shutdown_wait_loop_s=WORKER_SHUTDOWN_WAIT_LOOP_S,
                    graceful_shutdown_timeout_s=5,
                )
                .bind(engine_config)
            )
        return applications

    async def _deploy(self, record: ModelRecord, applications: dict, note) -> None:
        """Deploy the worker applications (no HTTP route) and wait, polling Serve's status, until they run.

        Raises RuntimeError when a worker fails to start or Serve reports it unscheduled (Ray
        has no free CPUs for it), and TimeoutError past `load_timeout_s`; the caller deletes
        the applications. The deploy call itself returns at once, so this coroutine can be
        cancelled between polls.
        """
        targets = [
            serve.RunTarget(target=app, name=record.app_names[role], route_prefix=None)
            for role, app in applications.items()
        ]
        started = time.monotonic()
        call = asyncio.ensure_future(
            asyncio.to_thread(
                serve.run_many, targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False
            )
        )
        self._deploy_calls[record.model_id] = call
        # Shielded: a cancelled load must still let the call finish before deleting what it created.
        await asyncio.shield(call)
        timeout = self.settings.manager.load_timeout_s
        last_message, last_noted = None, 0.0
        while True:
            roles = await asyncio.to_thread(self._worker_app_states, record)
            if all(state == "RUNNING" for state, _ in roles.values()):
                return
            waited = time.monotonic() - started
            for role, (state, message) in roles.items():
                if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                    raise RuntimeError(f"the {role} worker failed to start: {_summary(message)}")
                if UNSCHEDULED_MARKER in message:
                    raise RuntimeError(
                        f"Ray could not place the {role} worker after {waited:.0f} s: {_summary(message)} "
                        "Unload a model, load this one with --mode colocated, or restart with a lower `molten serve --worker-cpus`"
                    )
            text = ", ".join(f"{role} {state.lower().replace('_', ' ')}" for role, (state, _) in roles.items())
            if waited > timeout:
                raise TimeoutError(f"the workers were not running after {timeout:g} s (load_timeout_s): {text}")
            if text != last_message or waited - last_noted >= DEPLOY_PROGRESS_REPEAT_S:
                note("deploy", f"starting worker processes and loading weights: {text} ({waited:.0f} s)")
                last_message, last_noted = text, waited
            await asyncio.sleep(DEPLOY_PROGRESS_INTERVAL_S)

    def _worker_app_states(self, record: ModelRecord) -> dict[str, tuple[str, str]]:
        """Serve's status of each worker application: (APPLICATION_STATUS, messages of it and its deployments)."""
        applications = serve.status().applications
        states = {}
        for role, app_name in record.app_names.items():
            app = applications.get(app_name)
            if app is None:
                states[role] = ("PENDING", "")
                continue
            messages = [app.message] + [deployment.message for deployment in app.deployments.values()]
            states[role] = (app.status.value, " ".join(message for message in messages if message))
        return states

    def _router_for(self, record: ModelRecord) -> RequestRouter:
        handles = {
            role: serve.get_deployment_handle(record.deployment_names[role], app_name=record.app_names[role])
            for role in roles_for_mode(record.mode)
        }
        return RequestRouter(**handles)

    async def _warm_up(self, router: RequestRouter) -> None:
        """Generate a few tokens so the load's cold-start time ends at a real first token."""
        params = SamplingParams(max_tokens=self.settings.manager.warmup_max_tokens, temperature=0.0, ignore_eos=True)
        request = PreparedRequest(
            request_id=f"warmup-{uuid.uuid4().hex[:8]}", prompt_token_ids=[0, 1, 2], sampling_params=params
        )
        async for _ in router.stream(request):
            pass

    # -- unload and swap ---------------------------------------------------------------

    async def unload(self, model: str, wait: bool = True) -> dict:
        """Stop routing to `model`, wait for its streams (up to drain_timeout_s), then delete its workers.

        A model that is still loading has its load cancelled and its applications deleted.
        Without `wait`, returns at once with the record (state `draining` until it is gone).
        """
        record = self.records.get(model)
        if record is None or record.state in ("unloaded",):
            served = await self.served_model_ids()
            return ManagerError(
                404,
                f"model {model!r} is not loaded; served models: {', '.join(served) or 'none'}",
                "model_not_found",
                "model",
            ).to_dict()
        if record.state == "failed":
            record.state = "unloaded"
            return record.to_dict()
        if record.state == "loading":
            task = self._load_tasks.get(record.model_id)
            if task is not None and not task.done():
                # Nothing is routed to a loading model, so there is nothing to drain: stop the
                # load; its task deletes what it deployed and marks the model unloaded.
                record.state = "draining"
                task.cancel()
                if wait:
                    await asyncio.wait([task])
                return record.to_dict()
            await self._wait_until(lambda: record.state != "loading", None)
        task = self._spawn(self._unload(record, reason="requested"))
        if wait:
            await task
        return record.to_dict()

    async def _unload(self, record: ModelRecord, reason: str) -> None:
        # A model draining for a swap either ends unloaded, or returns to ready when the
        # swap's new model failed; only in the second case is there anything left to do.
        await self._wait_until(lambda: record.state != "draining", None)
        if record.state == "unloaded":
            return
        record.state = "draining"
        self._drop_from_aliases(record.model_id)
        await self._drain_and_delete(record, reason)

    async def _drain_and_delete(self, record: ModelRecord, reason: str) -> None:
        """Wait for a draining model's leases to end (up to drain_timeout_s), then delete its workers."""
        started = time.perf_counter()
        drained = await self._wait_until(lambda: record.in_flight == 0, self.settings.manager.drain_timeout_s)
        record.drain_seconds = time.perf_counter() - started
        if not drained:
            logger.warning(
                "model %s: %d request(s) still running after the %.0f s drain timeout; deleting it anyway",
                record.model_id,
                record.in_flight,
                self.settings.manager.drain_timeout_s,
            )
        await self._delete_apps(record)
        record.state = "unloaded"
        record.unload_seconds = time.perf_counter() - started
        record.memory_after_unload = self._memory_snapshot()
        logger.info("model %s unloaded (%s) in %.2f s", record.model_id, reason, record.unload_seconds)

    async def _delete_apps(self, record: ModelRecord) -> None:
        for app_name in record.app_names.values():
            try:
                await asyncio.to_thread(serve.delete, app_name)
            except Exception:
                logger.exception("deleting Serve application %s failed", app_name)

    async def swap(self, old: str, new: str, mode: str | None = None, precision: str | None = None) -> dict:
        """Replace `old` with `new`: aliases that pointed at `old` move to `new`, and `old` drains.

        `new` loads in `old`'s mode, and at `old`'s precision when `old` named one other than
        fp32 and neither `new` nor `precision` names one; `mode` and `precision` override.
        When the memory budget and Ray's free CPUs allow both models at once, `old` drains
        while `new` loads, is deleted once `new` is ready, and returns to ready, with its
        aliases, if `new` fails. Otherwise `old` is unloaded first, and aliases moved to a
        `new` that fails are dropped. A `new` that would not fit even with `old` gone is
        rejected before anything changes. Returns both records and the swap's timings.
        """
        started = time.perf_counter()
        old_record = self.records.get(old)
        if old_record is None or old_record.state != "ready":
            return await self._not_found(old, old_record)
        mode = mode or old_record.mode
        if not precision and _explicit_precision(new) is None:
            old_precision = _explicit_precision(old_record.spec)
            precision = old_precision if old_precision != "fp32" else None
        try:
            spec = model_spec_with_precision(new, precision)
        except ValueError as exc:
            return ManagerError(400, str(exc), "invalid_precision", "precision").to_dict()
        new_id = served_model_id(spec)
        if new_id == old:
            return ManagerError(
                400, "old and new name the same model; unload and load it to restart it", "invalid_swap", "new"
            ).to_dict()
        if mode not in MODES:
            return ManagerError(
                400, f"mode must be one of {', '.join(MODES)}, got {mode!r}", "invalid_mode", "mode"
            ).to_dict()

        num_cpus = self.settings.worker_num_cpus
        needed_cpus, free_cpus, total_cpus = await self._cpu_room(mode, num_cpus)
        old_cpus = len(old_record.app_names) * old_record.worker_num_cpus
        if needed_cpus > free_cpus + old_cpus + CPU_TOLERANCE:
            return self._cpu_error(new_id, mode, num_cpus, needed_cpus, free_cpus + old_cpus, total_cpus).to_dict()
        budget = self._budget_view()
        estimated = self._estimate_bytes(spec, mode)
        sequential = (budget["budget_bytes"] is not None and budget["free_bytes"] < estimated) or (
            needed_cpus > free_cpus + CPU_TOLERANCE
        )
        saved_aliases = {alias: dict(targets) for alias, targets in self.aliases.items()}
        moved = [alias for alias, targets in self.aliases.items() if old in targets]
        reason = f"swap to {new_id}"
        if sequential:
            # NOTE: the budget or the free CPUs cannot hold both models, so the old one is gone
            # before the new one loads; if the new one fails, nothing serves the moved aliases,
            # and they are dropped (see _run_load).
            await self._unload(old_record, reason=reason)
            self.aliases = saved_aliases
            try:
                # The CPU check above already counted the old model's CPUs as free; Ray's own
                # count may not show them yet.
                new_record = await self._start_load(new, mode, precision, swap_of=old, check_cpus=False)
            except ManagerError as exc:
                self._drop_from_aliases(old)
                return exc.to_dict()
            self._repoint_aliases(old, new_id)
            await self._wait_until(lambda: new_record.state in ("ready", "failed", "unloaded"), None)
            if new_record.state != "ready":
                self._drop_from_aliases(new_id)
        else:
            # The old model stops taking new requests at once and keeps streaming the running
            # ones while the new model loads. It is deleted only once the new one is ready, and
            # goes back to ready, with its aliases, when the new one fails.
            old_record.state = "draining"
            self._repoint_aliases(old, new_id)
            try:
                new_record = await self._start_load(new, mode, precision, swap_of=old)
            except ManagerError as exc:
                old_record.state = "ready"
                self.aliases = saved_aliases
                return exc.to_dict()
            await self._wait_until(lambda: new_record.state in ("ready", "failed", "unloaded"), None)
            if new_record.state != "ready":
                logger.warning(
                    "swap %s -> %s: the new model is %s (%s); keeping %s",
                    old,
                    new_id,
                    new_record.state,
                    new_record.error,
                    old,
                )
                old_record.state = "ready"
                self.aliases = saved_aliases
            else:
                self._drop_from_aliases(old)
                await self._drain_and_delete(old_record, reason)
        return {
            "old": old_record.to_dict(),
            "new": new_record.to_dict(),
            "sequential": sequential,
            "aliases_moved": moved if new_record.state == "ready" else [],
            "swap_seconds": round(time.perf_counter() - started, 3),
        }

    async def set_memory_budget(self, memory_budget_mib: int | None) -> dict:
        """Change the memory budget at run time (None removes it); later loads are checked against it."""
        if memory_budget_mib is not None and (
            isinstance(memory_budget_mib, bool) or not isinstance(memory_budget_mib, int) or memory_budget_mib < 1
        ):
            return ManagerError(
                400,
                f"memory_budget_mib must be an integer >= 1 or null, got {memory_budget_mib!r}",
                "invalid_budget",
                "memory_budget_mib",
            ).to_dict()
        self.settings = dataclasses.replace(
            self.settings, manager=dataclasses.replace(self.settings.manager, memory_budget_mib=memory_budget_mib)
        )
        logger.info("memory budget set to %s MiB", memory_budget_mib)
        return self._budget_view()

    # -- aliases -----------------------------------------------------------------------

    async def set_alias(self, alias: str, targets: dict[str, float]) -> dict:
        """Point `alias` at one model, or split its requests between several by weight (an A/B test)."""
        if not isinstance(alias, str) or not alias.strip():
            return ManagerError(400, "alias must be a non-empty string", "invalid_alias", "alias").to_dict()
        if alias in self.records and self.records[alias].state in ("loading", "ready", "draining"):
            return ManagerError(
                409, f"{alias!r} is a loaded model id; choose another alias name", "alias_conflict", "alias"
            ).to_dict()
        if not isinstance(targets, dict) or not targets:
            return ManagerError(
                400, "targets must map at least one model id to a weight", "invalid_targets", "targets"
            ).to_dict()
        for model_id, weight in targets.items():
            record = self.records.get(model_id)
            if record is None or record.state not in ("loading", "ready"):
                served = await self.served_model_ids()
                return ManagerError(
                    404,
                    f"alias target {model_id!r} is not loaded; served models: {', '.join(served) or 'none'}",
                    "model_not_found",
                    "targets",
                ).to_dict()
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                return ManagerError(
                    400, f"weight of {model_id!r} must be a number > 0, got {weight!r}", "invalid_weight", "targets"
                ).to_dict()
        self.aliases[alias] = {model_id: float(weight) for model_id, weight in targets.items()}
        logger.info("alias %s now points at %s", alias, self.aliases[alias])
        return {"alias": alias, "targets": self.aliases[alias]}

    async def delete_alias(self, alias: str) -> dict:
        if self.aliases.pop(alias, None) is None:
            return ManagerError(
                404,
                f"alias {alias!r} does not exist; aliases: {', '.join(self.aliases) or 'none'}",
                "alias_not_found",
                "alias",
            ).to_dict()
        return {"alias": alias, "deleted": True}

    def _repoint_aliases(self, old: str, new: str) -> None:
        for targets in self.aliases.values():
            if old in targets:
                targets[new] = targets.get(new, 0.0) + targets.pop(old)

    def _drop_from_aliases(self, model_id: str) -> None:
        for alias in list(self.aliases):
            self.aliases[alias].pop(model_id, None)
            if not self.aliases[alias]:
                del self.aliases[alias]

    # -- helpers -----------------------------------------------------------------------

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait_until(self, condition, timeout_s: float | None) -> bool:
        """Poll `condition` until it holds or `timeout_s` passes (None: until it holds). Returns whether it held."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not condition():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_INTERVAL_S)
        return True

    async def unload_all(self) -> None:
        """Delete every model's workers at once, without draining (used when Molten stops)."""
        for record in self.records.values():
            if record.state != "unloaded":
                await self._delete_apps(record)
                record.state = "unloaded"

    def __del__(self):
        # Serve calls this when the Molten application is deleted. The per-model applications
        # are separate, so ask Serve to delete them too, without waiting (the controller is busy
        # deleting this replica).
        for record in getattr(self, "records", {}).values():
            for app_name in record.app_names.values():
                try:
                    serve.delete(app_name, _blocking=False)
                except Exception as exc:  # Serve may already be shutting down
                    logger.warning("could not delete Serve application %s: %s", app_name, exc)


def _summary(message: str) -> str:
    """Shorten a Serve status message: the exception line of a traceback, else the message's first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    exception_lines = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
    if exception_lines:
        return exception_lines[-1]
    return lines[0] if lines else "no message from Serve"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0] if text else type(exc).__name__

"""Options, measurement plans and the shared state of one `molten bench` run.

A workload module plans `Measurement`s, and the runner executes each key once and
stores its result, or a `Skipped`, under that key. Plans may share a key: the
disaggregated comparison reuses the co-located HTTP run of the concurrent workload.
Models and the Serve session are created on first use and kept for the run.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from molten.bench.choices import DOOR_NAMES, DTYPE_NAMES, PEER_NAMES, QUANTIZED_NAMES, WORKLOAD_NAMES
from molten.bench.metrics import RequestRecord, RequestSpec, RunMetrics, summarize_run
from molten.bench.roofline import Ceilings
from molten.bench.workloads import WorkloadSizes
from molten.config import CacheConfig, EngineConfig, SchedulerConfig
from molten.engine.llm_engine import MAX_DEFAULT_MODEL_LEN

logger = logging.getLogger(__name__)

SERVE_DOORS = ("http", "handle")
"""Served doors in order of preference for workloads that need only one of them."""

CEILINGS_KEY = "machine/ceilings"
"""Result key of the machine's copy-bandwidth and matmul-rate measurement."""

DOOR_LABELS = {"engine": "Molten engine", "handle": "Molten Serve handle", "http": "Molten HTTP (SSE)"}


@dataclass
class BenchOptions:
    """Everything `molten bench` was asked to do (see `molten bench --help`)."""

    workloads: list[str] = field(default_factory=lambda: list(WORKLOAD_NAMES))
    model: str = "smollm2-135m-instruct"
    quick: bool = False
    output: Path = Path("docs/benchmarks.md")
    doors: list[str] = field(default_factory=lambda: list(DOOR_NAMES))
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    dtype_note: str | None = None
    """Reason a dtype was left out of the default selection, printed on the page."""
    quantized: list[str] = field(default_factory=list)
    """Integer weight precisions (`int8`, `int4`) the single workload also runs the engine door in."""
    peers: list[str] = field(default_factory=lambda: list(PEER_NAMES))
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    seed: int = 0
    max_model_len: int | None = None
    kv_cache_memory_mib: int = 2048
    run_time_limit_s: float = 3600.0
    note: str | None = None
    profile: bool = False
    save_results: Path | None = None
    """File to pickle the raw results to, so `--render-from` can render the page again."""
    command: str = "molten bench"

    def validate(self) -> None:
        for name, chosen, allowed in (
            ("workloads", self.workloads, WORKLOAD_NAMES),
            ("doors", self.doors, DOOR_NAMES),
            ("peers", self.peers, PEER_NAMES),
            ("dtypes", self.dtypes, DTYPE_NAMES),
            ("quantized", self.quantized, QUANTIZED_NAMES),
        ):
            unknown = [item for item in chosen if item not in allowed]
            if unknown:
                raise ValueError(f"unknown {name}: {', '.join(unknown)}; choose from {', '.join(allowed)}")
        if not self.dtypes:
            raise ValueError("dtypes must name at least one dtype")
        if self.num_threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.num_threads}")
        if self.kv_cache_memory_mib < 1:
            raise ValueError(f"kv-cache-mib must be at least 1, got {self.kv_cache_memory_mib}")

    @property
    def sizes(self) -> WorkloadSizes:
        return WorkloadSizes.quick() if self.quick else WorkloadSizes.full()

    @property
    def plot_dir(self) -> Path:
        """Plots go next to the page, in a folder named after it: docs/benchmarks.md -> docs/benchmarks/."""
        return self.output.with_suffix("")


class Stage(enum.IntEnum):
    """Measurements run in this order, so the in-process ones never share the CPU with Ray."""

    MACHINE = 0
    IN_PROCESS = 1
    SERVE_COLOCATED = 2
    SERVE_DISAGGREGATED = 3


@dataclass
class Measurement:
    key: str
    stage: Stage
    description: str
    """One line for the progress output."""
    run: Callable[[BenchContext], Any]


@dataclass(frozen=True)
class Skipped:
    """A measurement that did not run or failed, and why."""

    reason: str
    failed: bool = False


@dataclass(frozen=True)
class LogEntry:
    """How long one measurement took, and how busy the machine was when it ended."""

    description: str
    seconds: float
    load_average: float
    """1-minute load average (runnable processes, all users) when the measurement ended."""
    status: str
    """`done`, `skipped` or `failed`."""


@dataclass(frozen=True)
class ResultsByKey:
    """Results of a measurement that measured several systems at once, each stored under its own key."""

    results: dict[str, Any]


@dataclass(frozen=True)
class ModelFacts:
    model_id: str
    num_parameters: int
    weight_bytes: int
    max_model_len: int
    vocab_size: int


class BenchContext:
    """Shared state of one run: options, loaded models, the Serve session and the results so far."""

    def __init__(self, options: BenchOptions):
        self.options = options
        self.sizes = options.sizes
        self.results: dict[str, Any] = {}
        self.log: list[LogEntry] = []
        self._engine_models: dict[str, Any] = {}
        self._peer_models: dict[str, Any] = {}
        self._serve = None

    # -- models ---------------------------------------------------------------------------

    def engine_model(self, dtype: str):
        """Load the model Molten's engine runs, once per dtype (the engine swaps in its own attention).

        `dtype` may also be a quantized precision (`int8`, `int4`): the model is then loaded
        as `<model>:<precision>`, with float32 activations.
        """
        if dtype not in self._engine_models:
            from molten.models import load_model

            if dtype in QUANTIZED_NAMES:
                loaded = load_model(f"{self.options.model}:{dtype}", dtype=torch.float32)
            else:
                loaded = load_model(self.options.model, dtype=getattr(torch, dtype))
            self._engine_models[dtype] = loaded
        return self._engine_models[dtype]

    def peer_model(self, dtype: str):
        """Load a separate copy for transformers' own generate(), with transformers' default attention."""
        if dtype not in self._peer_models:
            from molten.models import load_model

            self._peer_models[dtype] = load_model(self.options.model, dtype=getattr(torch, dtype))
        return self._peer_models[dtype]

    def facts(self, dtype: str) -> ModelFacts:
        loaded = self.engine_model(dtype)
        max_model_len = self.options.max_model_len or min(loaded.max_model_len, MAX_DEFAULT_MODEL_LEN)
        return ModelFacts(
            model_id=loaded.model_id,
            num_parameters=loaded.num_parameters,
            weight_bytes=loaded.weight_bytes,
            max_model_len=max_model_len,
            vocab_size=len(loaded.tokenizer),
        )

    def ceilings(self) -> Ceilings | None:
        """Return the machine ceilings measured in this run, or None when they were not measured."""
        result = self.results.get(CEILINGS_KEY)
        return result if isinstance(result, Ceilings) else None

    @property
    def first_dtype(self) -> str:
        return self.options.dtypes[0]

    # -- engine door ------------------------------------------------------------------------

    def engine_config(self, dtype: str, **scheduler_and_cache: Any) -> EngineConfig:
        """Build the engine settings every door uses; keyword arguments override scheduler or cache fields."""
        cache = CacheConfig(kv_cache_memory_mib=self.options.kv_cache_memory_mib)
        scheduler = SchedulerConfig()
        cache_fields = {key: value for key, value in scheduler_and_cache.items() if hasattr(cache, key)}
        scheduler_fields = {key: value for key, value in scheduler_and_cache.items() if hasattr(scheduler, key)}
        unknown = set(scheduler_and_cache) - set(cache_fields) - set(scheduler_fields)
        if unknown:
            raise ValueError(f"not a CacheConfig or SchedulerConfig field: {', '.join(sorted(unknown))}")
        return EngineConfig(
            model=self.options.model,
            dtype="float32" if dtype in QUANTIZED_NAMES else dtype,
            max_model_len=self.options.max_model_len,
            num_threads=self.options.num_threads,
            cache=replace(cache, **cache_fields),
            scheduler=replace(scheduler, **scheduler_fields),
        )

    def run_engine(
        self, requests: list[RequestSpec], dtype: str, **scheduler_and_cache: Any
    ) -> tuple[list[RequestRecord], Any]:
        """Run `requests` through a fresh engine (empty prefix cache) and return the records and the engine."""
        from molten.bench.door_engine import EngineDoor

        door = EngineDoor.build(self.engine_config(dtype, **scheduler_and_cache), self.engine_model(dtype))
        return door.run(requests, self.options.run_time_limit_s), door.engine

    def measure_engine(self, requests: list[RequestSpec], dtype: str, **scheduler_and_cache: Any) -> RunMetrics:
        records, _ = self.run_engine(requests, dtype, **scheduler_and_cache)
        return summarize_run(DOOR_LABELS["engine"], dtype, records)

    # -- served doors -----------------------------------------------------------------------

    def serve_door(self, door: str, mode: str):
        """Open a warmed-up handle or HTTP door to the application in `mode`, deploying it if needed."""
        from molten.bench.door_serve import HandleDoor, HttpDoor, ServeSession

        if self._serve is None:
            self._serve = ServeSession(
                model=self.options.model,
                dtype=self.first_dtype,
                max_model_len=self.options.max_model_len,
                kv_cache_memory_mib=self.options.kv_cache_memory_mib,
                num_threads=self.options.num_threads,
            )
        settings = self._serve.deploy(mode)
        model_id = self.facts(self.first_dtype).model_id
        if door == "handle":
            served = HandleDoor(model_id, settings)
        elif door == "http":
            served = HttpDoor(model_id, self._serve.base_url)
        else:
            raise ValueError(f"{door!r} is not a served door; choose handle or http")
        served.warm_up()
        return served

    def measure_served(self, requests: list[RequestSpec], door: str, mode: str = "colocated") -> RunMetrics:
        served = self.serve_door(door, mode)
        records = served.run(requests, self.options.run_time_limit_s)
        label = DOOR_LABELS[door] if mode == "colocated" else f"{DOOR_LABELS[door]}, disaggregated"
        return summarize_run(label, self.first_dtype, records)

    def preferred_serve_door(self) -> str | None:
        return next((door for door in SERVE_DOORS if door in self.options.doors), None)

    def close(self) -> None:
        if self._serve is not None:
            try:
                self._serve.close()
            except Exception:
                logger.exception("shutting down Ray Serve failed")
            self._serve = None

"""Engine workers as Ray Serve deployments: prefill, decode, and co-located.

Each replica loads the model, builds an `LLMEngine` wrapped in an `AsyncEngine`, and
only adapts calls: the engine protocol in `molten.engine.async_engine` does the work.

Disaggregated handoff: `PrefillWorker.prefill` puts the `KVHandoff` (sequence state and
KV blocks) into the Ray object store. It returns the reference inside a list, so Ray
does not resolve it on the way through the ingress. `DecodeWorker.decode` fetches the
object directly from the store and imports the blocks.
"""

from __future__ import annotations

import logging
import os
import time

import psutil
import ray
import torch
from ray import serve

from molten.config import EngineConfig
from molten.engine.async_engine import AsyncEngine
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams

from molten.deployments.metrics import EngineMetrics, current_application
from molten.deployments.telemetry import register_with_telemetry

logger = logging.getLogger(__name__)


class EngineWorker:
    """Shared set-up of every engine replica."""

    role = "engine"

    def __init__(self, engine_config: EngineConfig):
        from molten.models import load_model

        # The process's memory before the weights arrive: the runtime (Python, torch, Ray) alone.
        self.rss_before_load_bytes = psutil.Process().memory_info().rss
        if engine_config.num_threads:
            torch.set_num_threads(engine_config.num_threads)
        started = time.perf_counter()
        loaded = load_model(engine_config.model, dtype=getattr(torch, engine_config.dtype))
        self.engine = LLMEngine(engine_config, loaded)
        self.async_engine = AsyncEngine(self.engine, name=self.role)
        self.load_seconds = time.perf_counter() - started
        self.metrics = EngineMetrics(self.engine.facts.model_id, self.role, current_application())
        self.async_engine.step_listeners.append(self.metrics.observe_step)
        memory = measure_worker_memory(self.engine, self.rss_before_load_bytes, self.role)
        self.metrics.set_model_memory(memory["weight_bytes"], memory["kv_pool_bytes"])
        register_with_telemetry(f"molten:{self.role}:{self.engine.facts.model_id}", memory["torch_allocated_bytes"])
        logger.info(
            "%s worker ready: model=%s threads=%d pid=%d load=%.1fs",
            self.role, self.engine.facts.model_id, torch.get_num_threads(), os.getpid(), self.load_seconds,
        )

    async def info(self) -> dict:
        facts = self.engine.facts
        return {
            "role": self.role,
            "model_id": facts.model_id,
            "max_model_len": facts.max_model_len,
            "num_kv_blocks": facts.num_kv_blocks,
            "kv_block_size": facts.kv_block_size,
            "kv_bytes_per_token": facts.kv_bytes_per_token,
            "dtype": facts.dtype,
            "torch_threads": torch.get_num_threads(),
            "pid": os.getpid(),
            "load_seconds": round(self.load_seconds, 3),
        }

    async def memory_ledger(self) -> dict:
        """Measure this worker's memory: weights, KV pool, and the rest (activations, runtime)."""
        return measure_worker_memory(self.engine, self.rss_before_load_bytes, self.role)

    async def steps(self, since_step: int | None = None) -> dict:
        """This engine's step records (see molten.engine.step_stats) with a step id above `since_step`."""
        records = self.engine.step_stats.records_after(since_step)
        return {"role": self.role, "steps": [record.to_dict() for record in records]}

    async def kv_state(self) -> dict:
        state = await self.async_engine.call(lambda engine: engine.kv_state())
        state["role"] = self.role
        return state

    async def abort(self, request_id: str) -> bool:
        return await self.async_engine.abort(request_id)

    async def check_health(self) -> None:
        if not self.async_engine.is_running:
            raise RuntimeError(f"{self.role} engine loop is not running")

    def __del__(self):
        engine = getattr(self, "async_engine", None)
        if engine is not None:
            engine.shutdown()


def measure_worker_memory(engine: LLMEngine, rss_before_load_bytes: int, role: str) -> dict:
    """Split one engine process's memory into weights, KV pool and the rest.

    On CPU the total is the process RSS. On a GPU it is NVML's count of device memory used by
    this process, and RSS is reported beside it. `torch_allocated_bytes` is torch's CUDA
    allocator count on a GPU; on CPU torch keeps no allocator count, so it is the bytes of
    the tensors the engine owns (parameters, buffers, KV pool).
    """
    tensors = list(engine.model.parameters()) + list(engine.model.buffers())
    weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    kv_pool_bytes = engine.kv_cache.num_bytes
    device = tensors[0].device if tensors else torch.device("cpu")
    rss_bytes = psutil.Process().memory_info().rss
    ledger = {
        "role": role,
        "pid": os.getpid(),
        "device": str(device),
        "weight_bytes": weight_bytes,
        "kv_pool_bytes": kv_pool_bytes,
        "rss_bytes": rss_bytes,
        "rss_before_load_bytes": rss_before_load_bytes,
        "gpu_process_bytes": None,
    }
    if device.type == "cuda":
        ledger["torch_allocated_bytes"] = torch.cuda.memory_allocated(device)
        ledger["torch_reserved_bytes"] = torch.cuda.memory_reserved(device)
        ledger["gpu_process_bytes"] = nvml_process_memory_bytes(os.getpid(), device.index or 0)
        total = ledger["gpu_process_bytes"] or ledger["torch_reserved_bytes"]
    else:
        ledger["torch_allocated_bytes"] = weight_bytes + kv_pool_bytes
        total = rss_bytes
    ledger["total_bytes"] = total
    ledger["other_bytes"] = max(0, total - weight_bytes - kv_pool_bytes)
    return ledger


def nvml_process_memory_bytes(pid: int, device_index: int) -> int | None:
    """Return the GPU memory NVML counts for `pid` on one device, or None when NVML cannot tell."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid == pid:
                    return process.usedGpuMemory
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # pynvml raises its own NVMLError subclasses, or ImportError
        logger.warning("could not read GPU memory of pid %d from NVML: %s", pid, exc)
    return None


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10)
class PrefillWorker(EngineWorker):
    role = "prefill"

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int, arrival_time: float
    ) -> dict:
        result = await self.async_engine.prefill(
            request_id, prompt_token_ids, params, priority=priority, arrival_time=arrival_time
        )
        handoff_ref = [ray.put(result.handoff)] if result.handoff is not None else None
        # The first token leaves with the handoff reference, so TTFT includes the KV export.
        self.metrics.observe_token(result.event, time.time(), arrival_time, None)
        return {"event": result.event, "handoff": handoff_ref}


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10)
class DecodeWorker(EngineWorker):
    role = "decode"

    async def decode(self, handoff_ref: list):
        handoff = await handoff_ref[0]
        events = self.async_engine.decode_imported(handoff)
        async for event in self.metrics.track(events, handoff.arrival_time, previous_token_time=handoff.created_at):
            yield event


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10)
class ColocatedWorker(EngineWorker):
    role = "colocated"

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int, arrival_time: float
    ):
        events = self.async_engine.generate(
            request_id, prompt_token_ids, params, priority=priority, arrival_time=arrival_time
        )
        async for event in self.metrics.track(events, arrival_time):
            yield event

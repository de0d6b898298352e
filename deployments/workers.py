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

import ray
import torch
from ray import serve

from molten.config import EngineConfig
from molten.engine.async_engine import AsyncEngine
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineWorker:
    """Shared set-up of every engine replica."""

    role = "engine"

    def __init__(self, engine_config: EngineConfig):
        from molten.models import load_model

        if engine_config.num_threads:
            torch.set_num_threads(engine_config.num_threads)
        started = time.perf_counter()
        loaded = load_model(engine_config.model, dtype=getattr(torch, engine_config.dtype))
        self.engine = LLMEngine(engine_config, loaded)
        self.async_engine = AsyncEngine(self.engine, name=self.role)
        self.load_seconds = time.perf_counter() - started
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
        return {"event": result.event, "handoff": handoff_ref}


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10)
class DecodeWorker(EngineWorker):
    role = "decode"

    async def decode(self, handoff_ref: list):
        handoff = await handoff_ref[0]
        async for event in self.async_engine.decode_imported(handoff):
            yield event


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10)
class ColocatedWorker(EngineWorker):
    role = "colocated"

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int, arrival_time: float
    ):
        async for event in self.async_engine.generate(
            request_id, prompt_token_ids, params, priority=priority, arrival_time=arrival_time
        ):
            yield event

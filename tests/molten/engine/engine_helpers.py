"""Helpers shared by the engine tests: engine settings, random prompts, a step loop, references.

Test modules import this file by name (pytest puts this directory on `sys.path`), so its
name must stay unique across the tests/ tree.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from molten.config import CacheConfig, EngineConfig, SchedulerConfig
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams
from molten.engine.scheduler import SchedulerOutput

TINY_VOCAB_SIZE = 49_152
FIRST_ORDINARY_TOKEN_ID = 3
"""Ids below this are SmolLM2's special tokens; random prompts avoid them."""
MAX_STEPS = 5_000
"""Step cap for `run_to_completion`, so a scheduling deadlock fails a test instead of hanging it."""


def make_engine_config(
    *,
    max_model_len: int | None = 512,
    kv_block_size: int = 16,
    num_kv_blocks: int | None = 256,
    enable_prefix_caching: bool = True,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 512,
    enable_chunked_prefill: bool = True,
    max_num_waiting: int = 256,
    policy: str = "fcfs",
) -> EngineConfig:
    return EngineConfig(
        model="tiny",
        max_model_len=max_model_len,
        cache=CacheConfig(
            kv_block_size=kv_block_size,
            num_kv_blocks=num_kv_blocks,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_chunked_prefill=enable_chunked_prefill,
            max_num_waiting=max_num_waiting,
            policy=policy,
        ),
    )


def random_prompts(seed: int, count: int, min_len: int = 1, max_len: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [random_tokens(rng, rng.randint(min_len, max_len)) for _ in range(count)]


def random_tokens(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(FIRST_ORDINARY_TOKEN_ID, TINY_VOCAB_SIZE) for _ in range(length)]


def greedy_params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


class EngineRun:
    """Generated tokens, events and scheduler outputs of one `run_to_completion` call."""

    def __init__(self, request_ids: list[str]):
        self.request_ids = request_ids
        self.tokens: dict[str, list[int]] = {request_id: [] for request_id in request_ids}
        self.events: dict[str, list] = {request_id: [] for request_id in request_ids}
        self.steps: list[SchedulerOutput] = []

    def outputs(self) -> list[list[int]]:
        return [self.tokens[request_id] for request_id in self.request_ids]

    @property
    def num_preempted(self) -> int:
        return sum(len(step.preempted) for step in self.steps)


def run_to_completion(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    *,
    prefix: str = "req",
) -> EngineRun:
    """Add every prompt, step until the engine is idle, and record what happened.

    Raises AssertionError if the engine is still busy after MAX_STEPS steps.
    """
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    request_ids = [f"{prefix}-{index}" for index in range(len(prompts))]
    for request_id, prompt, request_params in zip(request_ids, prompts, params_list):
        engine.add_request(request_id, prompt, request_params)
    run = EngineRun(request_ids)
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished():
            break
        previous_step = engine.last_step
        for event in engine.step():
            run.tokens[event.request_id].append(event.token_id)
            run.events[event.request_id].append(event)
        if engine.last_step is not previous_step:
            run.steps.append(engine.last_step)
    assert not engine.has_unfinished(), f"engine still busy after {MAX_STEPS} steps (scheduling deadlock?)"
    return run


def mismatched_indices(outputs: list[list[int]], expected: list[list[int]]) -> list[int]:
    return [index for index, (got, want) in enumerate(zip(outputs, expected, strict=True)) if got != want]


class ReferenceGenerator:
    """Greedy continuations from transformers `generate()`, cached per (model, prompt, length).

    Uncached prompts go through one left-padded `generate()` call with an attention mask.
    For 40 random prompts of 1-200 tokens on both tiny models, that gave the same tokens
    as one call per prompt in about a fifth of the CPU time.

    `load_model(name)` must return a fresh model object: an engine switches its model's
    attention to the paged kernel, and the reference needs transformers' own attention.
    """

    def __init__(self, load_model: Callable[[str], object]):
        self.load_model = load_model
        self.models: dict[str, torch.nn.Module] = {}
        self.cache: dict[tuple[str, tuple[int, ...], int], list[int]] = {}

    def __call__(self, name: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        missing = list({tuple(p) for p in prompts if (name, tuple(p), max_new_tokens) not in self.cache})
        if missing:
            outputs = self._generate(name, [list(p) for p in missing], max_new_tokens)
            for prompt, output in zip(missing, outputs):
                self.cache[(name, prompt, max_new_tokens)] = output
        return [self.cache[(name, tuple(p), max_new_tokens)] for p in prompts]

    @torch.inference_mode()
    def _generate(self, name: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        if name not in self.models:
            self.models[name] = self.load_model(name).model
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        # The mask is needed even without padding: SmolLM2's pad token equals its EOS
        # token, and generate() would otherwise mask prompt positions that hold that id.
        output = self.models[name].generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        return output[:, width:].tolist()

"""Greedy float32 output of the bundled model equals transformers' under every scheduling mode."""

from __future__ import annotations

import pytest
import torch

from engine_helpers import make_engine_config
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams
from molten.tokenization.chat import render_chat

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
QUESTIONS = [
    "Hi",
    "What is the capital of France? Answer in one sentence.",
    "Summarise the plot of a story about a lighthouse keeper who finds a map. " * 3,
]


def use_transformers_attention(model: torch.nn.Module) -> None:
    """Undo the engine's attention switch, so the shared model serves generate() again."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "sdpa"


@pytest.fixture(scope="module")
def prompts_and_references(bundled_model):
    use_transformers_attention(bundled_model.model)
    prompts = [render_chat(bundled_model.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    references = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = bundled_model.model.generate(
                ids,
                # SmolLM2's pad id equals its EOS id, so the mask must be explicit.
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
            )
        references.append(out[0, len(prompt) :].tolist())
    return prompts, references


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="default"),
        pytest.param({"max_num_batched_tokens": 32}, id="chunked-prefill"),
        pytest.param({"enable_prefix_caching": False}, id="no-prefix-cache"),
        pytest.param({"enable_chunked_prefill": False, "max_num_batched_tokens": 512}, id="no-chunking"),
        pytest.param({"num_kv_blocks": 12, "max_model_len": 192}, id="preemption"),
    ],
)
def test_bundled_batch_matches_transformers(bundled_model, prompts_and_references, settings):
    prompts, references = prompts_and_references
    engine = LLMEngine(make_engine_config(**settings), bundled_model)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    try:
        outputs = engine.generate(prompts, params)
        if "num_kv_blocks" in settings:
            assert engine.scheduler.num_preemptions > 0
        for output, expected in zip(outputs, references):
            assert output == expected
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        use_transformers_attention(bundled_model.model)


def test_bundled_alone_equals_batched(bundled_model, prompts_and_references):
    prompts, references = prompts_and_references
    engine = LLMEngine(make_engine_config(), bundled_model)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    try:
        for prompt, expected in zip(prompts, references):
            assert engine.generate([prompt], params)[0] == expected
    finally:
        use_transformers_attention(bundled_model.model)

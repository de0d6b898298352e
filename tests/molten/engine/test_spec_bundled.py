"""Greedy output of the bundled model is identical with speculative decoding off and on."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import make_engine_config, run_to_completion

from molten.config import SpeculativeConfig
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams
from molten.engine.spec_decode.measure import grounded_prompt
from molten.tokenization.chat import render_chat

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
QUESTIONS = ["Hi", "What is the capital of France? Answer in one sentence."]
SPECULATIVE = {
    "ngram": SpeculativeConfig(method="ngram", num_speculative_tokens=4),
    "self-draft": SpeculativeConfig(method="draft", num_speculative_tokens=3, draft_num_layers=4),
}


def use_transformers_attention(model: torch.nn.Module) -> None:
    """Undo the engine's attention switch, so other tests can run the shared model in transformers."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "sdpa"


@pytest.fixture(scope="module")
def prompts_and_references(bundled_model):
    prompts = [grounded_prompt(bundled_model.tokenizer)]
    prompts += [render_chat(bundled_model.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine = LLMEngine(make_engine_config(), bundled_model)
    try:
        alone = run_to_completion(engine, prompts[:1], params, prefix="alone").outputs()
        batched = run_to_completion(engine, prompts, params, prefix="batch").outputs()
    finally:
        use_transformers_attention(bundled_model.model)
    return prompts, alone, batched


@pytest.mark.parametrize("method", list(SPECULATIVE))
def test_bundled_spec_alone_and_batched(bundled_model, prompts_and_references, method):
    prompts, alone, batched = prompts_and_references
    config = make_engine_config(max_num_batched_tokens=48)  # the grounded prompt is chunked
    config.speculative = SPECULATIVE[method]
    engine = LLMEngine(config, bundled_model)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    try:
        assert run_to_completion(engine, prompts[:1], params, prefix="alone").outputs() == alone
        alone_stats = engine.spec_stats.to_dict()
        assert run_to_completion(engine, prompts, params, prefix="batch").outputs() == batched
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        use_transformers_attention(bundled_model.model)
    assert alone_stats["num_draft_tokens"] > 0
    if method == "ngram":
        # The grounded prompt requests a copy of a paragraph, so most n-gram drafts must pass.
        assert alone_stats["acceptance_rate"] > 0.5

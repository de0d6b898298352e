"""Fixtures for the engine tests: the tiny random models, an engine factory, transformers references.

The tests run on CPU in float32. Torch gets one intra-op thread because the test machines
have two shared cores.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import ReferenceGenerator, make_engine_config

from molten.engine.llm_engine import LLMEngine

torch.set_num_threads(1)

SMOLLM2_TOKENIZER_DIR = Path("/tmp/smolcache")
TINY_EOS_TOKEN_ID = 2


def load_tiny_model(name: str):
    """Load a fresh copy of a tiny random model ("tiny-random-llama" or "tiny-random-qwen2").

    This is the one place that decides where the test models come from. It uses
    `molten.models.load_model` when the catalog provides it, and otherwise builds the
    model from `molten.models.tiny` with SmolLM2's tokenizer from a local directory.
    """
    try:
        from molten.models import load_model
    except ImportError:
        load_model = None
    if load_model is not None:
        return load_model(name, dtype=torch.float32)

    from transformers import AutoTokenizer

    from molten.models.tiny import TINY_MODELS, build_tiny_model

    if not (SMOLLM2_TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(f"molten.models.load_model is missing and no SmolLM2 tokenizer is in {SMOLLM2_TOKENIZER_DIR}")
    model = build_tiny_model(TINY_MODELS[name]).eval()
    return SimpleNamespace(
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER_DIR),
        model_id=name,
        max_model_len=model.config.max_position_embeddings,
        eos_token_ids=frozenset({TINY_EOS_TOKEN_ID}),
    )


@pytest.fixture(scope="session")
def tiny_llama():
    return load_tiny_model("tiny-random-llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    return load_tiny_model("tiny-random-qwen2")


@pytest.fixture(scope="session")
def make_engine():
    """Factory: `make_engine(loaded, **settings)` builds an LLMEngine, settings as in `make_engine_config`."""

    def build(loaded, **settings) -> LLMEngine:
        return LLMEngine(make_engine_config(**settings), loaded)

    return build


@pytest.fixture(scope="session")
def reference_generate():
    """`reference_generate(model_name, prompts, max_new_tokens)` returns transformers' greedy tokens."""
    return ReferenceGenerator(load_tiny_model)

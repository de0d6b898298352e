"""The bundled SmolLM2 quantized to int8 and int4 keeps its perplexity within the targets."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from molten.data import load_corpus_text
from molten.models import load_model
from molten.quant import quantize_model, weight_bytes
from molten.quant.compare import ComparisonSettings, score_corpus

NUM_CORPUS_TOKENS = 384
SETTINGS = ComparisonSettings(window_tokens=256, stride_tokens=128)


@pytest.fixture(scope="module")
def bundled_fp32():
    """A private float32 copy: engines switch a model's attention, so no shared fixture."""
    return load_model()


def perplexity(model, token_ids: list[int]) -> float:
    return math.exp(-score_corpus(model, token_ids, SETTINGS).target_logprobs.double().mean().item())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("precision", "max_memory_fraction", "max_perplexity_increase"),
    [("int8", 0.30, 0.03), ("int4", 0.20, 0.15)],
)
def test_bundled_quantized_quality(bundled_fp32, precision, max_memory_fraction, max_perplexity_increase):
    torch.set_num_threads(1)
    token_ids = bundled_fp32.tokenizer(load_corpus_text())["input_ids"][:NUM_CORPUS_TOKENS]
    fp32_perplexity = perplexity(bundled_fp32.model, token_ids)
    quantized = quantize_model(copy.deepcopy(bundled_fp32.model), precision)

    assert weight_bytes(quantized) <= max_memory_fraction * weight_bytes(bundled_fp32.model)
    assert perplexity(quantized, token_ids) <= fp32_perplexity * (1 + max_perplexity_increase)

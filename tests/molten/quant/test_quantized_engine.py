"""Tiny models loaded as int8/int4 run in Molten's engine and in transformers' generate()."""

from __future__ import annotations

import copy

import pytest
import torch

from molten.config import CacheConfig, EngineConfig, SchedulerConfig
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams
from molten.models import load_model
from molten.quant import quantize_model
from molten.quant.modules import quantize_int4, quantize_int8

PROMPTS = [[101, 2045, 318, 257, 1332, 13], [50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150]]
NUM_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def float_models() -> dict[str, torch.nn.Module]:
    """The float32 tiny models, loaded once. Tests quantize deep copies of them."""
    return {name: load_model(name).model for name in ("tiny-random-llama", "tiny-random-qwen2")}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def fake_quantize(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """Replace each float weight by its dequantized int8/int4 value, keeping float modules.

    The LM head and input embedding get int8 either way, as quantize_model's default does.
    """
    table_modules = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                continue
            weight = module.weight
            if precision == "int8" or id(module) in table_modules:
                codes, scales = quantize_int8(weight)
                weight.copy_(codes.float() * scales.float()[:, None])
            else:
                codes, scales_and_zeros = quantize_int4(weight, 32)
                scales = scales_and_zeros[..., 0].float().t().repeat_interleave(32, dim=1)
                zeros = scales_and_zeros[..., 1].float().t().repeat_interleave(32, dim=1)
                weight.copy_((codes.float() - 8) * scales + zeros)
    return model


def engine_greedy(loaded, prompts: list[list[int]]) -> list[list[int]]:
    config = EngineConfig(
        model=loaded.model_id,
        max_model_len=64,
        cache=CacheConfig(num_kv_blocks=32, kv_block_size=4),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64),
    )
    engine = LLMEngine(config, loaded)
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    return engine.generate(prompts, params)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2"])
def test_quantized_logits_match_fake_quantized(float_models, name, precision):
    ids = torch.tensor([PROMPTS[1] * 3])
    with torch.no_grad():
        expected = fake_quantize(copy.deepcopy(float_models[name]), precision)(input_ids=ids).logits
        output = quantize_model(copy.deepcopy(float_models[name]), precision)(input_ids=ids).logits
    # The integer kernels take bfloat16 activations and the float reference float32 ones.
    # That rounding alone measured 1.5% to 2% on these models.
    assert relative_error(output, expected) < 0.05


def test_int8_logits_close_to_fp32(float_models):
    ids = torch.tensor([PROMPTS[1] * 3])
    model = float_models["tiny-random-llama"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        output = quantize_model(copy.deepcopy(model), "int8")(input_ids=ids).logits
    assert relative_error(output, expected) < 0.15
    assert (output.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_engine_matches_generate(precision):
    loaded = load_model(f"tiny-random-llama:{precision}")
    assert loaded.precision == precision
    expected = []
    for prompt in PROMPTS:
        output = loaded.model.generate(
            torch.tensor([prompt]), max_new_tokens=NUM_NEW_TOKENS, min_new_tokens=NUM_NEW_TOKENS, do_sample=False
        )
        expected.append(output[0, len(prompt):].tolist())

    # generate() first: the engine switches the model to its paged attention.
    assert engine_greedy(loaded, PROMPTS) == expected

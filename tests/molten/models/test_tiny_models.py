"""Tiny random models: deterministic weights and greedy decoding robust to float32 noise."""

from __future__ import annotations

import pytest
import torch

from molten.models import TINY_MODELS, build_tiny_model, load_model

TINY_NAMES = sorted(TINY_MODELS)


def random_prompts(num_prompts: int, num_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Ids 0-2 are <|endoftext|>, <|im_start|> and <|im_end|>, so prompts start at 3.
    return torch.randint(3, 49_152, (num_prompts, num_tokens), generator=generator)


def greedy_tokens(model, prompts: torch.Tensor, num_new_tokens: int) -> list[list[int]]:
    """Greedy-decode a batch of equal-length prompts, [batch, prompt_len], with no padding."""
    output = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=num_new_tokens,
        min_new_tokens=num_new_tokens,
        do_sample=False,
        pad_token_id=2,
    )
    return output[:, prompts.shape[1]:].tolist()


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_weights_same_every_build(name):
    first = build_tiny_model(TINY_MODELS[name]).state_dict()
    second = build_tiny_model(TINY_MODELS[name]).state_dict()

    assert first.keys() == second.keys()
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key


def test_tiny_models_differ():
    llama = build_tiny_model(TINY_MODELS["tiny-random-llama"])
    qwen2 = build_tiny_model(TINY_MODELS["tiny-random-qwen2"])

    assert not torch.equal(llama.model.embed_tokens.weight, qwen2.model.embed_tokens.weight)


def test_build_keeps_global_rng():
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)

    build_tiny_model(TINY_MODELS["tiny-random-llama"])

    assert torch.equal(torch.rand(4), expected)


def test_qwen2_biases_nonzero():
    model = build_tiny_model(TINY_MODELS["tiny-random-qwen2"])
    attention = model.model.layers[0].self_attn

    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert projection.bias is not None
        assert projection.bias.abs().mean() > 0.05


@pytest.mark.parametrize("name", TINY_NAMES)
def test_tiny_logits_peaked(name):
    model = build_tiny_model(TINY_MODELS[name]).eval()

    with torch.no_grad():
        logits = model(random_prompts(8, 32, seed=5)).logits
    top_two = logits.topk(2, dim=-1).values
    gaps = (top_two[..., 0] - top_two[..., 1]).flatten()

    assert gaps.median() > 0.3
    assert logits.std() > 2.0


@pytest.mark.parametrize("name", TINY_NAMES)
def test_sdpa_and_eager_agree(name):
    """Greedy tokens must not depend on how attention is computed."""
    model = build_tiny_model(TINY_MODELS[name]).eval()
    prompts = random_prompts(20, 16, seed=7)

    tokens_by_implementation = {}
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        tokens_by_implementation[implementation] = greedy_tokens(model, prompts, 32)

    for index, (sdpa, eager) in enumerate(zip(tokens_by_implementation["sdpa"], tokens_by_implementation["eager"])):
        assert sdpa == eager, f"prompt {index}"
    distinct_per_sequence = [len(set(tokens)) for tokens in tokens_by_implementation["sdpa"]]
    assert min(distinct_per_sequence) > 16, "a random model that repeats itself hides KV cache bugs"


@pytest.mark.parametrize("name", TINY_NAMES)
def test_load_tiny_model(name):
    loaded = load_model(name)

    assert loaded.model_id == name
    assert loaded.max_model_len == 2048
    assert loaded.eos_token_ids == {2}
    assert loaded.dtype == torch.float32
    assert not loaded.model.training
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    assert len(loaded.tokenizer) == loaded.config.vocab_size == 49_152
    assert loaded.tokenizer.eos_token_id == 2
    assert loaded.load_seconds > 0


def test_load_tiny_bfloat16():
    loaded = load_model("tiny-random-llama", dtype=torch.bfloat16)

    assert loaded.dtype == torch.bfloat16
    assert all(parameter.dtype == torch.bfloat16 for parameter in loaded.model.parameters())
    assert loaded.weight_bytes == 2 * loaded.num_parameters


def test_load_with_eager_attention():
    loaded = load_model("tiny-random-qwen2", attn_implementation="eager")

    assert loaded.config._attn_implementation == "eager"


def test_load_rejects_integer_dtype():
    with pytest.raises(ValueError, match="floating-point"):
        load_model("tiny-random-llama", dtype=torch.int8)


def test_tiny_generates_through_tokenizer():
    loaded = load_model("tiny-random-llama")
    prompt = loaded.tokenizer("Hello there", return_tensors="pt").input_ids

    [first] = greedy_tokens(loaded.model, prompt, 8)
    [second] = greedy_tokens(load_model("tiny-random-llama").model, prompt, 8)

    assert first == second
    assert isinstance(loaded.tokenizer.decode(first), str)


@pytest.mark.slow
def test_bundled_model_answers(bundled_model):
    tokenizer = bundled_model.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    [tokens] = greedy_tokens(bundled_model.model, prompt["input_ids"], 12)

    assert bundled_model.model_id == "smollm2-135m-instruct"
    assert bundled_model.max_model_len == 8192
    assert bundled_model.eos_token_ids == {2}
    assert bundled_model.num_parameters == 134_515_008
    assert "Paris" in tokenizer.decode(tokens)

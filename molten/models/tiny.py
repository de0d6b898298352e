"""Tiny randomly initialised models for fast engine tests.

Each model is built from a small config with a fixed seed, so every call returns the same
weights. They use the bundled SmolLM2 tokenizer (vocabulary 49,152, `<|im_end|>` = 2), so
tests can pass text. Their output is meaningless text, but greedy decoding is stable,
which is what an engine test needs: the logits are scaled so the top token usually leads
the runner-up by far more than float32 rounding. Because of that, two computations that
are equal in exact arithmetic (eager versus SDPA attention, a padded versus a packed
batch) pick the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY_VOCAB_SIZE = 49_152
"""Vocabulary size of the bundled SmolLM2 tokenizer, which the tiny models share."""

INITIALIZER_RANGE = 0.2
"""Std of the normal initialisation, ten times the usual 0.02. With 0.02 the logits have
a std near 0.16, the median gap between the top two is 0.025, and some of 640 sampled
positions had a gap under 1e-4, close enough for float32 reordering noise to flip a
greedy choice."""

LM_HEAD_SCALE = 2.5
"""Factor applied to the output projection after initialisation. It raises the logit std
to about 4 (median gap between the top two logits 0.6 to 0.7) while the attention layers
keep INITIALIZER_RANGE, so attention scores do not become any sharper."""

_SHARED_CONFIG = {
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "initializer_range": INITIALIZER_RANGE,
    # Untied, because with a tied head a random model tends to repeat its input token.
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}


@dataclass(frozen=True, eq=False)
class TinyModelSpec:
    """Recipe for one tiny model: architecture, config values and seed."""

    name: str
    description: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    config_values: dict = field(default_factory=dict)
    seed: int = 0
    randomize_biases: bool = False
    """Draw linear biases from the same normal as the weights. transformers initialises
    biases to zero, and a zero bias would not show whether an engine applies it."""

    def build_config(self) -> PretrainedConfig:
        return self.config_class(**_SHARED_CONFIG, **self.config_values)


TINY_RANDOM_LLAMA = TinyModelSpec(
    name="tiny-random-llama",
    description="Random Llama, 4 layers, hidden 64, 4 query / 2 KV heads (GQA), for tests",
    config_class=LlamaConfig,
    model_class=LlamaForCausalLM,
    config_values={
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    seed=0,
)

TINY_RANDOM_QWEN2 = TinyModelSpec(
    name="tiny-random-qwen2",
    description="Random Qwen2, 3 layers, hidden 64, 4 query / 2 KV heads, q/k/v bias, for tests",
    config_class=Qwen2Config,
    model_class=Qwen2ForCausalLM,
    config_values={
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    },
    seed=1,
    randomize_biases=True,
)

TINY_MODELS: dict[str, TinyModelSpec] = {
    spec.name: spec for spec in (TINY_RANDOM_LLAMA, TINY_RANDOM_QWEN2)
}


def build_tiny_model(spec: TinyModelSpec, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Build the model with its seed, in float32, then cast it to `dtype`.

    The global torch RNG state is saved and restored, so building a model does not change
    the random numbers the caller draws afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = spec.model_class(spec.build_config())
        with torch.no_grad():
            if spec.randomize_biases:
                _randomize_linear_biases(model, std=INITIALIZER_RANGE)
            model.get_output_embeddings().weight.mul_(LM_HEAD_SCALE)
    return model.to(dtype)


def count_tiny_parameters(spec: TinyModelSpec) -> int:
    """Count the parameters without allocating them, by building on the meta device."""
    with torch.device("meta"):
        model = spec.model_class(spec.build_config())
    return sum(parameter.numel() for parameter in model.parameters())


def _randomize_linear_biases(model: torch.nn.Module, std: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            module.bias.normal_(0.0, std)

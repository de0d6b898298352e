"""The int8/int4 modules against float references: single layers, lookups, tied tables."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from molten.quant import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, quantize_model, weight_bytes
from molten.quant.modules import pack_nibbles, quantize_int4, quantize_int8, unpack_nibbles


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def dequantize_int4(codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] codes and [in // group, out, 2] scales and zeros -> [out, in] float weights."""
    scales = scales_and_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)
    zeros = scales_and_zeros[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (codes.float() - 8) * scales + zeros


@pytest.fixture
def linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 96, bias=True)
    layer.weight.data.normal_(0, 0.2)
    return layer


def test_int8_linear_matches_dequantized(linear):
    x = torch.randn(3, 5, 128)
    codes, scales = quantize_int8(linear.weight)
    dequantized = codes.float() * scales.float()[:, None]
    module = Int8Linear.from_linear(linear)

    output = module(x)
    assert output.shape == (3, 5, 96)
    assert output.dtype == torch.float32
    # Only bfloat16 rounding of the activations separates the kernel from the reference.
    assert relative_error(output, x @ dequantized.t() + linear.bias) < 0.01
    assert relative_error(output, linear(x)) < 0.02


def test_int4_linear_matches_dequantized(linear):
    x = torch.randn(7, 128)
    codes, scales_and_zeros = quantize_int4(linear.weight, 32)
    dequantized = dequantize_int4(codes, scales_and_zeros, 32)
    module = Int4Linear.from_codes(codes, scales_and_zeros, 32, linear.bias)

    output = module(x)
    assert output.shape == (7, 96)
    assert relative_error(output, x @ dequantized.t() + linear.bias) < 0.01
    # Four bits per weight on Gaussian weights: about 8% error per weight.
    assert relative_error(dequantized, linear.weight) < 0.12
    assert relative_error(output, linear(x)) < 0.12


def test_nibble_packing_round_trips():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.int32)
    packed = pack_nibbles(codes)
    assert packed.shape == (5, 32)
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes.to(torch.uint8))


def test_embeddings_return_dequantized_rows():
    torch.manual_seed(1)
    table = torch.randn(50, 64)
    ids = torch.tensor([[0, 7, 49], [3, 3, 12]])

    codes8, scales8 = quantize_int8(table)
    lookup8 = Int8Embedding(codes8, scales8, torch.float32)(ids)
    expected8 = (codes8.float() * scales8.float()[:, None])[ids]
    assert lookup8.shape == (2, 3, 64)
    assert torch.allclose(lookup8, expected8)

    codes4, scales_and_zeros = quantize_int4(table, 32)
    lookup4 = Int4Embedding(pack_nibbles(codes4), scales_and_zeros, 32, torch.float32)(ids)
    expected4 = dequantize_int4(codes4, scales_and_zeros, 32)[ids]
    assert lookup4.shape == (2, 3, 64)
    assert torch.allclose(lookup4, expected4, atol=1e-6)
    assert relative_error(lookup4, table[ids]) < 0.12


@pytest.mark.parametrize(
    ("precision", "head_precision", "head_class"),
    [("int8", None, Int8Linear), ("int4", None, Int8Linear), ("int4", "int4", Int4Linear)],
)
def test_tied_model_shares_one_table(precision, head_precision, head_class):
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    torch.manual_seed(2)
    model = LlamaForCausalLM(config).eval()
    float_bytes = weight_bytes(model)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits

    quantize_model(model, precision, head_precision=head_precision)
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    assert isinstance(head, head_class)
    assert isinstance(model.model.layers[0].mlp.up_proj, Int8Linear if precision == "int8" else Int4Linear)
    shared_name = "codes" if head_class is Int8Linear else "scales_and_zeros"
    assert getattr(head, shared_name).data_ptr() == getattr(embedding, shared_name).data_ptr()
    assert not any(isinstance(module, torch.nn.Linear) for module in model.modules())
    # int8: a quarter of fp32 plus scales. int4: an eighth, plus group scales, and a
    # quarter for the large int8 table (or an eighth for the int4 one and its lookup copy).
    limit = 0.30 if precision == "int8" else 0.27
    assert weight_bytes(model) < limit * float_bytes
    with torch.no_grad():
        output = model(input_ids=ids).logits
    assert output.shape == expected.shape
    assert relative_error(output, expected) < (0.05 if precision == "int8" else 0.3)

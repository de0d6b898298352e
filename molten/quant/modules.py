"""Weight-only int8 and int4 linear and embedding modules on PyTorch's own CPU kernels.

Weights are stored as integers and multiplied by `torch._weight_int8pack_mm` (int8, one
scale per output channel) or `torch._weight_int4pack_mm_for_cpu` (int4, one scale and
zero point per group of `group_size` input channels). Activations enter both kernels in
bfloat16, because with float32 activations the same kernels ran 3x (int8) to 25x (int4)
slower than a float32 `F.linear` on an AMD EPYC CPU with PyTorch 2.13. With bfloat16
activations they were 3x to 6x faster than float32 on SmolLM2's 49,152-row LM head
(docs/quantization.md has the table). Everything else in the model (norms, attention,
residual stream, logits) stays float32.

Scales and zero points are kept in bfloat16 because the kernels take them in the dtype
of the activations. The integers are computed against the bfloat16-rounded scales, so
rounding the scales adds no error of its own.

The embedding modules serve input lookups. With tied weights they share the LM head's
integer tensors, so the 49,152 x 576 table of SmolLM2 is stored once.
"""

from __future__ import annotations

import torch
from torch import nn

KERNEL_DTYPE = torch.bfloat16
"""Dtype of activations, scales and zero points inside the integer kernels."""

INT4_LEVELS = 15
"""Largest int4 code: codes run 0..15."""

INT4_ZERO_CODE = 8
"""PyTorch's int4 kernel dequantizes code q as (q - 8) * scale + zero."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [out, in] float weights symmetrically per output channel.

    Returns (codes [out, in] int8 in -127..127, scales [out] bfloat16), with
    weight ~= codes * scales[:, None].
    """
    weight = weight.detach().float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).to(KERNEL_DTYPE)
    codes = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize [out, in] float weights asymmetrically per group of `group_size` inputs.

    Returns (codes [out, in] int32 in 0..15, scales_and_zeros [in // group_size, out, 2]
    bfloat16), the layout `torch._weight_int4pack_mm_for_cpu` takes, with
    weight ~= (codes - 8) * scale + zero for each group.
    """
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scales = ((high - low) / INT4_LEVELS).clamp(min=1e-8).to(KERNEL_DTYPE)
    zeros = (low + INT4_ZERO_CODE * scales.float()).to(KERNEL_DTYPE)
    codes = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None]) + INT4_ZERO_CODE
    codes = codes.clamp(0, INT4_LEVELS).to(torch.int32).reshape(out_features, in_features)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return codes, scales_and_zeros


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack [rows, cols] int4 codes into [rows, cols // 2] uint8, even columns in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: [rows, cols // 2] uint8 -> [rows, cols] uint8 codes."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights, one bfloat16 scale per output channel."""

    # NOTE: `_weight_int8pack_mm` is compute-bound here. fbgemm's dynamic int8 linear
    # measured 2x to 6x faster per layer, but it needs PyTorch's deprecated quantized
    # tensor types (docs/quantization.md).

    is_molten_quantized = True

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)  # [out, in] int8
        self.register_buffer("scales", scales)  # [out] bfloat16
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        codes, scales = quantize_int8(linear.weight)
        return cls(codes, scales, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # [tokens, in]
        y = torch._weight_int8pack_mm(rows, self.codes, self.scales).to(x.dtype)  # [tokens, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """`nn.Linear` with int4 weights, a bfloat16 scale and zero point per group of inputs."""

    is_molten_quantized = True

    def __init__(
        self,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        group_size: int,
        in_features: int,
        bias: torch.Tensor | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = packed.shape[0]
        self.group_size = group_size
        self.register_buffer("packed", packed)  # [out, in // 2] uint8, the kernel's own layout
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in // group_size, out, 2] bfloat16
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
    ) -> Int4Linear:
        # The second argument (inner K tiles) is ignored by the CPU packing, which has one layout.
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        return cls(packed, scales_and_zeros, group_size, codes.shape[1], bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        rows = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)  # [tokens, in]
        y = torch._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype)  # [tokens, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 groups of {self.group_size}"
        )


class Int8Embedding(nn.Module):
    """Embedding lookup from int8 rows. Only the looked-up rows are dequantized."""

    is_molten_quantized = True

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = codes.shape
        self.output_dtype = dtype
        self.register_buffer("codes", codes)  # [vocab, dim] int8, shared with a tied Int8Linear
        self.register_buffer("scales", scales)  # [vocab] bfloat16

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [...] -> [..., dim]
        rows = self.codes[input_ids].to(self.output_dtype)
        return rows * self.scales[input_ids].to(self.output_dtype).unsqueeze(-1)


class Int4Embedding(nn.Module):
    """Embedding lookup from int4 rows packed two codes per byte, with per-group scales."""

    is_molten_quantized = True

    def __init__(self, nibbles: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings = nibbles.shape[0]
        self.embedding_dim = nibbles.shape[1] * 2
        self.group_size = group_size
        self.output_dtype = dtype
        self.register_buffer("nibbles", nibbles)  # [vocab, dim // 2] uint8
        # [dim // group_size, vocab, 2] bfloat16, shared with a tied Int4Linear
        self.register_buffer("scales_and_zeros", scales_and_zeros)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [...] -> [..., dim]
        flat_ids = input_ids.reshape(-1)
        codes = unpack_nibbles(self.nibbles[flat_ids]).to(self.output_dtype)  # [tokens, dim]
        num_groups = self.embedding_dim // self.group_size
        codes = codes.view(-1, num_groups, self.group_size)  # [tokens, groups, group_size]
        group_params = self.scales_and_zeros[:, flat_ids].to(self.output_dtype)  # [groups, tokens, 2]
        scales = group_params[..., 0].transpose(0, 1).unsqueeze(-1)  # [tokens, groups, 1]
        zeros = group_params[..., 1].transpose(0, 1).unsqueeze(-1)
        rows = (codes - INT4_ZERO_CODE) * scales + zeros
        return rows.reshape(*input_ids.shape, self.embedding_dim)

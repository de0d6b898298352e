"""Precision names, the `<model>:<precision>` suffix, and which device runs which precision."""

from __future__ import annotations

import torch

from molten.models.errors import PrecisionError

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
"""Every precision a model id may carry as a suffix. No suffix means fp32."""

QUANTIZED_PRECISIONS = ("int8", "int4")
"""Precisions whose linear weights are integers, loaded through molten.quant's modules."""

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Weight and activation dtype of each floating-point precision."""


def split_precision(spec: str) -> tuple[str, str | None]:
    """Split `"name:int8"` into `("name", "int8")`. A spec without a colon gives `(spec, None)`.

    Raises PrecisionError, naming the valid precisions, for an unknown suffix.
    """
    if ":" not in spec:
        return spec, None
    base, suffix = spec.rsplit(":", 1)
    precision = suffix.strip().lower()
    if precision not in PRECISIONS:
        raise PrecisionError(
            f"Invalid precision {suffix!r} in model {spec!r}: the precision suffix must be one of "
            f"{', '.join(PRECISIONS)} (for example {base.strip() or 'smollm2-135m-instruct'}:int8), "
            f"or leave it out for fp32."
        )
    return base.strip(), precision


def check_precision_supported(precision: str, device: str | torch.device, *, model_id: str = "the model") -> None:
    """Raise PrecisionError when `precision` cannot run on `device`, naming what to use instead."""
    device_type = torch.device(device).type
    if precision == "fp16" and device_type == "cpu":
        raise PrecisionError(
            f"Cannot load {model_id} with precision fp16 on CPU, because PyTorch's CPU float16 "
            f"matrix products are many times slower than float32. fp16 is for GPUs. On CPU use "
            f"fp32, bf16, int8 or int4."
        )
    if precision in QUANTIZED_PRECISIONS and device_type != "cpu":
        # NOTE: the int8/int4 modules call PyTorch's CPU weight-only kernels and have only
        # been run on CPU, so other devices are rejected rather than guessed at.
        raise PrecisionError(
            f"Cannot load {model_id} with precision {precision} on device {device_type!r}: "
            f"Molten's int8 and int4 kernels run on CPU only. On a GPU use bf16 or fp16."
        )
    if precision == "int4" and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        raise PrecisionError(
            f"Cannot load {model_id} with precision int4: it needs "
            f"torch.ops.aten._weight_int4pack_mm_for_cpu, which PyTorch {torch.__version__} lacks. "
            f"Use int8, or install a PyTorch release that has it (2.13 does)."
        )

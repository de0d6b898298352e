"""Precision variants of a model: fp32, bf16, fp16 (GPU) and int8/int4 weight-only quantization.

`molten.quant.compare.compare_precisions` measures the variants side by side. It is not
imported here because it imports the engine.
"""

from molten.quant.modules import Int4Embedding, Int4Linear, Int8Embedding, Int8Linear
from molten.models.errors import PrecisionError
from molten.models.precision import (
    FLOAT_DTYPES,
    PRECISIONS,
    QUANTIZED_PRECISIONS,
    check_precision_supported,
    split_precision,
)
from molten.quant.quantize import DEFAULT_INT4_GROUP_SIZE, quantize_model, weight_bytes

__all__ = [
    "DEFAULT_INT4_GROUP_SIZE",
    "FLOAT_DTYPES",
    "Int4Embedding",
    "Int4Linear",
    "Int8Embedding",
    "Int8Linear",
    "PRECISIONS",
    "PrecisionError",
    "QUANTIZED_PRECISIONS",
    "check_precision_supported",
    "quantize_model",
    "split_precision",
    "weight_bytes",
]

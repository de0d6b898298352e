"""`<model>:<precision>` ids: parsing, the loaded precision, and clear rejections."""

from __future__ import annotations

import pytest
import torch

from molten.models import ModelError, load_model, resolve_model
from molten.models.errors import PrecisionError


@pytest.mark.parametrize("spec", ["x:badprecision", "tiny-random-llama:int3", "tiny-random-llama:"])
def test_invalid_precision_names_field(spec):
    with pytest.raises(PrecisionError) as raised:
        resolve_model(spec)
    assert raised.value.field == "precision"
    assert isinstance(raised.value, ModelError)
    message = str(raised.value)
    assert spec in message
    assert "fp32, bf16, fp16, int8, int4" in message


def test_precision_suffix_sets_model_id():
    assert resolve_model("tiny-random-llama:int8").model_id == "tiny-random-llama:int8"
    assert resolve_model("tiny-random-llama:INT4").precision == "int4"
    # fp32 is the default, so its suffix leaves the served name plain.
    assert resolve_model("tiny-random-llama:fp32").model_id == "tiny-random-llama"
    assert resolve_model("tiny-random-llama").precision is None


def test_fp16_on_cpu_is_rejected_at_load():
    with pytest.raises(PrecisionError) as raised:
        load_model("tiny-random-llama:fp16")
    assert raised.value.field == "precision"
    message = str(raised.value)
    assert "fp16" in message
    assert "CPU" in message
    assert "bf16" in message


def test_quantized_precision_off_cpu_is_rejected():
    with pytest.raises(PrecisionError, match="CPU only"):
        load_model("tiny-random-llama:int8", device="meta")


def test_conflicting_dtype_is_rejected():
    with pytest.raises(PrecisionError, match="conflicts with dtype bfloat16"):
        load_model("tiny-random-llama:int8", dtype=torch.bfloat16)


def test_bf16_suffix_loads_bfloat16():
    loaded = load_model("tiny-random-llama:bf16")
    assert loaded.precision == "bf16"
    assert loaded.dtype == torch.bfloat16
    assert loaded.model_id == "tiny-random-llama:bf16"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_int8_weight_bytes_counts_integer_tensors():
    fp32 = load_model("tiny-random-llama")
    int8 = load_model("tiny-random-llama:int8")
    assert int8.precision == "int8"
    assert int8.dtype == torch.float32
    # Integers and scales are buffers, not parameters, and weight_bytes must count them.
    assert 0.25 * fp32.weight_bytes < int8.weight_bytes < 0.30 * fp32.weight_bytes

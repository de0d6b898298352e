"""The NVML path against a stand-in NVML module: normal readings, unsupported queries, a lost GPU."""

from __future__ import annotations

import logging
import time

import pytest
from fake_nvml import (
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    FakeGpu,
    FakeNvml,
)

from molten.telemetry import TelemetryConfig, TelemetrySampler
from molten.telemetry.nvml import GPU_FIELDS, NvmlReader, NvmlUnavailableError


def test_nvml_normal_readings_in_sample_units():
    reader = NvmlReader(FakeNvml([FakeGpu()]))
    assert reader.open() == 1

    (gpu,) = reader.read()

    assert gpu["index"] == 0
    assert gpu["name"] == "NVIDIA Fake H100"
    assert gpu["memory_used_bytes"] == 30 * 2**30
    assert gpu["memory_total_bytes"] == 80 * 2**30
    assert gpu["processes"] == [{"pid": 4242, "used_bytes": 20 * 2**30}]
    assert gpu["utilization_gpu_pct"] == 87
    assert gpu["utilization_memory_pct"] == 41
    assert gpu["sm_clock_mhz"] == 1755
    assert gpu["memory_clock_mhz"] == 2619
    assert gpu["power_w"] == pytest.approx(312.5)
    assert gpu["temperature_c"] == 64
    assert gpu["pcie_rx_bytes_per_s"] == 2000 * 1024
    assert gpu["pcie_tx_bytes_per_s"] == 500 * 1024
    assert gpu["errors"] == {}


def test_nvml_unsupported_query_degrades_one_field():
    fake = FakeNvml([FakeGpu(failures={"nvmlDeviceGetPowerUsage": NVML_ERROR_NOT_SUPPORTED})])
    reader = NvmlReader(fake)
    reader.open()

    (gpu,) = reader.read()

    assert gpu["power_w"] is None
    assert gpu["errors"] == {"power_w": "Not Supported"}
    assert gpu["temperature_c"] == 64
    assert gpu["memory_used_bytes"] == 30 * 2**30


def test_nvml_unsupported_pair_degrades_both_fields():
    reader = NvmlReader(FakeNvml([FakeGpu(failures={"nvmlDeviceGetUtilizationRates": NVML_ERROR_NOT_SUPPORTED})]))
    reader.open()

    (gpu,) = reader.read()

    assert gpu["utilization_gpu_pct"] is None
    assert gpu["utilization_memory_pct"] is None
    assert set(gpu["errors"]) == {"utilization_gpu_pct", "utilization_memory_pct"}
    assert gpu["sm_clock_mhz"] == 1755


def test_nvml_lost_gpu_keeps_other_gpus():
    lost = FakeGpu(name="NVIDIA Lost GPU", failures={"*": NVML_ERROR_GPU_IS_LOST})
    reader = NvmlReader(FakeNvml([FakeGpu(), lost]))
    reader.open()

    healthy, lost_reading = reader.read()

    assert healthy["errors"] == {}
    assert healthy["power_w"] == pytest.approx(312.5)
    assert lost_reading["index"] == 1
    for name in GPU_FIELDS:
        assert lost_reading[name] is None, name
        assert "GPU is lost" in lost_reading["errors"][name], name


def test_nvml_gpu_lost_after_start_then_back():
    gpu = FakeGpu()
    reader = NvmlReader(FakeNvml([gpu]))
    reader.open()
    assert reader.read()[0]["errors"] == {}

    gpu.failures = {"*": NVML_ERROR_GPU_IS_LOST}
    lost = reader.read()[0]
    assert lost["memory_used_bytes"] is None
    assert lost["errors"]["memory_used_bytes"] == "GPU is lost"

    gpu.failures = {}
    assert reader.read()[0]["memory_used_bytes"] == 30 * 2**30


def test_nvml_process_without_memory_figure():
    reader = NvmlReader(FakeNvml([FakeGpu(processes=[(7, None), (3, 1024)])]))
    reader.open()

    (gpu,) = reader.read()

    assert gpu["processes"] == [{"pid": 3, "used_bytes": 1024}, {"pid": 7, "used_bytes": None}]


def test_nvml_open_failure_names_reason():
    reader = NvmlReader(FakeNvml([FakeGpu()], init_error=NVML_ERROR_LIBRARY_NOT_FOUND))

    with pytest.raises(NvmlUnavailableError, match="NVML Shared Library Not Found"):
        reader.open()


def test_nvml_zero_gpus_is_unavailable():
    with pytest.raises(NvmlUnavailableError, match="no GPU"):
        NvmlReader(FakeNvml([])).open()


def test_sampler_uses_nvml_source():
    sampler = TelemetrySampler(TelemetryConfig(), nvml=FakeNvml([FakeGpu(), FakeGpu(name="second")]))

    sample = sampler.sample()
    snapshot = sampler.snapshot()

    assert snapshot["source"] == "nvml"
    assert snapshot["notice"] is None
    assert [gpu["name"] for gpu in sample["gpus"]] == ["NVIDIA Fake H100", "second"]
    assert sample["cpu"]["system_memory_total_bytes"] > 0
    assert snapshot["samples"] == [sample]


def test_sampler_falls_back_and_logs_once(caplog):
    fake = FakeNvml([FakeGpu()], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)
    with caplog.at_level(logging.WARNING, logger="molten.telemetry.sampler"):
        sampler = TelemetrySampler(TelemetryConfig(), nvml=fake)
        sampler.sample()
        sampler.sample()

    snapshot = sampler.snapshot()
    assert snapshot["source"] == "cpu"
    assert snapshot["notice"].startswith("No NVIDIA GPU found")
    assert "NVML Shared Library Not Found" in snapshot["notice"]
    assert all(sample["gpus"] == [] for sample in snapshot["samples"])
    notices = [record for record in caplog.records if "No NVIDIA GPU found" in record.getMessage()]
    assert len(notices) == 1


def test_sampler_thread_survives_lost_gpu():
    gpu = FakeGpu()
    fake = FakeNvml([gpu])
    sampler = TelemetrySampler(TelemetryConfig(interval_s=0.05), nvml=fake)
    sampler.start()
    try:
        deadline = time.monotonic() + 5
        while len(sampler.buffer) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        gpu.failures = {"*": NVML_ERROR_GPU_IS_LOST}
        lost_from = time.time()
        while time.monotonic() < deadline:
            recent = sampler.snapshot(since=lost_from)["samples"]
            if len(recent) >= 2:
                break
            time.sleep(0.02)
    finally:
        sampler.stop()

    assert len(recent) >= 2, "the sampler stopped taking samples after the GPU was lost"
    assert all(sample["gpus"][0]["errors"]["power_w"] == "GPU is lost" for sample in recent)
    assert sampler.num_failed_samples == 0


def test_sampler_thread_survives_reader_exception():
    class BrokenNvml(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, handle):
            raise ZeroDivisionError("not an NVML error")

    sampler = TelemetrySampler(TelemetryConfig(interval_s=0.05), nvml=BrokenNvml([FakeGpu()]))
    sampler.start()
    try:
        deadline = time.monotonic() + 5
        while sampler.num_failed_samples < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sampler.stop()

    assert sampler.num_failed_samples >= 2
    assert sampler._thread is not None
    assert not sampler._thread.is_alive()

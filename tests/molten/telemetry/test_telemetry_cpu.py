"""The CPU fallback, for real: psutil readings of this machine and of real processes, and the ring buffer."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from molten.config import ConfigError
from molten.telemetry import RingBuffer, TelemetryConfig, TelemetrySampler
from molten.telemetry.cpu import CpuReader


def test_cpu_reading_of_this_machine():
    reader = CpuReader()
    reader.register("molten:test", os.getpid(), torch_allocated_bytes=1234)
    time.sleep(0.05)

    reading = reader.read()

    assert 0 <= reading["utilization_pct"] <= 100
    assert reading["system_memory_total_bytes"] == psutil.virtual_memory().total
    assert 0 < reading["system_memory_used_bytes"] <= reading["system_memory_total_bytes"]
    assert reading["torch_allocated_bytes"] == 1234
    (actor,) = reading["actors"]
    assert actor["name"] == "molten:test"
    assert actor["pid"] == os.getpid()
    assert actor["rss_bytes"] == pytest.approx(psutil.Process().memory_info().rss, rel=0.2)


def test_cpu_reader_drops_exited_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        reader = CpuReader()
        reader.register("molten:child", child.pid, torch_allocated_bytes=10)
        reader.register("molten:self", os.getpid())
        assert {a["name"] for a in reader.read()["actors"]} == {"molten:child", "molten:self"}
    finally:
        child.kill()
        child.wait(timeout=10)

    reading = reader.read()

    assert [a["name"] for a in reading["actors"]] == ["molten:self"]
    assert reading["torch_allocated_bytes"] is None
    assert [p.name for p in reader.registered()] == ["molten:self"]


def test_cpu_reader_ignores_missing_pid():
    reader = CpuReader()
    with subprocess.Popen([sys.executable, "-c", "pass"]) as gone:
        gone.wait(timeout=30)

    reader.register("molten:gone", gone.pid)

    assert reader.read()["actors"] == []


def test_sampler_cpu_fallback_without_nvidia_driver():
    """This machine has no NVIDIA driver, so the real pynvml cannot start and the CPU path runs."""
    sampler = TelemetrySampler(TelemetryConfig(interval_s=0.05, history_samples=3))
    sampler.cpu.register("molten:test", os.getpid())
    sampler.start()
    try:
        deadline = time.monotonic() + 5
        while len(sampler.buffer) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        sampler.stop()

    snapshot = sampler.snapshot()
    assert snapshot["source"] == "cpu"
    assert snapshot["notice"].startswith("No NVIDIA GPU found")
    assert snapshot["interval_s"] == 0.05
    assert len(snapshot["samples"]) == 3, "the ring buffer keeps only history_samples samples"
    times = [sample["time"] for sample in snapshot["samples"]]
    assert times == sorted(times)
    assert sampler.snapshot(since=times[1])["samples"] == snapshot["samples"][2:]
    assert snapshot["samples"][-1]["cpu"]["actors"][0]["rss_bytes"] > 0


def test_ring_buffer_keeps_newest():
    buffer: RingBuffer[int] = RingBuffer(3)
    for value in range(5):
        buffer.append(value)

    assert buffer.snapshot() == [2, 3, 4]
    assert buffer.items_after(float, 2.5) == [3, 4]
    assert buffer.last() == 4
    assert len(buffer) == 3


@pytest.mark.parametrize(
    ("field", "value"),
    [("interval_s", 0.0), ("history_samples", 0), ("peak_flops_per_s", -1.0), ("peak_dtype", "int3")],
)
def test_telemetry_config_names_bad_field(field, value):
    config = TelemetryConfig(**{field: value})

    with pytest.raises(ConfigError) as raised:
        config.validate()

    assert raised.value.field == field

"""Prometheus metrics against client-measured timings, and the telemetry and step-trace routes.

API case C16: 10 streamed requests with a 1,000-token prompt and 64 new tokens, then the
metrics Ray exports on this node. The mean TTFT must be within 10% of the mean time
from sending a request to its first SSE event. The mean ITL must be within 10% of the
client's (end-to-end - TTFT) / (tokens - 1).

The test deploys its own disaggregated application, so the metrics it reads (tagged with
the application name) hold only its own requests.
"""

from __future__ import annotations

import json
import random
import re
import time
import urllib.request
from dataclasses import replace

import httpx
import pytest
from conftest import BUNDLED_MODEL, wait_healthy

from molten.config import CacheConfig

pytestmark = pytest.mark.slow

APP_NAME = "molten-c16"
ROUTE_PREFIX = "/c16"
NUM_REQUESTS = 10
NUM_PROMPT_TOKENS = 1000
NUM_NEW_TOKENS = 64
TOLERANCE = 0.10
EXPORT_TIMEOUT_S = 60.0
"""Ray's metrics agent exports about every 10 seconds; wait at most this long for the counts."""

SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@pytest.fixture(scope="module")
def c16_url(serve_instance):
    from ray import serve

    from molten.deployments.app import model_app_names, run_app

    settings = replace(
        serve_instance,
        mode="disaggregated",
        app_name=APP_NAME,
        route_prefix=ROUTE_PREFIX,
        cache=CacheConfig(kv_cache_memory_mib=128),
    )
    run_app(settings)
    url = f"http://127.0.0.1:{settings.http_port}{ROUTE_PREFIX}"
    wait_healthy(url)
    yield url
    # Free the workers' memory for the tests that run after this module.
    for name in [APP_NAME, *model_app_names(APP_NAME)]:
        serve.delete(name)


def metrics_url() -> str:
    import ray

    (node,) = [node for node in ray.nodes() if node["Alive"]]
    return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"


def scrape(url: str) -> list[tuple[str, dict, float]]:
    """Return (name, labels, value) of every sample on the Prometheus page."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        match = SAMPLE_LINE.match(line)
        if match:
            samples.append((match[1], dict(LABEL.findall(match[2])), float(match[3])))
    return samples


def total(samples, name: str, role: str | None = None, **labels) -> float:
    """Sum of `name` over this module's application (and `role`, and extra labels)."""
    return sum(
        value
        for sample_name, sample_labels, value in samples
        if sample_name == name
        and sample_labels.get("application", "").startswith(f"{APP_NAME}:")
        and (role is None or sample_labels.get("role") == role)
        and all(sample_labels.get(key) == wanted for key, wanted in labels.items())
    )


def timed_stream(client: httpx.Client, prompt: list[int]) -> tuple[float, float, int]:
    """Stream one completion; return (seconds to the first SSE event, seconds to the last token, tokens)."""
    body = {
        "model": BUNDLED_MODEL,
        "prompt": prompt,
        "max_tokens": NUM_NEW_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first_event = last_token = None
    num_tokens = None
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read().decode(errors="replace")
        buffer = b""
        for chunk in response.iter_bytes():
            now = time.perf_counter()
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                if not block.startswith(b"data: ") or block == b"data: [DONE]":
                    continue
                if first_event is None:
                    first_event = now
                event = json.loads(block[len(b"data: ") :])
                if event.get("choices"):
                    last_token = now
                if event.get("usage"):
                    num_tokens = event["usage"]["completion_tokens"]
    return first_event - started, last_token - started, num_tokens


def wait_for_warmup(url: str) -> list[tuple[str, dict, float]]:
    """Return the metrics once the manager's warm-up request (one token at load) is exported.

    The test subtracts this baseline; without a warm-up it gives up after one export interval.
    """
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(url)
        if total(samples, "ray_molten_time_to_first_token_seconds_count") > 0 or time.monotonic() > deadline:
            return samples
        time.sleep(1)


def test_c16_metrics_match_client_timings(c16_url):
    url = metrics_url()
    baseline = wait_for_warmup(url)
    rng = random.Random(16)
    client_ttft, client_itl = [], []
    requests_started = time.monotonic()
    with httpx.Client(base_url=c16_url, timeout=300) as client:
        info = client.get("/v1/molten/info").json()
        for _ in range(NUM_REQUESTS):
            # Fresh random tokens per request, so no request reuses another's prefix cache.
            prompt = [rng.randrange(100, 40000) for _ in range(NUM_PROMPT_TOKENS)]
            ttft, e2e, num_tokens = timed_stream(client, prompt)
            assert num_tokens == NUM_NEW_TOKENS
            client_ttft.append(ttft)
            client_itl.append((e2e - ttft) / (num_tokens - 1))

    def delta(name: str, role: str | None = None, **labels) -> float:
        return total(samples, name, role, **labels) - total(baseline, name, role, **labels)

    deadline = time.monotonic() + EXPORT_TIMEOUT_S
    while True:
        samples = scrape(url)
        exported = (
            delta("ray_molten_time_to_first_token_seconds_count") >= NUM_REQUESTS
            and delta("ray_molten_inter_token_latency_seconds_count") >= NUM_REQUESTS * (NUM_NEW_TOKENS - 1)
            and delta("ray_molten_e2e_request_latency_seconds_count") >= NUM_REQUESTS
            and total(samples, "ray_molten_num_requests_running", "decode") == 0
        )
        if exported or time.monotonic() > deadline:
            break
        time.sleep(2)

    ttft_count = delta("ray_molten_time_to_first_token_seconds_count", "prefill")
    itl_count = delta("ray_molten_inter_token_latency_seconds_count", "decode")
    # The exact sums: Ray rebuilds a histogram's _sum from bucket midpoints.
    reported_ttft = delta("ray_molten_time_to_first_token_seconds_total", "prefill") / max(ttft_count, 1)
    reported_itl = delta("ray_molten_inter_token_latency_seconds_total", "decode") / max(itl_count, 1)
    measured_ttft = sum(client_ttft) / NUM_REQUESTS
    measured_itl = sum(client_itl) / NUM_REQUESTS
    print(
        f"{NUM_REQUESTS} requests in {time.monotonic() - requests_started:.0f} s; "
        f"TTFT reported {reported_ttft * 1000:.1f} ms, client {measured_ttft * 1000:.1f} ms; "
        f"ITL reported {reported_itl * 1000:.2f} ms, client {measured_itl * 1000:.2f} ms"
    )
    assert ttft_count == NUM_REQUESTS
    assert itl_count == NUM_REQUESTS * (NUM_NEW_TOKENS - 1)
    assert delta("ray_molten_e2e_request_latency_seconds_count", "decode") == NUM_REQUESTS
    assert abs(reported_ttft - measured_ttft) <= TOLERANCE * measured_ttft
    assert abs(reported_itl - measured_itl) <= TOLERANCE * measured_itl

    assert delta("ray_molten_prompt_tokens_total", "prefill") == NUM_REQUESTS * NUM_PROMPT_TOKENS
    assert delta("ray_molten_generation_tokens_total") == NUM_REQUESTS * NUM_NEW_TOKENS
    assert delta("ray_molten_requests_finished_total", "decode", finish_reason="length") == NUM_REQUESTS
    assert delta("ray_molten_request_queue_time_seconds_count", "prefill") == NUM_REQUESTS
    assert delta("ray_molten_prefix_cache_queried_tokens_total", "prefill") >= NUM_REQUESTS * NUM_PROMPT_TOKENS
    assert total(samples, "ray_molten_num_requests_waiting", "decode") == 0

    workers = {worker["role"]: worker for worker in info["workers"]}
    kv_block_bytes = workers["prefill"]["kv_bytes_per_token"] * workers["prefill"]["kv_block_size"]
    blocks_per_request = -(-NUM_PROMPT_TOKENS // workers["prefill"]["kv_block_size"])
    assert delta("ray_molten_kv_handoff_seconds_count", "decode") == NUM_REQUESTS
    assert delta("ray_molten_kv_handoff_bytes_total", "decode") == NUM_REQUESTS * blocks_per_request * kv_block_bytes
    for role in ("prefill", "decode"):
        num_blocks = total(samples, "ray_molten_kv_blocks_used", role) + total(samples, "ray_molten_kv_blocks_free", role)
        assert num_blocks == workers[role]["num_kv_blocks"], role
        assert total(samples, "ray_molten_model_memory_bytes", role, kind="weights") > 100e6, role
        assert total(samples, "ray_molten_model_memory_bytes", role, kind="kv_cache") > 0, role


def test_telemetry_route_cpu_fallback(c16_url):
    with httpx.Client(base_url=c16_url, timeout=60) as client:
        telemetry = client.get("/v1/molten/telemetry").json()
        assert telemetry["samples"], telemetry
        latest = telemetry["samples"][-1]
        later = client.get("/v1/molten/telemetry", params={"since": latest["time"]}).json()

    assert telemetry["source"] == "cpu"
    assert telemetry["notice"].startswith("No NVIDIA GPU found")
    assert telemetry["interval_s"] == 0.5
    assert latest["gpus"] == []
    cpu = latest["cpu"]
    assert 0 <= cpu["utilization_pct"] <= 100
    assert 0 < cpu["system_memory_used_bytes"] <= cpu["system_memory_total_bytes"]
    assert cpu["torch_allocated_bytes"] > 100e6
    names = {actor["name"] for actor in cpu["actors"]}
    assert {
        "molten:telemetry", "molten:ingress", f"molten:prefill:{BUNDLED_MODEL}", f"molten:decode:{BUNDLED_MODEL}"
    } <= names
    assert all(actor["rss_bytes"] > 0 for actor in cpu["actors"])
    assert all(sample["time"] > latest["time"] for sample in later["samples"])


def test_steps_route_costs(c16_url):
    with httpx.Client(base_url=c16_url, timeout=60) as client:
        client.post(
            "/v1/completions",
            json={"model": BUNDLED_MODEL, "prompt": "The roofline model", "max_tokens": 4, "temperature": 0.0},
        ).raise_for_status()
        trace = client.get("/v1/molten/steps").json()
        last_decode_id = trace["workers"]["decode"][-1]["step_id"]
        later = client.get("/v1/molten/steps", params={"since_step": last_decode_id}).json()

    assert set(trace["peaks"]) == {"bandwidth_bytes_per_s", "flops_per_s", "source"}
    assert set(trace["workers"]) == {"prefill", "decode"}
    prefill_step = trace["workers"]["prefill"][-1]
    assert prefill_step["num_prefill_tokens"] > 0
    assert prefill_step["prefill_chunks"][0]["num_tokens"] == prefill_step["num_prefill_tokens"]
    decode_step = trace["workers"]["decode"][-1]
    assert decode_step["num_decode_tokens"] == decode_step["batch_size"] == 1
    assert len(decode_step["decode_request_ids"]) == 1
    for step in (prefill_step, decode_step):
        assert step["weight_bytes"] > 100e6
        assert step["kv_bytes_read"] > 0
        assert step["flops"] > 0
        assert step["duration_ms"] > 0
        assert step["achieved_bandwidth_bytes_per_s"] > 0
        assert step["achieved_flops_per_s"] > 0
    assert later["workers"]["decode"] == []
    # The telemetry actor measured the peaks when the session's Serve started, minutes ago.
    peaks = trace["peaks"]
    assert peaks["source"].startswith("measured on cpu"), peaks
    assert peaks["bandwidth_bytes_per_s"] > 0
    assert peaks["flops_per_s"] > 0
    assert decode_step["bandwidth_utilization"] == pytest.approx(
        decode_step["achieved_bandwidth_bytes_per_s"] / peaks["bandwidth_bytes_per_s"]
    )
    assert decode_step["flop_utilization"] == pytest.approx(decode_step["achieved_flops_per_s"] / peaks["flops_per_s"])

"""The model manager against a real Serve: load, route, alias, budget, compare and swap (tiny models)."""

from __future__ import annotations

import concurrent.futures
import json
import time
from dataclasses import replace

import httpx
import pytest

from molten.config import CacheConfig
from molten.deployments.settings import ManagerSettings
from tests.e2e.conftest import wait_healthy

pytestmark = pytest.mark.slow

LLAMA = "tiny-random-llama"
QWEN = "tiny-random-qwen2"
LLAMA_FP32 = f"{LLAMA}:fp32"
NUM_SWAP_STREAMS = 16
SWAP_STREAM_TOKENS = 48


@pytest.fixture(scope="module")
def manager_settings(serve_session):
    return replace(
        serve_session,
        model=LLAMA,
        mode="colocated",
        worker_num_threads=1,
        app_name="molten-manager",
        route_prefix="/manager",
        cache=CacheConfig(kv_cache_memory_mib=16),
        manager=ManagerSettings(load_wait_timeout_s=0.5, drain_timeout_s=120.0),
    )


@pytest.fixture(scope="module")
def manager_url(manager_settings) -> str:
    from molten.deployments.app import run_app

    settings = manager_settings
    run_app(settings)
    url = f"http://127.0.0.1:{settings.http_port}/manager"
    wait_healthy(url)
    return url


@pytest.fixture(scope="module")
def client(manager_url):
    with httpx.Client(base_url=manager_url, timeout=300) as http:
        yield http


def completion(client: httpx.Client, model: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": model, "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return client.post("/v1/completions", json=body)


def record_of(client: httpx.Client, model: str) -> dict:
    response = client.get(f"/v1/molten/models/{model}")
    assert response.status_code == 200, response.text
    return response.json()


def load(client: httpx.Client, model: str, **extra) -> dict:
    response = client.post("/v1/molten/models/load", json={"model": model, "wait": True, **extra})
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["state"] == "ready", record
    return record


def unload(client: httpx.Client, model: str) -> dict:
    response = client.post("/v1/molten/models/unload", json={"model": model})
    assert response.status_code == 200, response.text
    return response.json()


def test_default_model_ready_with_ledger(client):
    status = client.get("/v1/molten/models").json()
    records = {record["model_id"]: record for record in status["models"]}
    record = records[LLAMA]
    assert record["state"] == "ready"
    assert record["cold_start_seconds"] > 0
    assert record["load_seconds"] <= record["cold_start_seconds"]
    assert record["memory"]["weight_bytes"] > 0
    assert record["memory"]["kv_pool_bytes"] == 16 * 2**20
    assert record["memory"]["total_bytes"] > record["memory"]["weight_bytes"] + record["memory"]["kv_pool_bytes"]
    assert record["memory_before_load"]["molten_rss_bytes"] > 0
    assert record["memory_after_load"]["molten_rss_bytes"] > record["memory_before_load"]["molten_rss_bytes"]
    assert [entry["model_id"] for entry in status["cold_starts"]] == [LLAMA]
    assert [stage["stage"] for stage in record["progress"]][-1] == "ready"


def test_unknown_model_404_lists_served(client):
    response = completion(client, "no-such-model")
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert LLAMA in message
    assert "no-such-model" in message


def test_load_rejects_bad_input(client):
    assert client.post("/v1/molten/models/load", json={}).status_code == 400
    bad_mode = client.post("/v1/molten/models/load", json={"model": QWEN, "mode": "sideways"})
    assert bad_mode.status_code == 400
    assert bad_mode.json()["error"]["param"] == "mode"
    bad_precision = client.post("/v1/molten/models/load", json={"model": QWEN, "precision": "fp7"})
    assert bad_precision.status_code == 400
    assert bad_precision.json()["error"]["param"] == "precision"
    missing = client.post("/v1/molten/models/load", json={"model": "no-such-model-anywhere", "wait": True})
    assert missing.status_code == 200
    assert missing.json()["state"] == "failed"
    assert missing.json()["error"]


def test_failed_swap_keeps_old_model(client):
    client.put("/v1/molten/models/aliases/keep", json={"targets": {LLAMA: 1}})
    swap = client.post("/v1/molten/models/swap", json={"old": LLAMA, "new": "no-such-model-anywhere"})
    assert swap.status_code == 200, swap.text
    outcome = swap.json()
    assert outcome["new"]["state"] == "failed"
    assert outcome["old"]["state"] == "ready"
    assert outcome["aliases_moved"] == []
    assert completion(client, LLAMA).status_code == 200
    assert completion(client, "keep").json()["model"] == LLAMA
    client.delete("/v1/molten/models/aliases/keep")


def test_load_short_of_cpus_rejected(client, manager_settings):
    from molten.deployments.app import manager_handle

    started = time.monotonic()
    # The per-load CPU share is a manager argument (no HTTP field), so call the manager directly.
    reply = manager_handle(manager_settings).load.remote(QWEN, mode="disaggregated", worker_num_cpus=500.0)
    error = reply.result(timeout_s=60)["error"]
    elapsed = time.monotonic() - started
    assert error["status"] == 507
    assert error["code"] == "insufficient_cpu"
    message = error["message"]
    assert "need 1000.00 CPU (500 each, worker_num_cpus)" in message
    assert "CPU are free" in message
    for fix in ("molten models unload", "--mode colocated", "molten serve --worker-cpus"):
        assert fix in message
    # Rejected by the check, not by a deploy that waited: the re-check lasts about 2 s.
    assert elapsed < 15
    assert QWEN not in {record["model_id"] for record in client.get("/v1/molten/models").json()["models"]}


def test_unload_cancels_loading_model(client, manager_settings):
    from ray import serve

    model = f"{QWEN}:fp32"
    started = client.post("/v1/molten/models/load", json={"model": QWEN, "precision": "fp32", "mode": "colocated"})
    assert started.status_code == 202, started.text
    unload_sent = time.monotonic()
    reply = client.post("/v1/molten/models/unload", json={"model": model, "wait": False}, timeout=20)
    assert time.monotonic() - unload_sent < 10
    assert reply.status_code == 200, reply.text
    assert reply.json()["state"] in ("draining", "unloaded")
    # The manager still serves other calls while the cancelled load cleans up.
    assert client.get("/v1/molten/models", timeout=10).status_code == 200

    deadline = time.monotonic() + 90
    while record_of(client, model)["state"] != "unloaded" and time.monotonic() < deadline:
        time.sleep(0.25)
    record = record_of(client, model)
    assert record["state"] == "unloaded", record
    assert "cancelled" in [stage["stage"] for stage in record["progress"]]
    prefix = f"{manager_settings.app_name}:{model}:"
    assert [name for name in serve.status().applications if name.startswith(prefix)] == []
    assert completion(client, model).status_code == 404


def test_request_while_loading_gets_503(client):
    response = client.post("/v1/molten/models/load", json={"model": QWEN, "mode": "disaggregated"})
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "loading"

    early = completion(client, QWEN)
    assert early.status_code == 503
    assert int(early.headers["Retry-After"]) >= 1
    assert "loading" in early.json()["error"]["message"]

    deadline = time.monotonic() + 240
    while record_of(client, QWEN)["state"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.5)
    record = record_of(client, QWEN)
    assert record["state"] == "ready", record
    assert len(record["progress"]) >= 3
    assert len(record["workers"]) == 2

    served = completion(client, QWEN)
    assert served.status_code == 200, served.text
    assert served.json()["model"] == QWEN
    assert {model["id"] for model in client.get("/v1/models").json()["data"]} >= {LLAMA, QWEN}


def test_alias_splits_and_repoints(client):
    load(client, QWEN, mode="disaggregated")
    response = client.put("/v1/molten/models/aliases/chat", json={"targets": {LLAMA: 1, QWEN: 1}})
    assert response.status_code == 200, response.text
    served_by = [completion(client, "chat", max_tokens=1).json()["model"] for _ in range(16)]
    assert set(served_by) == {LLAMA, QWEN}

    client.put("/v1/molten/models/aliases/chat", json={"targets": {QWEN: 1}})
    served_by = {completion(client, "chat", max_tokens=1).json()["model"] for _ in range(4)}
    assert served_by == {QWEN}

    bad = client.put("/v1/molten/models/aliases/chat", json={"targets": {"no-such-model": 1}})
    assert bad.status_code == 404
    assert client.delete("/v1/molten/models/aliases/chat").status_code == 200
    assert completion(client, "chat").status_code == 404


def test_compare_streams_two_models(client):
    load(client, QWEN, mode="disaggregated")
    body = {"models": [LLAMA, QWEN], "prompt": "Once upon", "max_tokens": 6, "ignore_eos": True, "stream": True}
    items = []
    with client.stream("POST", "/v1/molten/compare", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                items.append(json.loads(line[len("data: ") :]))
    done = {item["index"]: item for item in items if item["type"] == "done"}
    assert sorted(done) == [0, 1]
    for index, model in enumerate([LLAMA, QWEN]):
        assert done[index]["model"] == model
        assert done[index]["num_tokens"] == 6
        assert 0 < done[index]["ttft_ms"] <= done[index]["e2e_ms"]
        tokens = [item for item in items if item["type"] == "token" and item["index"] == index]
        assert "".join(item["text"] for item in tokens) == done[index]["text"]

    too_many = client.post("/v1/molten/compare", json={**body, "stream": False, "models": [LLAMA] * 5})
    assert too_many.status_code == 400


async def collect(generator) -> list:
    return [item async for item in generator]


def test_models_tab_against_server(client, manager_settings):
    import asyncio

    from molten.deployments.app import ingress_handle
    from molten.ui.models_tab import ModelsController

    load(client, QWEN, mode="disaggregated")
    controller = ModelsController(lambda: ingress_handle(manager_settings))

    models, cold_starts, memory_text, _, _ = asyncio.run(controller.refresh())
    assert set(models["model"]) >= {LLAMA, QWEN}
    assert (models[models["model"] == LLAMA]["total MiB"] > 0).all()
    assert len(cold_starts) >= 2
    assert "Memory:" in memory_text

    assert "Choose a model" in asyncio.run(controller.act("load", "", "fp32", "colocated", ""))
    failed_unload = asyncio.run(controller.act("unload", "no-such-model", "fp32", "colocated", ""))
    assert "unload failed" in failed_unload

    updates = asyncio.run(collect(controller.compare([LLAMA, QWEN], "Hi", 4)))
    *boxes, timings = updates[-1]
    assert list(timings["model"]) == [LLAMA, QWEN]
    assert all(1 <= tokens <= 4 for tokens in timings["tokens"])
    assert (timings["TTFT ms"] > 0).all()


def test_budget_evicts_idle_then_rejects(client):
    load(client, QWEN, mode="disaggregated")
    status = client.get("/v1/molten/models").json()
    used = status["memory"]["used_bytes"]
    llama_bytes = next(r for r in status["models"] if r["model_id"] == LLAMA)["memory"]["total_bytes"]
    try:
        # Room for what is loaded now and a quarter of the llama model: a second copy of it fits
        # only once the first (idle, least recently used) is unloaded.
        budget_mib = int((used + llama_bytes / 4) / 2**20)
        assert client.put("/v1/molten/models/budget", json={"memory_budget_mib": budget_mib}).status_code == 200
        completion(client, QWEN)  # QWEN is now the most recently used, so LLAMA is evicted first
        # `tiny-random-llama:fp32` is a new model id of the same size as LLAMA, so it does not fit.
        response = client.post(
            "/v1/molten/models/load", json={"model": LLAMA, "mode": "colocated", "precision": "fp32", "wait": True}
        )
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "ready"
        assert record_of(client, LLAMA)["state"] == "unloaded"

        too_small = client.put("/v1/molten/models/budget", json={"memory_budget_mib": 1})
        assert too_small.status_code == 200
        rejected = client.post("/v1/molten/models/load", json={"model": LLAMA, "mode": "colocated", "wait": True})
        assert rejected.status_code == 507
        message = rejected.json()["error"]["message"]
        assert f"needs about {llama_bytes / 2**20:.0f} MiB" in message
        assert "free" in message
        # A load that cannot fit even after evicting every idle model unloads nothing.
        assert record_of(client, QWEN)["state"] == "ready"
        assert record_of(client, LLAMA_FP32)["state"] == "ready"
    finally:
        client.put("/v1/molten/models/budget", json={"memory_budget_mib": None})
    load(client, LLAMA, mode="colocated")
    unload(client, LLAMA_FP32)


def stream_completion(base_url: str, model: str, started: concurrent.futures.Future | None = None) -> dict:
    """Stream one completion; return its HTTP status, chunk count, finish reason, error chunks and [DONE]."""
    body = {
        "model": model,
        "prompt": "Count with me:",
        "max_tokens": SWAP_STREAM_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    result = {"num_chunks": 0, "finish_reason": None, "done": False, "errors": [], "status": None}
    with (
        httpx.Client(base_url=base_url, timeout=600) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        result["status"] = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                result["done"] = True
                continue
            chunk = json.loads(payload)
            if "error" in chunk:
                result["errors"].append(chunk["error"])
                continue
            result["num_chunks"] += 1
            if started is not None and not started.done():
                started.set_result(True)
            result["finish_reason"] = chunk["choices"][0]["finish_reason"] or result["finish_reason"]
    return result


def test_swap_under_load_loses_nothing(client, manager_url):
    load(client, QWEN, mode="disaggregated")
    first_chunks = [concurrent.futures.Future() for _ in range(NUM_SWAP_STREAMS)]
    with concurrent.futures.ThreadPoolExecutor(NUM_SWAP_STREAMS) as pool:
        streams = [pool.submit(stream_completion, manager_url, QWEN, started) for started in first_chunks]
        concurrent.futures.wait(first_chunks, timeout=300)
        assert all(started.done() for started in first_chunks), "not every stream started before the swap"
        # No mode given: the new model keeps the old one's (disaggregated), not the server's (colocated).
        swap = client.post("/v1/molten/models/swap", json={"old": QWEN, "new": LLAMA_FP32})
        results = [stream.result(timeout=600) for stream in streams]

    assert swap.status_code == 200, swap.text
    outcome = swap.json()
    assert outcome["new"]["state"] == "ready"
    assert outcome["new"]["mode"] == "disaggregated"
    assert outcome["old"]["state"] == "unloaded"
    failed = [r for r in results if r["status"] != 200 or r["errors"] or not r["done"]]
    truncated = [r for r in results if r["finish_reason"] != "length"]
    assert failed == []
    assert truncated == []
    assert all(r["num_chunks"] >= SWAP_STREAM_TOKENS for r in results)
    assert completion(client, QWEN).status_code == 404
    after = completion(client, LLAMA_FP32)
    assert after.status_code == 200, after.text
    assert after.json()["model"] == LLAMA_FP32
    print(f"swap with {NUM_SWAP_STREAMS} streams running took {outcome['swap_seconds']:.2f} s")


def test_swap_time_vs_cold_load(client):
    """Swap an idle model for QWEN, and compare with QWEN's cold load alone (printed for the record)."""
    if record_of(client, LLAMA_FP32)["state"] != "ready":
        load(client, LLAMA_FP32)
    cold = load(client, QWEN, mode="colocated")["cold_start_seconds"]
    unload(client, QWEN)
    swap = client.post("/v1/molten/models/swap", json={"old": LLAMA_FP32, "new": QWEN, "mode": "colocated"})
    assert swap.status_code == 200, swap.text
    outcome = swap.json()
    assert outcome["sequential"] is False
    assert outcome["new"]["state"] == "ready"
    assert outcome["old"]["state"] == "unloaded"
    ratio = outcome["swap_seconds"] / cold
    print(
        f"cold load of {QWEN}: {cold:.2f} s; swap {LLAMA_FP32} -> {QWEN}: {outcome['swap_seconds']:.2f} s; "
        f"ratio {ratio:.2f}"
    )
    # The target is 1.2; the bound here is loose because the shared test machine's load varies.
    assert ratio < 2.0

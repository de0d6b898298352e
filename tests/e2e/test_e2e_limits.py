"""Overload and cancellation against a real server with deliberately small limits (tiny model)."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import replace

import httpx
import pytest

from molten.config import SchedulerConfig
from tests.e2e.conftest import wait_healthy

pytestmark = pytest.mark.slow

TINY = "tiny-random-llama"


@pytest.fixture(scope="module")
def limits_url(serve_session) -> str:
    from molten.deployments.app import run_app

    settings = replace(
        serve_session,
        model=TINY,
        mode="disaggregated",
        app_name="molten-limits",
        route_prefix="/limits",
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_waiting=1, max_num_batched_tokens=2048),
    )
    run_app(settings)
    url = f"http://127.0.0.1:{settings.http_port}/limits"
    wait_healthy(url)
    return url


def free_blocks(client: httpx.Client) -> list[int]:
    return [worker["num_free_blocks"] for worker in client.get("/v1/molten/kv").json()["workers"]]


def test_full_queue_gets_429_with_retry_after(limits_url):
    # Long prompts keep the single prefill slot busy while the others arrive.
    body = {"model": TINY, "prompt": [28] * 1500, "max_tokens": 4, "temperature": 0}

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=limits_url, timeout=120) as client:
            return client.post("/v1/completions", json=body)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(send, range(8)))

    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, [r.text[:200] for r in responses]
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, statuses
    assert 200 in statuses
    for response in rejected:
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["type"] == "rate_limit_error"

    with httpx.Client(base_url=limits_url, timeout=120) as client:
        assert client.post("/v1/completions", json=body).status_code == 200


def test_many_disconnects_return_every_block(limits_url):
    body = {"model": TINY, "prompt": "Tell me a long story", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=limits_url, timeout=60) as client:
        before = free_blocks(client)
        for index in range(12):
            with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                # Close after the first chunk (prefill), or after a few decode chunks.
                for count, _ in enumerate(response.iter_bytes()):
                    if count >= index % 3:
                        break
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and free_blocks(client) != before:
            time.sleep(0.2)
        assert free_blocks(client) == before
        state = client.get("/v1/molten/kv").json()
        for worker in state["workers"]:
            assert worker["sequences"] == [], worker

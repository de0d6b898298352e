"""Ten load, generate, unload cycles return Molten's process memory to its level after the first unload.

What is measured: after each unload the manager snapshots the RSS of the processes that
outlive a model, which are the manager and the ingress. A model's worker processes exit with it.
The test checks that every later level is within 5% of the level after the first unload,
and that each cycle's worker process is gone, so its memory went back to the system.

NOTE: in runs so far the manager and the ingress each still grew by about 1 MiB per cycle
(about 1.4% over ten cycles, within the bound). Which objects grow is not known yet.
"""

from __future__ import annotations

import time
from dataclasses import replace

import httpx
import psutil
import pytest

from molten.config import CacheConfig
from tests.e2e.conftest import wait_healthy

pytestmark = pytest.mark.slow

LLAMA = "tiny-random-llama"
NUM_CYCLES = 10
TOLERANCE = 0.05
WORKER_EXIT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def cycles_url(serve_session) -> str:
    from molten.deployments.app import run_app

    settings = replace(
        serve_session,
        model=LLAMA,
        mode="colocated",
        worker_num_threads=1,
        app_name="molten-cycles",
        route_prefix="/cycles",
        cache=CacheConfig(kv_cache_memory_mib=16),
    )
    run_app(settings)
    url = f"http://127.0.0.1:{settings.http_port}/cycles"
    wait_healthy(url)
    return url


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not psutil.pid_exists(pid)


def test_ten_cycles_return_memory(cycles_url):
    levels = []
    per_process = []
    with httpx.Client(base_url=cycles_url, timeout=300) as client:
        for cycle in range(NUM_CYCLES):
            if cycle > 0:
                loaded = client.post("/v1/molten/models/load", json={"model": LLAMA, "wait": True})
                assert loaded.status_code == 200, loaded.text
                assert loaded.json()["state"] == "ready"
            body = {"model": LLAMA, "prompt": "One more time", "max_tokens": 8, "ignore_eos": True}
            generated = client.post("/v1/completions", json=body)
            assert generated.status_code == 200, generated.text
            assert generated.json()["usage"]["completion_tokens"] == 8

            record = client.get(f"/v1/molten/models/{LLAMA}").json()
            worker_pids = [worker["pid"] for worker in record["workers"]]
            unloaded = client.post("/v1/molten/models/unload", json={"model": LLAMA})
            assert unloaded.status_code == 200, unloaded.text
            after = unloaded.json()
            assert after["state"] == "unloaded"
            for pid in worker_pids:
                assert wait_gone(pid, WORKER_EXIT_TIMEOUT_S), (
                    f"worker pid {pid} still runs after unload (cycle {cycle})"
                )
            levels.append(after["memory_after_unload"]["molten_rss_bytes"])
            per_process.append(after["memory_after_unload"]["process_rss_bytes"])

        status = client.get("/v1/molten/models").json()
        assert len([entry for entry in status["cold_starts"] if entry["model_id"] == LLAMA]) == NUM_CYCLES

    baseline = levels[0]
    print("RSS of manager + ingress after each unload (MiB):", [round(level / 2**20, 1) for level in levels])
    for pid in per_process[0]:
        role = "manager" if int(pid) == status["manager_pid"] else "ingress"
        print(f"  {role} (pid {pid}):", [round(sizes.get(pid, 0) / 2**20, 1) for sizes in per_process])
    assert baseline > 0
    for cycle, level in enumerate(levels[1:], start=2):
        assert abs(level - baseline) <= TOLERANCE * baseline, (
            f"cycle {cycle}: {level / 2**20:.1f} MiB vs {baseline / 2**20:.1f} MiB after the first unload"
        )

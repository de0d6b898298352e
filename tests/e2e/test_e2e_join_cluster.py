"""`molten serve --address auto` deploys onto a Ray cluster it did not start, and leaves it running.

The "existing cluster" is a local Ray instance owned by a separate Python process, so the
test never runs `ray start` or `ray stop` (which would touch other Ray instances of the
same user). `--address auto` finds it through RAY_ADDRESS, as `ray.init` documents.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import wait_healthy

pytestmark = pytest.mark.slow

CLUSTER_OWNER = textwrap.dedent(
    """
    import sys, time, ray
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(context.address_info["gcs_address"], flush=True)
    for line in sys.stdin:  # stay up until the test closes stdin
        pass
    ray.shutdown()
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_is_alive(address: str) -> bool:
    probe = f"import ray; ray.init(address={address!r}, log_to_driver=False); print(len(ray.nodes()))"
    # A joining process sends the cluster's auth token only in token mode.
    env = os.environ | {"RAY_AUTH_MODE": "token"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    return result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "1"


def test_serve_joins_existing_cluster(tmp_path: Path):
    owner = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_OWNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    server = None
    try:
        address = owner.stdout.readline().strip()
        assert address, "the cluster owner printed no address"
        port = free_port()
        env = os.environ | {"RAY_ADDRESS": address}
        log = (tmp_path / "serve.log").open("w")
        molten = Path(sys.executable).parent / "molten"
        server = subprocess.Popen(
            [str(molten), "serve", "--address", "auto", "--model", "tiny-random-llama", "--mode", "colocated",
             "--port", str(port), "--ui-port", "0", "--dashboard-port", str(free_port())],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout_s=300)

        response = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny-random-llama", "prompt": "hello", "max_tokens": 4},
            timeout=60,
        )
        assert response.status_code == 200, response.text

        # Signal only once start-up has finished and the stop handler is installed.
        log_path = tmp_path / "serve.log"
        deadline = time.monotonic() + 120
        while "to stop" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-2000:]
        assert cluster_is_alive(address)
    finally:
        if server is not None and server.poll() is None:
            server.kill()
        owner.stdin.close()
        try:
            owner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            owner.kill()
        time.sleep(1)

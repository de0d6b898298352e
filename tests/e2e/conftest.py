"""One Ray Serve instance per test session, serving the bundled model in both modes.

The disaggregated application is served at `/`, the co-located one at `/colocated`, on a
free loopback port. Every request in these tests goes to 127.0.0.1.
"""

from __future__ import annotations

import time

import httpx
import pytest

BUNDLED_MODEL = "smollm2-135m-instruct"


def wait_healthy(base_url: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    last_error = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/health", timeout=10)
            if response.status_code == 200:
                return
            last_error = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as exc:
            last_error = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"{base_url} not healthy after {timeout_s}s: {last_error}")


@pytest.fixture(scope="session")
def serve_instance(serve_session):
    from dataclasses import replace

    # A 2048-token window keeps the context-edge cases (a full-window prefill) fast on a CPU.
    return replace(serve_session, model=BUNDLED_MODEL, max_model_len=2048)


@pytest.fixture(scope="session")
def disagg_url(serve_instance) -> str:
    from dataclasses import replace

    from molten.deployments.app import run_app

    settings = replace(serve_instance, mode="disaggregated", app_name="molten", route_prefix="/")
    run_app(settings)
    url = f"http://127.0.0.1:{settings.http_port}"
    wait_healthy(url)
    return url


@pytest.fixture(scope="session")
def colocated_url(serve_instance, disagg_url) -> str:
    from dataclasses import replace

    from molten.deployments.app import run_app

    settings = replace(serve_instance, mode="colocated", app_name="molten-colocated", route_prefix="/colocated")
    run_app(settings)
    url = f"http://127.0.0.1:{settings.http_port}/colocated"
    wait_healthy(url)
    return url


@pytest.fixture(scope="session")
def client(disagg_url):
    with httpx.Client(base_url=disagg_url, timeout=120) as http:
        yield http


@pytest.fixture(scope="session")
def bundled_hf():
    """The bundled model in transformers with its tokenizer, for reference `generate()` runs."""
    from molten.models import load_model

    return load_model(BUNDLED_MODEL)

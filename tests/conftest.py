"""Settings and fixtures shared by every test directory."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub: with this set, a hub id that is not cached fails at once
# with ModelNotFoundError instead of retrying the network. huggingface_hub reads the
# variable when it is first imported, which is after this file runs.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def bundled_model():
    """The bundled SmolLM2-135M-Instruct in float32, loaded once per test session.

    Mark tests that use it `@pytest.mark.slow`: the first load on a machine converts the
    GGUF file (about a minute), later loads read the cache (a few seconds).
    """
    from molten.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def serve_session():
    """Ray and Serve's HTTP proxy, started once per test session on free loopback ports.

    One process can hold only one Serve instance, so every test directory that needs a
    deployment deploys its application into this one, under its own `app_name` and
    `route_prefix` (see `molten.deployments.app.run_app`). Yields the base
    `ServeSettings` (ports and host) to copy with `dataclasses.replace`.
    """
    import socket

    from molten.deployments.app import shutdown, start_serve
    from molten.deployments.settings import ServeSettings

    def free_port() -> int:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    # Small Ray CPU shares: every test module deploys its own application (ingress,
    # manager and one to four workers) into one Ray instance that advertises the
    # machine's real core count, and the manager rejects a load that does not fit.
    # With 0.02 per worker and 2 Ray CPUs, the whole session's workers fit at once.
    settings = ServeSettings(
        http_port=free_port(), dashboard_port=free_port(), ui_port=0, worker_num_cpus=0.02, ingress_num_cpus=0.02
    )
    start_serve(settings)
    try:
        yield settings
    finally:
        shutdown()

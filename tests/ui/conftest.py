"""A real Molten Serve application (tiny-random-llama, disaggregated) shared by the playground's slow tests."""

from __future__ import annotations

import socket

import pytest


def unused_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def serve_app():
    """Start Ray and Serve once per session on loopback ports; yield (settings, ingress handle).

    Starting takes about two minutes on a 2-core machine. Ray is shut down afterwards.
    """
    from molten.deployments.app import ingress_handle, run_app, shutdown
    from molten.deployments.settings import ServeSettings

    settings = ServeSettings(
        model="tiny-random-llama",
        mode="disaggregated",
        http_port=unused_loopback_port(),
        ui_port=0,
        dashboard_port=unused_loopback_port(),
    )
    try:
        run_app(settings)
        yield settings, ingress_handle(settings)
    finally:
        shutdown()

"""A real Molten Serve application (tiny-random-llama, disaggregated) shared by the playground's slow tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def serve_app(serve_session):
    """Deploy the tiny model (disaggregated) into the session's Serve; yield (settings, ingress handle)."""
    from dataclasses import replace

    from molten.deployments.app import ingress_handle, run_app

    settings = replace(
        serve_session, model="tiny-random-llama", mode="disaggregated", app_name="molten-ui", route_prefix="/ui-tests"
    )
    run_app(settings)
    yield settings, ingress_handle(settings)

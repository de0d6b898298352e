"""The manager's deploy stage against a stand-in for Serve's status: unscheduled, failed and slow workers."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from types import SimpleNamespace

import pytest
from ray import serve

from molten.deployments.manager import ModelManager, ModelRecord
from molten.deployments.settings import ManagerSettings, ServeSettings

APP = "molten:m:colocated"
UNSCHEDULED = (
    "Deployment 'molten:colocated:m' in application 'molten:m:colocated' has 1 replicas that have taken more "
    "than 30s to be scheduled. Resources required for each replica: {\"CPU\": 0.5}, total resources "
    "available: {\"CPU\": 0.19}. Use `ray status` for more details."
)
CONSTRUCTOR_FAILED = (
    "The deployment failed to start 3 times in a row.\nTraceback (most recent call last):\n"
    '  File "workers.py", line 1, in __init__\nValueError: unknown model \'m\'\n'
)


def serve_status(state: str, message: str) -> SimpleNamespace:
    app = SimpleNamespace(
        status=SimpleNamespace(value=state), message="", deployments={"d": SimpleNamespace(message=message)}
    )
    return SimpleNamespace(applications={APP: app})


def deploy(monkeypatch, state: str, message: str, load_timeout_s: float = 600.0) -> list[str]:
    """Run the manager's deploy stage while Serve reports `state` and `message`; return the progress notes."""
    settings = replace(ServeSettings(), manager=ManagerSettings(load_timeout_s=load_timeout_s))
    manager = ModelManager.func_or_class(settings)
    record = ModelRecord(model_id="m", spec="m", mode="colocated", app_names={"colocated": APP})
    monkeypatch.setattr(serve, "RunTarget", lambda **fields: fields)
    monkeypatch.setattr(serve, "run_many", lambda targets, **options: [])
    monkeypatch.setattr(serve, "status", lambda: serve_status(state, message))
    notes = []
    asyncio.run(manager._deploy(record, {"colocated": None}, lambda stage, text: notes.append(text)))
    return notes


def test_deploy_unscheduled_worker_fails(monkeypatch):
    with pytest.raises(RuntimeError, match="could not place the colocated worker") as failure:
        deploy(monkeypatch, "DEPLOYING", UNSCHEDULED)
    assert '{"CPU": 0.19}' in str(failure.value)
    assert "lower `molten serve --worker-cpus`" in str(failure.value)


def test_deploy_failed_worker_names_exception(monkeypatch):
    with pytest.raises(RuntimeError, match="the colocated worker failed to start: ValueError: unknown model 'm'"):
        deploy(monkeypatch, "DEPLOY_FAILED", CONSTRUCTOR_FAILED)


def test_deploy_times_out_with_status(monkeypatch):
    with pytest.raises(TimeoutError, match=r"not running after 0.3 s \(load_timeout_s\): colocated deploying"):
        deploy(monkeypatch, "DEPLOYING", "", load_timeout_s=0.3)


def test_deploy_running_returns(monkeypatch):
    assert deploy(monkeypatch, "RUNNING", "") == []

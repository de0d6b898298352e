"""The memory ledger without Ray: one worker's split, the manager's estimates and how the CLI and UI show them."""

from __future__ import annotations

import psutil
import pytest
import torch

from molten.config import CacheConfig, EngineConfig
from molten.deployments.manager import (
    ModelRecord,
    _split_precision,
    model_spec_with_precision,
)
from molten.deployments.workers import measure_worker_memory
from molten.engine.llm_engine import LLMEngine

KV_POOL_MIB = 4


@pytest.fixture(scope="module")
def tiny_engine():
    from molten.models import load_model

    torch.set_num_threads(1)
    config = EngineConfig(model="tiny-random-llama", cache=CacheConfig(kv_cache_memory_mib=KV_POOL_MIB))
    return LLMEngine(config, load_model("tiny-random-llama"))


def test_worker_ledger_splits_memory(tiny_engine):
    before = psutil.Process().memory_info().rss
    ledger = measure_worker_memory(tiny_engine, before, "colocated")
    parameter_bytes = sum(p.numel() * p.element_size() for p in tiny_engine.model.parameters())
    assert ledger["weight_bytes"] >= parameter_bytes
    assert ledger["kv_pool_bytes"] == tiny_engine.kv_cache.num_bytes
    assert ledger["kv_pool_bytes"] <= KV_POOL_MIB * 2**20
    assert ledger["device"] == "cpu"
    assert ledger["total_bytes"] == ledger["rss_bytes"]
    assert ledger["other_bytes"] == ledger["total_bytes"] - ledger["weight_bytes"] - ledger["kv_pool_bytes"]
    assert ledger["torch_allocated_bytes"] == ledger["weight_bytes"] + ledger["kv_pool_bytes"]
    assert ledger["gpu_process_bytes"] is None
    assert ledger["rss_before_load_bytes"] == before


@pytest.mark.parametrize(
    ("model", "precision", "expected"),
    [
        ("tiny-random-llama", None, "tiny-random-llama"),
        ("tiny-random-llama", "int8", "tiny-random-llama:int8"),
        ("tiny-random-llama:int8", "int8", "tiny-random-llama:int8"),
        ("/models/my-model", "bf16", "/models/my-model:bf16"),
    ],
)
def test_precision_joins_model_spec(model, precision, expected):
    assert model_spec_with_precision(model, precision) == expected


def test_precision_rejects_conflicts():
    with pytest.raises(ValueError, match="fp7"):
        model_spec_with_precision("tiny-random-llama", "fp7")
    with pytest.raises(ValueError, match="contradicts"):
        model_spec_with_precision("tiny-random-llama:int4", "int8")


def test_split_precision_defaults_to_fp32():
    assert _split_precision("tiny-random-llama:int4") == ("tiny-random-llama", "int4")
    assert _split_precision("tiny-random-llama") == ("tiny-random-llama", "fp32")
    assert _split_precision("C:weights") == ("C:weights", "fp32")


def ledger(weight: int, kv: int, total: int) -> dict:
    return {
        "weight_bytes": weight,
        "kv_pool_bytes": kv,
        "other_bytes": total - weight - kv,
        "total_bytes": total,
        "pid": 1,
    }


def test_record_sums_worker_ledgers():
    record = ModelRecord(model_id="m", spec="m", mode="disaggregated", estimated_bytes=123)
    assert record.total_bytes == 123
    record.workers = [ledger(10, 20, 100), ledger(10, 20, 150)]
    data = record.to_dict()
    assert data["memory"] == {
        "weight_bytes": 20,
        "kv_pool_bytes": 40,
        "other_bytes": 190,
        "total_bytes": 250,
        "num_workers": 2,
        "estimated": False,
        "released_bytes": 0,
    }
    assert data["state"] == "loading"


def test_unloaded_record_shows_memory_released():
    record = ModelRecord(model_id="m", spec="m", mode="disaggregated", state="unloaded")
    record.workers = [ledger(10, 20, 100), ledger(10, 20, 150)]
    memory = record.to_dict()["memory"]
    assert memory["total_bytes"] == 0
    assert memory["weight_bytes"] == 0
    assert memory["released_bytes"] == 250


def test_budget_counts_only_loaded_models():
    from molten.deployments.manager import ModelManager
    from molten.deployments.settings import ManagerSettings, ServeSettings

    manager = ModelManager.func_or_class(ServeSettings(manager=ManagerSettings(memory_budget_mib=100)))
    ready = ModelRecord(model_id="a", spec="a", mode="colocated", state="ready")
    ready.workers = [ledger(2**20, 2**20, 10 * 2**20)]
    loading = ModelRecord(model_id="b", spec="b", mode="colocated", estimated_bytes=30 * 2**20)
    unloaded = ModelRecord(model_id="c", spec="c", mode="colocated", state="unloaded")
    unloaded.workers = [ledger(2**20, 2**20, 50 * 2**20)]
    manager.records = {record.model_id: record for record in (ready, loading, unloaded)}
    view = manager._budget_view()
    assert view["used_bytes"] == 10 * 2**20
    assert view["loading_estimate_bytes"] == 30 * 2**20
    assert view["free_bytes"] == 60 * 2**20


def sample_status() -> dict:
    record = ModelRecord(
        model_id="m", spec="m", mode="colocated", state="ready", cold_start_seconds=1.5, load_seconds=1.0
    )
    record.workers = [ledger(2**20, 2 * 2**20, 10 * 2**20)]
    record.progress = [{"stage": "ready", "message": "ready", "elapsed_s": 1.5}]
    failed = ModelRecord(model_id="bad", spec="bad", mode="colocated", state="failed", error="no such model")
    return {
        "models": [record.to_dict(), failed.to_dict()],
        "aliases": {"chat": {"m": 1.0}},
        "memory": {"budget_bytes": 64 * 2**20, "used_bytes": 10 * 2**20, "free_bytes": 54 * 2**20},
        "system": {
            "molten_rss_bytes": 300 * 2**20,
            "system_used_bytes": 2**30,
            "system_total_bytes": 2**32,
            "gpu": None,
        },
        "cold_starts": [
            {
                "model_id": "m",
                "mode": "colocated",
                "load_seconds": 1.0,
                "cold_start_seconds": 1.5,
                "total_bytes": 10 * 2**20,
                "swap_of": None,
            }
        ],
    }


def test_cli_status_shows_ledger():
    from molten.cli_models import format_status

    text = format_status(sample_status())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "STATE", "MODE"]
    for cell in ("1.0 MiB", "2.0 MiB", "10.0 MiB", "1.50 s"):
        assert cell in lines[1]
    assert "bad failed: no such model" in text
    assert "alias chat -> m (weight 1)" in text
    assert "10.0 MiB used by ready models of a 64.0 MiB budget (54.0 MiB free)" in text
    assert "WORKERS" in lines[0]


def test_models_tab_frames_show_ledger():
    from molten.ui.models_tab import cold_starts_frame, memory_markdown, models_frame, ready_model_ids

    status = sample_status()
    frame = models_frame(status)
    row = frame.iloc[0]
    assert (row["weights MiB"], row["KV pool MiB"], row["other MiB"], row["total MiB"]) == (1.0, 2.0, 7.0, 10.0)
    assert row["cold start s"] == 1.5
    assert frame.iloc[1]["progress"] == "failed: no such model"
    assert cold_starts_frame(status).iloc[0]["cold start s"] == 1.5
    text = memory_markdown(status)
    assert "54.0 MiB free" in text
    assert "No NVIDIA GPU found" in text
    assert ready_model_ids(status) == ["m"]


def test_compare_view_collects_timings():
    from molten.ui.models_tab import CompareView

    view = CompareView(["a", "b"])
    view.add({"type": "token", "index": 0, "text": "Hel"})
    view.add({"type": "token", "index": 0, "text": "lo"})
    view.add(
        {
            "type": "done",
            "index": 0,
            "ttft_ms": 5.0,
            "num_tokens": 2,
            "decode_tokens_per_s": 10.0,
            "e2e_ms": 9.0,
            "finish_reason": "length",
        }
    )
    view.add({"type": "error", "index": 1, "error": {"message": "model 'b' is not loaded"}})
    assert view.text_of(0) == "Hello"
    assert "not loaded" in view.text_of(1)
    frame = view.timings_frame()
    assert frame.iloc[0]["TTFT ms"] == 5.0
    assert frame.iloc[1]["finish"] == "error"


def test_cli_unload_prints_progress(monkeypatch, capsys):
    import argparse

    from molten import cli_models

    def record(state: str, in_flight: int) -> dict:
        return {"model_id": "m", "state": state, "in_flight": in_flight, "drain_seconds": 0.5}

    replies = iter([record("draining", 2), record("draining", 0), record("unloaded", 0)])
    requests = []

    def fake_request(args, method, path, body=None):
        requests.append((method, path, body))
        return next(replies)

    monkeypatch.setattr(cli_models, "_request", fake_request)
    monkeypatch.setattr(cli_models, "POLL_INTERVAL_S", 0.0)
    args = argparse.Namespace(model="m", url="http://127.0.0.1:1", timeout=10.0)
    assert cli_models.run_unload(args) == 0
    assert requests[0] == ("POST", "/v1/molten/models/unload", {"model": "m", "wait": False})
    captured = capsys.readouterr()
    assert "waiting for 2 running request(s) to finish" in captured.err
    assert "deleting the worker processes" in captured.err
    assert "m is unloaded (drained in 0.50 s)" in captured.out

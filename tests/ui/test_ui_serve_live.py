"""The live views' polling against a real Serve deployment of the tiny model (slow: starts Ray)."""

from __future__ import annotations

import asyncio
import re

import pytest
from matplotlib.figure import Figure

from molten.ui.chat import ChatParams, chat_turn
from molten.ui.live_views import LiveState, poll_live_state, render_live_outputs

pytestmark = pytest.mark.slow

MODEL = "tiny-random-llama"
LONG_REPLY = ChatParams(max_tokens=400, temperature=0.0)
TELEMETRY_WAIT_S = 3.0
"""Pause between two polls, longer than the telemetry sampling interval, so the second poll has new samples."""


async def poll_during_generation(handle) -> tuple[LiveState, str | None]:
    """Poll while a long reply streams, and return the state and the reply's request id."""
    state = LiveState()
    turn = chat_turn(handle, "Tell me a long story about caches.", [], LONG_REPLY, model=MODEL)
    request_id = None
    try:
        num_updates = 0
        async for update in turn:
            request_id = update.request_id
            num_updates += 1
            if num_updates == 5:
                await poll_live_state(handle, state)
                break
    finally:
        await turn.aclose()
    return state, request_id


def test_kv_view_sees_running_sequence(serve_app):
    _, handle = serve_app
    state, request_id = asyncio.run(poll_during_generation(handle))
    assert "kv" not in state.errors, state.errors
    workers = {worker["role"]: worker for worker in state.kv["workers"]}
    assert set(workers) == {"prefill", "decode"}
    decode = workers["decode"]
    running = [sequence for sequence in decode["sequences"] if sequence["request_id"].startswith(request_id)]
    assert running, f"the decode worker should list {request_id} while it generates"
    assert len(running[0]["block_table"]) >= 1
    assert decode["num_free_blocks"] < decode["num_blocks"]
    html = render_live_outputs(state).kv_html
    assert request_id in html
    in_use = re.search(r"decode worker</b>: (\d+) of \d+ blocks in use", html)
    assert in_use is not None, "the KV view summarizes the decode worker's pool"
    assert int(in_use.group(1)) >= 1, "mid-reply, the rendered map shows the decode worker's blocks in use"


def test_kv_cached_prefix_after_reply(serve_app):
    _, handle = serve_app

    async def reply_then_poll() -> LiveState:
        prompt = "Explain, in a few words, what a paged KV cache stores for every token of a prompt."
        async for _ in chat_turn(handle, prompt, [], ChatParams(max_tokens=4, temperature=0.0), model=MODEL):
            pass
        return await poll_live_state(handle, LiveState())

    state = asyncio.run(reply_then_poll())
    assert "kv" not in state.errors, state.errors
    decode = next(worker for worker in state.kv["workers"] if worker["role"] == "decode")
    assert decode["num_cached_free_blocks"] >= 1, "the finished reply's full blocks stay as cached prefix KV"
    html = render_live_outputs(state).kv_html
    assert "free, still holds cached prefix KV" in html, "the legend names the cached blocks"


def test_poll_reads_telemetry_and_steps(serve_app):
    _, handle = serve_app
    state = LiveState()
    asyncio.run(poll_live_state(handle, state))
    assert state.errors == {}, state.errors

    async def reply_then_wait():
        async for _ in chat_turn(handle, "Hello", [], ChatParams(max_tokens=8, temperature=0.0), model=MODEL):
            pass
        await asyncio.sleep(TELEMETRY_WAIT_S)

    asyncio.run(reply_then_wait())
    newest_before = state.last_sample_time()
    asyncio.run(poll_live_state(handle, state))
    assert state.errors == {}, state.errors
    assert set(state.steps_by_worker) == {"prefill", "decode"}
    prefill_steps = state.steps_by_worker["prefill"]
    decode_steps = state.steps_by_worker["decode"]
    assert any(step["num_prefill_tokens"] > 0 for step in prefill_steps)
    assert any(step["num_decode_tokens"] > 0 for step in decode_steps)
    assert state.telemetry_source in ("nvml", "cpu"), state.telemetry_notice
    assert newest_before is not None, "the telemetry actor had samples at the first poll"
    assert state.last_sample_time() > newest_before, "the second poll brings newer telemetry samples"

    outputs = render_live_outputs(state, force_roofline=True)
    assert len(outputs.utilization) > 0
    assert len(outputs.system_memory) > 0
    assert "decode:tiny-random-llama" in set(outputs.process_memory["series"]), "worker RSS lines are named role:model"
    assert len(outputs.trace) > 0
    assert isinstance(outputs.roofline, Figure)

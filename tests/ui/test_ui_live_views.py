"""Data of the playground's live views (token timeline, telemetry, KV cache, scheduler trace, roofline), from hand-made replies."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest
from matplotlib.figure import Figure

from molten.engine.events import TokenEvent
from molten.ui import live_views
from molten.ui.app import format_dashboard_markdown
from molten.ui.kv_view import (
    CACHED_COLOR,
    FREE_COLOR,
    MAX_POOL_CELLS,
    SHARED_COLOR,
    build_block_map,
    pool_cells,
    render_kv_html,
    sequence_colors,
)
from molten.ui.live_views import LiveState, poll_live_state, render_live_outputs, status_markdown
from molten.ui.stats import ReplyStats
from molten.ui.telemetry_view import format_latest_sample_markdown, telemetry_frames
from molten.ui.timeline_view import token_timeline_frame, visible_text
from molten.ui.trace_view import (
    clock_time,
    describe_step,
    roofline_figure,
    roofline_summary_markdown,
    step_intensity,
    steps_table,
    trace_frame,
)

NOW = 1_000_000.0
PEAKS = {"bandwidth_bytes_per_s": 25e9, "flops_per_s": 150e9, "source": "measured"}


def token_event(index: int, time_ms: float, batch_size: int, origin: str, text: str = "x") -> TokenEvent:
    return TokenEvent(
        request_id="chat-1", seq_index=0, token_id=index, text=text, logprob=None, top_logprobs=None,
        time_since_arrival_ms=time_ms, step_id=10 + index, batch_size=batch_size, origin=origin, index=index,
    )


def cpu_sample(time: float, utilization: float | None = 40.0, **cpu_fields) -> dict:
    cpu = {
        "utilization_pct": utilization,
        "system_memory_used_bytes": 8 * 1024**3,
        "system_memory_total_bytes": 32 * 1024**3,
        "torch_allocated_bytes": None,
        "actors": [{"name": "molten:decode:m", "pid": 11, "rss_bytes": 1024**3}],
        "errors": {"torch_allocated_bytes": "torch is not imported in the telemetry actor"},
    }
    cpu.update(cpu_fields)
    return {"time": time, "gpus": [], "cpu": cpu}


def gpu_sample(time: float) -> dict:
    sample = cpu_sample(time)
    sample["gpus"] = [{
        "index": 0, "name": "NVIDIA H200", "memory_used_bytes": 2 * 1024**3, "memory_total_bytes": 140 * 1024**3,
        "processes": [{"pid": 11, "used_bytes": 1024**3}], "utilization_gpu_pct": 75.0, "utilization_memory_pct": None,
        "sm_clock_mhz": 1980, "memory_clock_mhz": 2619, "power_w": 310.5, "temperature_c": 41,
        "pcie_rx_bytes_per_s": 3e6, "pcie_tx_bytes_per_s": 1e6, "errors": {"utilization_memory_pct": "not supported"},
    }]
    return sample


def make_step(step_id: int, time: float, *, prefill: int = 0, decode: int = 0, preempted: int = 0,
              duration_ms: float = 20.0) -> dict:
    flops = 2 * 100e6 * (prefill + decode)
    weight_bytes = 400e6
    return {
        "step_id": step_id, "time": time, "duration_ms": duration_ms, "batch_size": decode + (1 if prefill else 0),
        "num_prefill_tokens": prefill, "num_decode_tokens": decode, "num_preemptions": preempted,
        "prefill_chunks": [{"request_id": "chat-9", "num_tokens": prefill}] if prefill else [],
        "decode_request_ids": [f"chat-{i}" for i in range(decode)], "weight_bytes": weight_bytes,
        "kv_bytes_read": 1e6, "flops": flops,
        "achieved_bandwidth_bytes_per_s": (weight_bytes + 1e6) / (duration_ms / 1000),
        "achieved_flops_per_s": flops / (duration_ms / 1000),
    }


def kv_worker(role: str = "decode") -> dict:
    return {
        "role": role, "num_blocks": 40, "num_free_blocks": 34, "num_cached_free_blocks": 3, "kv_block_size": 16,
        "prefix_cache_hit_rate": 0.5, "num_running": 2, "num_waiting": 1,
        "sequences": [
            {"request_id": "chat-<a>", "status": "running", "num_tokens": 70, "num_computed_tokens": 69,
             "block_table": [0, 1, 2, 3, 4]},
            {"request_id": "chat-b", "status": "running", "num_tokens": 40, "num_computed_tokens": 39,
             "block_table": [0, 1, 7]},
        ],
    }


# -- token timeline --------------------------------------------------------------------


def test_timeline_rows_and_colors():
    stats = ReplyStats()
    for index, (time_ms, batch, origin) in enumerate([(120.0, 1, "prefill"), (150.0, 1, "decode"), (190.0, 3, "decode")]):
        stats.add_event(token_event(index, time_ms, batch, origin, text=" a\n" if index == 2 else "a"))
    frame = token_timeline_frame(stats)
    assert frame["token"].tolist() == [0, 1, 2]
    assert frame["time_ms"].tolist() == [120.0, 150.0, 190.0]
    assert frame["origin_batch"].tolist() == ["prefill, batch 1", "decode, batch 1", "decode, batch 3"]
    assert frame["step_id"].tolist() == [10, 11, 12]
    assert frame["gap_ms"].tolist() == pytest.approx([120.0, 30.0, 40.0])
    assert frame["text"].tolist()[2] == "·a⏎"


def test_timeline_empty_keeps_numeric_axes():
    frame = token_timeline_frame(ReplyStats())
    assert len(frame) == 0
    assert str(frame["time_ms"].dtype) == "float64"
    assert str(frame["token"].dtype) == "int64"


def test_visible_text_marks_empty_delta():
    assert visible_text("") == "(no text yet)"
    assert visible_text("\t") == "⇥"


# -- telemetry --------------------------------------------------------------------------


def test_telemetry_frames_cpu_only():
    frames = telemetry_frames([cpu_sample(NOW - 2.0), cpu_sample(NOW - 1.0, utilization=None)])
    utilization = frames.utilization_pct
    assert utilization["time"].tolist() == [pd.Timestamp(NOW - 2.0, unit="s")], "a None reading is skipped, not drawn as 0"
    assert str(utilization["time"].dtype).startswith("datetime64")
    assert utilization["series"].tolist() == ["CPU (all cores)"]
    system = frames.system_memory_gib
    assert system["series"].tolist() == ["system RAM used", "system RAM used"]
    assert system["value"].tolist() == [8.0, 8.0]
    processes = frames.process_memory_gib
    assert set(processes["series"]) == {"decode:m"}, "per-process lines sit apart from the system total, as role:model"
    assert processes["value"].tolist() == [1.0, 1.0]
    assert len(frames.pcie_mb_per_s) == 0
    assert len(frames.power_w) == 0


def test_telemetry_frames_gpu_series():
    frames = telemetry_frames([gpu_sample(NOW)])
    assert set(frames.utilization_pct["series"]) == {"CPU (all cores)", "GPU 0 kernels running"}
    assert dict(zip(frames.system_memory_gib["series"], frames.system_memory_gib["value"])) == {
        "GPU 0 memory used": 2.0, "system RAM used": 8.0}
    processes = dict(zip(frames.process_memory_gib["series"], frames.process_memory_gib["value"]))
    assert processes == {"GPU 0 pid 11": 1.0, "decode:m": 1.0}
    assert dict(zip(frames.pcie_mb_per_s["series"], frames.pcie_mb_per_s["value"])) == {
        "GPU 0 PCIe receive": 3.0, "GPU 0 PCIe transmit": 1.0}
    assert frames.power_w["value"].tolist() == [310.5]


def test_latest_sample_table_names_errors():
    markdown = format_latest_sample_markdown(gpu_sample(NOW), "nvml", None)
    assert "Source: **nvml**" in markdown
    assert "GPU 0 (NVIDIA H200) memory | 2.0 GiB of 140.0 GiB (1%)" in markdown
    assert "310.5 W, 41 °C" in markdown
    assert "GPU 0 (NVIDIA H200) `utilization_memory_pct`: not supported" in markdown
    assert "CPU `torch_allocated_bytes`" in markdown


def test_latest_sample_shows_notice():
    notice = "No NVIDIA GPU found: showing CPU and memory"
    assert notice in format_latest_sample_markdown(cpu_sample(NOW), "cpu", notice)
    assert "No telemetry sample yet." in format_latest_sample_markdown(None, None, notice)


# -- KV cache ---------------------------------------------------------------------------


def test_block_map_finds_shared_blocks():
    block_map = build_block_map(kv_worker())
    assert block_map.shared_blocks == [0, 1]
    assert block_map.num_referenced_blocks == 6
    assert block_map.owners[7] == ["chat-b"]


def test_pool_cells_color_each_block():
    state = kv_worker()
    cells = pool_cells(build_block_map(state), sequence_colors(state))
    assert len(cells) == 40
    assert cells[0][0] == SHARED_COLOR
    assert "shared by chat-<a>, chat-b" in cells[0][1]
    assert cells[2][1] == "block 2: chat-<a>"
    assert cells[39][1] == "block 39: free"


def test_pool_cells_group_large_pool():
    state = {"num_blocks": MAX_POOL_CELLS * 3, "sequences": [{"request_id": "r", "block_table": [5]}]}
    cells = pool_cells(build_block_map(state), sequence_colors(state))
    assert len(cells) == MAX_POOL_CELLS
    assert cells[1][1] == "blocks 3–5 (1 in use): r"


def test_kv_html_escapes_and_summarizes():
    text = render_kv_html({"workers": [kv_worker()]})
    assert "chat-&lt;a&gt;" in text
    assert "chat-<a>" not in text
    assert "6 of 40 blocks in use (15.0%), 2 shared" in text
    assert "of which 3 still hold cached prefix KV" in text
    assert "prefix-cache hit rate 50%" in text
    assert "tokens 16–31" in text, "the tooltip of logical block 1 names its token positions"


def test_pool_cells_mark_cached_blocks():
    state = dict(kv_worker(), cached_free_block_ids=[8, 9, 0])
    cells = pool_cells(build_block_map(state), sequence_colors(state))
    assert cells[8] == (CACHED_COLOR, "block 8: free, holds cached prefix KV (reusable until evicted)")
    assert cells[10] == (FREE_COLOR, "block 10: free")
    assert cells[0][0] == SHARED_COLOR, "a block in use is drawn as in use, whatever the cached list says"
    grouped = {"num_blocks": MAX_POOL_CELLS * 2, "cached_free_block_ids": [3], "sequences": []}
    assert pool_cells(build_block_map(grouped), {})[1] == (
        CACHED_COLOR, "blocks 2–3 (0 in use, 1 holding cached prefix KV): free, holds cached prefix KV (reusable until evicted)")


def test_kv_legend_names_colors():
    text = render_kv_html({"workers": [dict(kv_worker(), cached_free_block_ids=[8])]})
    assert "free, empty" in text
    assert "free, still holds cached prefix KV (a matching prompt reuses it" in text
    assert "shared by several sequences" in text
    assert CACHED_COLOR in text
    assert FREE_COLOR in text
    legend = text.split("Live sequences (one color each")[1].split("</p>")[0]
    assert "<code>chat-&lt;a&gt;</code>" in legend
    assert "<code>chat-b</code>" in legend
    unlisted = render_kv_html({"workers": [kv_worker()]})
    assert "3 blocks; this engine does not list which" in unlisted, "without the ids the legend still gives the count"


def test_kv_html_without_data():
    assert "No KV cache state yet" in render_kv_html(None)
    assert "unavailable: boom" in render_kv_html(None, "boom")
    assert "No live sequences" in render_kv_html({"workers": [dict(kv_worker(), sequences=[])]})


# -- scheduler trace and roofline -------------------------------------------------------


def test_trace_frame_splits_prefill_and_decode():
    steps = {"colocated": [make_step(1, NOW - 1.0, prefill=32, decode=2), make_step(2, NOW - 0.5, preempted=1)]}
    frame = trace_frame(steps)
    assert frame["part"].tolist() == ["colocated: prefill tokens", "colocated: decode tokens", "colocated: prefill tokens"]
    assert frame["tokens"].tolist() == [32, 2, 0]
    assert frame["time"].tolist() == [pd.Timestamp(t, unit="s") for t in (NOW - 1.0, NOW - 1.0, NOW - 0.5)]
    assert frame["ran"].tolist()[2] == "1 preempted"


def test_describe_step_lists_work():
    text = describe_step(make_step(1, NOW, prefill=64, decode=3, preempted=2))
    assert text == "prefill chat-9: 64; decode 3 requests; 2 preempted"
    admitted = dict(make_step(2, NOW, prefill=8), admitted=[{"request_id": "chat-9", "queue_ms": 12.34}])
    assert describe_step(admitted) == "prefill chat-9: 8; admitted chat-9 after 12.3 ms in the queue"


def test_steps_table_newest_first():
    steps = {"prefill": [make_step(5, NOW - 3.0, prefill=10)],
             "decode": [make_step(7, NOW - 2.0, decode=1), make_step(8, NOW - 1.0, decode=2)]}
    steps["decode"][1].update(forward_ms=12.345, bandwidth_utilization=0.5, flop_utilization=None)
    table = steps_table(steps, limit=2)
    assert table["step"].tolist() == [8, 7]
    assert table["forward (ms)"].tolist()[0] == 12.35
    assert table["bandwidth utilization (%)"].tolist()[0] == 50.0
    assert table["FLOP utilization (%)"].tolist()[0] is None
    assert table["time"].tolist() == [clock_time(NOW - 1.0), clock_time(NOW - 2.0)]
    assert clock_time(NOW + 0.042).endswith(".042")
    assert table["decode batch (requests)"].tolist()[0] == "2: chat-0, chat-1"


def test_step_intensity_counts_weights_and_kv():
    intensity, achieved = step_intensity(make_step(1, NOW, decode=4))
    assert intensity == pytest.approx(2 * 100e6 * 4 / (400e6 + 1e6))
    assert achieved == pytest.approx(2 * 100e6 * 4 / 0.02)
    assert step_intensity(make_step(2, NOW)) is None, "a step without work has no point"


def test_roofline_draws_points_and_roof():
    steps = {"decode": [make_step(1, NOW, decode=4), make_step(2, NOW, decode=8)], "prefill": [make_step(3, NOW, prefill=64)]}
    figure = roofline_figure(steps, PEAKS)
    assert isinstance(figure, Figure)
    axes = figure.axes[0]
    assert axes.get_xscale() == "log"
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "decode worker, decode steps (2)" in labels
    assert "prefill worker, prefill steps (1)" in labels
    assert "roof: 25.0 GB/s, 150 GFLOP/s" in labels


def test_roofline_without_peaks_or_steps():
    axes = roofline_figure({}, None).axes[0]
    assert "not measured" in axes.get_title()
    assert axes.get_legend() is None


def test_roofline_summary_fractions():
    text = roofline_summary_markdown({"decode": [make_step(1, NOW, decode=1, duration_ms=40.0)]}, PEAKS)
    assert "**decode** step 1 (decode, batch 1)" in text
    assert "10.03 GB/s" in text
    assert "40% of peak bandwidth" in text
    assert "Peaks: 25.0 GB/s and 150 GFLOP/s, measured." in text
    assert "measured once, when the server started" in text, "the summary says where the peaks came from"
    assert "above the measured peak" not in text
    assert "Above 100% of a peak" not in text


def test_roofline_summary_above_peak():
    fast = make_step(1, NOW, prefill=64, duration_ms=1.0)
    assert fast["achieved_flops_per_s"] / PEAKS["flops_per_s"] > 1
    text = roofline_summary_markdown({"prefill": [fast]}, PEAKS)
    assert "% of peak FLOP/s (above the measured peak, see the note below)" in text
    assert "Above 100% of a peak" in text
    assert "Restart `molten serve` on an idle machine" in text

    # A table row above 100% (not the newest step) gets the note too.
    older = dict(make_step(1, NOW - 1, decode=1, duration_ms=40.0), bandwidth_utilization=1.32)
    text = roofline_summary_markdown({"decode": [older, make_step(2, NOW, decode=1, duration_ms=40.0)]}, PEAKS)
    assert "Above 100% of a peak" in text
    set_peaks = dict(PEAKS, source="setting")
    text = roofline_summary_markdown({"decode": [older]}, set_peaks)
    assert "measured once" not in text, "peaks from settings were not measured"
    assert "start-up" not in text
    assert "Raise `peak_bandwidth_bytes_per_s` or `peak_flops_per_s`" in text


# -- polling and the session's rolling window -------------------------------------------


class FakeResponse:
    def __init__(self, result=None, error: BaseException | None = None, delay_s: float = 0.0):
        self.result, self.error, self.delay_s = result, error, delay_s
        self.cancelled = False

    def __await__(self):
        return self._run().__await__()

    async def _run(self):
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self):
        self.cancelled = True


class FakeMethod:
    def __init__(self, make_response):
        self.make_response = make_response
        self.calls: list[dict] = []

    def remote(self, **kwargs):
        self.calls.append(kwargs)
        self.response = self.make_response()
        return self.response


class FakeIngress:
    def __init__(self, telemetry=None, steps=None, kv=None):
        self.telemetry = FakeMethod(telemetry or (lambda: FakeResponse({"source": "cpu", "notice": None, "samples": []})))
        self.steps = FakeMethod(steps or (lambda: FakeResponse({"peaks": PEAKS, "workers": {}})))
        self.kv_state = FakeMethod(kv or (lambda: FakeResponse({"workers": [kv_worker()]})))


def poll(handle, state: LiveState, now: float, timeout_s: float = 5.0) -> LiveState:
    return asyncio.run(poll_live_state(handle, state, now=now, timeout_s=timeout_s))


def test_poll_merges_new_samples_only():
    replies = iter([
        {"source": "cpu", "notice": "No NVIDIA GPU found", "samples": [cpu_sample(NOW - 1), cpu_sample(NOW)]},
        {"source": "cpu", "notice": "No NVIDIA GPU found", "samples": [cpu_sample(NOW), cpu_sample(NOW + 1)]},
    ])
    handle = FakeIngress(telemetry=lambda: FakeResponse(next(replies)))
    state = poll(handle, LiveState(), NOW)
    assert handle.telemetry.calls[0] == {"since": None}
    state = poll(handle, state, NOW + 1)
    assert handle.telemetry.calls[1] == {"since": NOW}
    assert [sample["time"] for sample in state.telemetry_samples] == [NOW - 1, NOW, NOW + 1]
    assert state.telemetry_notice == "No NVIDIA GPU found"
    assert state.num_polls == 2


def test_poll_drops_samples_outside_window():
    state = LiveState(telemetry_samples=[cpu_sample(NOW - live_views.TELEMETRY_WINDOW_S - 5)])
    state = poll(FakeIngress(), state, NOW)
    assert state.telemetry_samples == []


def test_poll_merges_steps_per_worker():
    replies = iter([
        {"peaks": PEAKS, "workers": {"prefill": [make_step(3, NOW - 1, prefill=8)],
                                     "decode": [make_step(1, NOW - 1, decode=1), make_step(2, NOW - 0.5, decode=1)]}},
        {"peaks": PEAKS, "workers": {"prefill": [make_step(3, NOW - 1, prefill=8), make_step(4, NOW, prefill=8)],
                                     "decode": [make_step(2, NOW - 0.5, decode=1), make_step(3, NOW, decode=1)]}},
    ])
    handle = FakeIngress(steps=lambda: FakeResponse(next(replies)))
    state = poll(handle, LiveState(), NOW)
    assert handle.steps.calls[0] == {"since_step": None}
    state = poll(handle, state, NOW + 0.1)
    assert handle.steps.calls[1] == {"since_step": 2}, "ask from the lowest newest step id over the workers"
    assert [step["step_id"] for step in state.steps_by_worker["prefill"]] == [3, 4]
    assert [step["step_id"] for step in state.steps_by_worker["decode"]] == [1, 2, 3]
    assert state.peaks == PEAKS


def test_poll_caps_steps_per_worker(monkeypatch):
    monkeypatch.setattr(live_views, "MAX_STEPS_PER_WORKER", 3)
    steps = [make_step(i, NOW, decode=1) for i in range(1, 6)]
    handle = FakeIngress(steps=lambda: FakeResponse({"peaks": PEAKS, "workers": {"decode": steps}}))
    state = poll(handle, LiveState(), NOW)
    assert [step["step_id"] for step in state.steps_by_worker["decode"]] == [3, 4, 5]


def test_failed_view_keeps_others_updating():
    handle = FakeIngress(telemetry=lambda: FakeResponse(error=AttributeError("no method 'telemetry'\ntraceback")))
    state = poll(handle, LiveState(), NOW)
    assert state.errors == {"telemetry": "AttributeError: no method 'telemetry'"}
    assert state.kv["workers"][0]["role"] == "decode"
    assert "⚠️ telemetry unavailable: AttributeError" in status_markdown(state)
    handle.telemetry.make_response = lambda: FakeResponse({"source": "cpu", "notice": None, "samples": []})
    state = poll(handle, state, NOW + 1)
    assert state.errors == {}, "a successful poll clears the view's error"


def test_slow_call_times_out_and_cancels():
    handle = FakeIngress(kv=lambda: FakeResponse({"workers": []}, delay_s=5.0))
    state = poll(handle, LiveState(), NOW, timeout_s=0.05)
    assert state.errors["kv"].startswith("TimeoutError")
    assert handle.kv_state.response.cancelled


def test_render_outputs_throttles_roofline():
    state = LiveState(poll_time=NOW, peaks=PEAKS, steps_by_worker={"decode": [make_step(1, NOW - 1, decode=1)]})
    first = render_live_outputs(state)
    assert isinstance(first.roofline, Figure)
    state.poll_time = NOW + 1
    state.steps_by_worker["decode"].append(make_step(2, NOW, decode=1))
    assert render_live_outputs(state).roofline is None, "redrawn at most every ROOFLINE_REDRAW_INTERVAL_S"
    state.poll_time = NOW + 1 + live_views.ROOFLINE_REDRAW_INTERVAL_S
    assert isinstance(render_live_outputs(state).roofline, Figure)
    state.poll_time += live_views.ROOFLINE_REDRAW_INTERVAL_S
    assert render_live_outputs(state).roofline is None, "no new step, no redraw"


def test_render_outputs_fill_every_view():
    state = LiveState(
        poll_time=NOW, num_polls=1, telemetry_samples=[cpu_sample(NOW - 1)], telemetry_source="cpu",
        kv={"workers": [kv_worker()]}, steps_by_worker={"decode": [make_step(1, NOW - 1, decode=2)]}, peaks=PEAKS,
    )
    outputs = render_live_outputs(state)
    assert len(outputs.utilization) == 1
    assert len(outputs.system_memory) == 1
    assert len(outputs.process_memory) == 1
    assert "6 of 40 blocks in use" in outputs.kv_html
    assert outputs.trace["tokens"].tolist() == [2]
    assert outputs.steps["step"].tolist() == [1]
    assert "1 telemetry samples" in outputs.status
    # The browser test waits for this time to advance: the count stops growing once the window is full.
    assert f"newest at {clock_time(NOW - 1)}" in outputs.status


def test_render_outputs_skip_unchanged_views():
    state = LiveState(
        poll_time=NOW, num_polls=1, telemetry_samples=[cpu_sample(NOW - 1)], telemetry_source="cpu",
        kv={"workers": [kv_worker()]}, steps_by_worker={"decode": [make_step(1, NOW - 1, decode=2)]}, peaks=PEAKS,
    )
    render_live_outputs(state)
    state.poll_time += 1
    state.num_polls += 1
    state.kv = {"workers": [kv_worker()]}
    unchanged = render_live_outputs(state)
    assert unchanged.status is not None, "the status line always shows the newest poll"
    for name in ("utilization", "system_memory", "process_memory", "pcie", "power", "latest_sample", "kv_html", "trace", "steps",
                 "roofline_summary"):
        assert getattr(unchanged, name) is None, f"{name} has nothing new"
    state.telemetry_samples.append(cpu_sample(NOW))
    state.kv["workers"][0]["num_free_blocks"] = 33
    state.errors["steps"] = "TimeoutError: no reply within 5 s"
    changed = render_live_outputs(state)
    assert len(changed.utilization) == 2
    assert "7 of 40 blocks in use" in changed.kv_html
    assert changed.roofline_summary.startswith("⚠️ Engine steps unavailable")


# -- Ray dashboard ----------------------------------------------------------------------


def test_dashboard_markdown_links_and_explains():
    lines = ["Token authentication is on.", "Print it with `ray get-auth-token`."]
    markdown = format_dashboard_markdown("http://127.0.0.1:8265", lines)
    assert "[http://127.0.0.1:8265](http://127.0.0.1:8265)" in markdown
    assert "`ray get-auth-token`" in markdown


def test_dashboard_token_never_shown(monkeypatch):
    from molten import cli_serve
    from molten.ui import app

    monkeypatch.setattr(cli_serve, "is_ray_token_auth_enabled", lambda: True)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token-value-42")
    markdown = format_dashboard_markdown("http://127.0.0.1:8265", app.dashboard_access_lines())
    assert "get-auth-token" in markdown
    assert "secret-token-value-42" not in markdown


def test_ray_task_error_shows_cause():
    from ray.exceptions import RayTaskError

    from molten.ui.chat import summarize_exception

    cause = ValueError("Tried to call a method 'telemetry' that does not exist.")
    error = RayTaskError("handle_request", "Traceback ...", cause, proctitle="\x1b[36mray::ServeReplica\x1b[39m")
    assert summarize_exception(error) == "ValueError: Tried to call a method 'telemetry' that does not exist."
    assert summarize_exception(RuntimeError("\x1b[36mred\x1b[39m\nmore")) == "RuntimeError: red"


def test_kv_html_heads_each_model():
    kv = {"workers": [kv_worker()], "models": [
        {"model": "tiny-random-llama", "mode": "disaggregated", "workers": [kv_worker("prefill"), kv_worker()]},
        {"model": "smollm2-135m-instruct", "mode": "colocated", "workers": [kv_worker("colocated")]},
    ]}
    text = render_kv_html(kv)
    assert "Model <code>tiny-random-llama</code> (disaggregated)" in text
    assert "Model <code>smollm2-135m-instruct</code> (colocated)" in text
    assert text.count("blocks in use") == 3


def test_status_shows_telemetry_notice():
    state = LiveState(num_polls=1, poll_time=NOW, telemetry_notice="No NVIDIA GPU found: showing CPU and memory")
    assert "ℹ️ No NVIDIA GPU found: showing CPU and memory" in status_markdown(state)

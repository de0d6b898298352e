"""Gradio components of the live engine views and the timer that refreshes them.

A `LivePanel` must be created inside a `gr.Blocks` context. The data comes from
`molten.ui.live_views`, and this module only lays it out and wires the timer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import gradio as gr

from molten.ui.chat import summarize_exception
from molten.ui.live_views import (
    DEFAULT_REFRESH,
    REFRESH_CHOICES,
    VIEWS,
    LiveState,
    poll_live_state,
    render_live_outputs,
)
from molten.ui.trace_view import STEP_TABLE_COLUMNS

logger = logging.getLogger(__name__)

LIVE_CONCURRENCY_LIMIT = 8
"""Timer ticks served at once across browser tabs. Each tick only awaits three short handle calls."""


def _series_plot(title: str, y_title: str, elem_id: str, visible: bool = True, caption: str | None = None) -> gr.LinePlot:
    # Start without data (None), not with an empty frame: Gradio 6.31 then draws the timer's later
    # frames without colors or legend (checked in Chromium), so the lines stay invisible.
    return gr.LinePlot(
        None,
        x="time",
        y="value",
        color="series",
        title=title,
        x_title="time (local)",
        y_title=y_title,
        color_title="series",
        tooltip="all",
        height=240,
        elem_id=elem_id,
        visible=visible,
        caption=caption,
    )


class LivePanel:
    """The live views' components, and the tick handler that refreshes them from the ingress."""

    def __init__(self, handle: Callable[[], Any]):
        self.handle = handle
        gr.Markdown(
            "## Engine, live\nTelemetry, KV cache, scheduler trace and roofline of the served model, polled "
            "from the ingress while this tab is open. Times are local wall-clock times."
        )
        with gr.Row():
            self.refresh = gr.Dropdown(
                list(REFRESH_CHOICES), value=DEFAULT_REFRESH, label="Refresh every", scale=1, min_width=120
            )
            self.status = gr.Markdown("Waiting for the first poll.", elem_id="molten-live-status")
        self.timer = gr.Timer(REFRESH_CHOICES[DEFAULT_REFRESH])
        self.state = gr.State(LiveState())

        gr.Markdown("### Telemetry")
        with gr.Row():
            self.utilization = _series_plot("Utilization (%)", "percent", "molten-telemetry-utilization")
            self.system_memory = _series_plot(
                "Machine memory used (GiB)", "GiB", "molten-telemetry-memory",
                caption="System RAM (and GPU memory) used by every program on the machine, not only Molten.",
            )
        self.process_memory = _series_plot(
            "Memory of Molten's processes (GiB): RSS per process, torch allocations", "GiB",
            "molten-telemetry-process-memory",
            caption="Each line is one Molten process, named role:model (decode:smollm2-135m-instruct is the "
                    "decode worker of that model).",
        )
        with gr.Row():
            self.pcie = _series_plot("GPU PCIe throughput (MB/s)", "MB/s (10⁶ bytes)", "molten-telemetry-pcie", False)
            self.power = _series_plot("GPU power (W)", "watts", "molten-telemetry-power", False)
        with gr.Accordion("Latest telemetry sample", open=False):
            self.latest_sample = gr.Markdown("No telemetry sample yet.")

        gr.Markdown("### KV cache")
        self.kv = gr.HTML("<p>No KV cache state yet.</p>", elem_id="molten-kv")

        gr.Markdown("### Scheduler trace and roofline")
        with gr.Row():
            with gr.Column():
                self.trace = gr.BarPlot(
                    None,
                    x="time",
                    y="tokens",
                    color="part",
                    title="Tokens computed per engine step (prefill chunks and decode batch)",
                    x_title="step end time (local)",
                    y_title="tokens in the step",
                    color_title="worker: tokens",
                    tooltip=["worker", "step_id", "time", "duration_ms", "batch_size", "part", "tokens", "ran"],
                    height=280,
                    elem_id="molten-trace",
                )
            with gr.Column():
                # No Gradio label: its badge sits over the figure's top left corner, where the
                # matplotlib title is; the title already names the plot.
                self.roofline = gr.Plot(label="Roofline", show_label=False, format="png", elem_id="molten-roofline")
                self.roofline_summary = gr.Markdown("No measured engine steps yet.")
        self.steps = gr.Dataframe(
            headers=list(STEP_TABLE_COLUMNS), label="Latest engine steps, newest first (a utilization above 100%: see the note under the roofline)",
            max_height=320,
            interactive=False, wrap=True,
        )

        outputs = [
            self.state, self.status, self.utilization, self.system_memory, self.process_memory, self.pcie, self.power, self.latest_sample,
            self.kv, self.trace, self.steps, self.roofline, self.roofline_summary,
        ]
        self.timer.tick(
            self.tick, [self.state], outputs, concurrency_limit=LIVE_CONCURRENCY_LIMIT,
            concurrency_id="molten-live", show_progress="hidden",
        )
        self.refresh.change(self.set_refresh, [self.refresh], [self.timer], show_progress="hidden")

    @staticmethod
    def set_refresh(choice: str) -> gr.Timer:
        interval = REFRESH_CHOICES.get(choice)
        if interval is None:
            return gr.Timer(active=False)
        return gr.Timer(value=interval, active=True)

    async def tick(self, state: LiveState) -> tuple:
        """Poll the ingress once and return every live view's new value."""
        try:
            handle = self.handle()
        except Exception as exc:
            message = f"the Molten ingress is not available: {summarize_exception(exc)}"
            state.errors = {view: message for view in VIEWS}
            state.poll_time = time.time()
            state.num_polls += 1
        else:
            await poll_live_state(handle, state)
        live = render_live_outputs(state)
        if live.pcie is None:
            pcie = power = gr.skip()
        else:
            has_gpu_plots = len(live.pcie) > 0 or len(live.power) > 0
            pcie = gr.LinePlot(live.pcie, visible=has_gpu_plots)
            power = gr.LinePlot(live.power, visible=has_gpu_plots)
        values = (live.status, live.utilization, live.system_memory, live.process_memory, pcie, power, live.latest_sample, live.kv_html,
                  live.trace, live.steps, live.roofline, live.roofline_summary)
        return (state, *(gr.skip() if value is None else value for value in values))

"""The playground's live engine views: telemetry, KV cache, scheduler trace and roofline, polled on a timer.

A `gr.Timer` ticks in each open browser session. Each tick awaits three calls on the
ingress deployment handle at once (`telemetry`, `steps`, `kv_state`), merges the new
telemetry samples and steps into that session's `LiveState` (a rolling window), and
redraws the views. Nothing loops on the server between ticks, and a slow or failing call
only marks its own view as unavailable. `poll_live_state` and `render_live_outputs` have
no Gradio dependency, so tests drive them directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from molten.ui.chat import summarize_exception
from molten.ui.kv_view import render_kv_html
from molten.ui.telemetry_view import format_latest_sample_markdown, telemetry_frames
from molten.ui.trace_view import clock_time, roofline_figure, roofline_summary_markdown, steps_table, trace_frame

logger = logging.getLogger(__name__)

REFRESH_CHOICES: dict[str, float | None] = {"off": None, "0.5 s": 0.5, "1 s": 1.0, "2 s": 2.0, "5 s": 5.0}
"""Refresh intervals a person can pick. "off" stops the timer, and so every poll, for that browser tab."""
DEFAULT_REFRESH = "1 s"

TELEMETRY_WINDOW_S = 120.0
"""Telemetry samples older than this (relative to the newest poll) are dropped from the plots."""
TRACE_WINDOW_S = 60.0
"""Engine steps older than this are dropped from the scheduler trace and the roofline."""
MAX_STEPS_PER_WORKER = 2000
"""Upper bound on steps kept per worker, whatever their age, so a busy engine cannot grow a session's state."""
POLL_TIMEOUT_S = 5.0
"""Maximum wait for one call on the ingress. A call that takes longer marks its view as unavailable."""
ROOFLINE_REDRAW_INTERVAL_S = 3.0
"""Minimum time between two roofline redraws. matplotlib renders on the server's CPU, which the
engine shares, so the roofline refreshes more slowly than the browser-drawn plots."""

VIEWS = ("telemetry", "steps", "kv")


@dataclass
class LiveState:
    """The data one browser session has polled: a rolling window of telemetry samples and engine steps."""

    telemetry_samples: list[dict] = field(default_factory=list)
    telemetry_source: str | None = None
    telemetry_notice: str | None = None
    steps_by_worker: dict[str, list[dict]] = field(default_factory=dict)
    peaks: dict | None = None
    kv: dict | None = None
    errors: dict[str, str] = field(default_factory=dict)
    """View name (`telemetry`, `steps`, `kv`) to the reason its last poll failed. A successful poll clears it."""
    num_polls: int = 0
    poll_time: float = 0.0
    """Unix time of the newest poll."""
    roofline_drawn_at: float = 0.0
    rendered_keys: dict[str, Any] = field(default_factory=dict)
    """View name to a key of the data it last showed, so a view whose data did not change is not sent again."""

    def last_sample_time(self) -> float | None:
        return self.telemetry_samples[-1]["time"] if self.telemetry_samples else None

    def since_step(self) -> int | None:
        """Return the step id to request steps after: the oldest newest-seen id over the workers.

        Step ids count per worker, so asking from the minimum can return steps already held
        by another worker's list; `merge_steps` drops those by id.
        """
        if not self.steps_by_worker or not all(self.steps_by_worker.values()):
            return None
        return min(steps[-1]["step_id"] for steps in self.steps_by_worker.values())

    def merge_telemetry(self, reply: Mapping[str, Any]) -> None:
        self.telemetry_source = reply.get("source")
        self.telemetry_notice = reply.get("notice")
        newest = self.last_sample_time()
        for sample in reply.get("samples") or []:
            if newest is None or sample["time"] > newest:
                self.telemetry_samples.append(sample)
                newest = sample["time"]
        oldest_kept = self.poll_time - TELEMETRY_WINDOW_S
        self.telemetry_samples = [sample for sample in self.telemetry_samples if sample["time"] >= oldest_kept]

    def merge_steps(self, reply: Mapping[str, Any]) -> None:
        self.peaks = reply.get("peaks") or self.peaks
        oldest_kept = self.poll_time - TRACE_WINDOW_S
        for worker, new_steps in (reply.get("workers") or {}).items():
            steps = self.steps_by_worker.setdefault(worker, [])
            newest_id = steps[-1]["step_id"] if steps else None
            for step in sorted(new_steps, key=lambda step: step["step_id"]):
                if newest_id is None or step["step_id"] > newest_id:
                    steps.append(step)
                    newest_id = step["step_id"]
            steps_in_window = [step for step in steps if step["time"] >= oldest_kept]
            self.steps_by_worker[worker] = steps_in_window[-MAX_STEPS_PER_WORKER:]

    @property
    def num_steps(self) -> int:
        return sum(len(steps) for steps in self.steps_by_worker.values())

    def steps_key(self) -> tuple:
        """Identify the steps held: per worker, how many and the newest id."""
        return tuple(sorted(
            (worker, len(steps), steps[-1]["step_id"] if steps else None) for worker, steps in self.steps_by_worker.items()
        ))

    def mark_rendered(self, view: str, key: Any) -> bool:
        """Store `key` as what `view` shows, and return whether it differs from what it showed before."""
        if view in self.rendered_keys and self.rendered_keys[view] == key:
            return False
        self.rendered_keys[view] = key
        return True


async def _await_with_timeout(start: Callable[[], Any], timeout_s: float) -> Any:
    """Start one handle call and await its result, cancelling the Serve request on timeout."""
    response = start()
    try:
        return await asyncio.wait_for(_result(response), timeout=timeout_s)
    except TimeoutError:
        response.cancel()
        raise TimeoutError(f"no reply within {timeout_s:.0f} s") from None


async def _result(response: Any) -> Any:
    return await response


async def poll_live_state(handle: Any, state: LiveState, now: float | None = None,
                          timeout_s: float = POLL_TIMEOUT_S) -> LiveState:
    """Fetch new telemetry samples, new engine steps and the KV state from the ingress, and merge them into `state`.

    The three calls run concurrently. A failed call (for example a server without the
    telemetry endpoint) stores its reason in `state.errors` under the view's name, and the
    other views still update.
    """
    state.poll_time = time.time() if now is None else now
    since = state.last_sample_time()
    since_step = state.since_step()
    starts = {
        "telemetry": lambda: handle.telemetry.remote(since=since),
        "steps": lambda: handle.steps.remote(since_step=since_step),
        "kv": lambda: handle.kv_state.remote(),
    }
    results = await asyncio.gather(
        *(_await_with_timeout(start, timeout_s) for start in starts.values()), return_exceptions=True
    )
    for view, result in zip(starts, results):
        if isinstance(result, asyncio.CancelledError):
            raise result
        if isinstance(result, BaseException):
            message = summarize_exception(result)
            if state.errors.get(view) != message:
                logger.warning("live view %s: polling the ingress failed: %s", view, message)
            state.errors[view] = message
            continue
        state.errors.pop(view, None)
        if view == "telemetry":
            state.merge_telemetry(result)
        elif view == "steps":
            state.merge_steps(result)
        else:
            state.kv = result
    state.num_polls += 1
    return state


def status_markdown(state: LiveState) -> str:
    """Summarize the last poll: when, what the windows hold, and which views are unavailable and why."""
    if state.num_polls == 0:
        return "Waiting for the first poll."
    stamp = time.strftime("%H:%M:%S", time.localtime(state.poll_time))
    newest = state.last_sample_time()
    newest_text = f", newest at {clock_time(newest)}" if newest is not None else ""
    lines = [
        f"Last poll {stamp}: {len(state.telemetry_samples)} telemetry samples (last {TELEMETRY_WINDOW_S:.0f} s"
        f"{newest_text}), {state.num_steps} engine steps (last {TRACE_WINDOW_S:.0f} s)."
    ]
    if state.telemetry_notice:
        lines.append(f"ℹ️ {state.telemetry_notice}")
    for view, message in state.errors.items():
        lines.append(f"⚠️ {view} unavailable: {message}")
    return "\n\n".join(lines)


@dataclass
class LiveOutputs:
    """Everything the live views show after one poll. A field is None when its view has nothing new to show."""

    status: str
    utilization: Any
    system_memory: Any
    process_memory: Any
    pcie: Any
    power: Any
    latest_sample: str | None
    kv_html: str | None
    trace: Any
    steps: Any
    roofline: Any
    roofline_summary: str | None


def render_live_outputs(state: LiveState, force_roofline: bool = False) -> LiveOutputs:
    """Turn a session's `LiveState` into the data of every live view whose data changed since the last render.

    Skipping unchanged views keeps an idle page cheap: the browser redraws only what changed.
    """
    outputs = LiveOutputs(status_markdown(state), *([None] * 11))

    telemetry_key = (state.last_sample_time(), len(state.telemetry_samples), state.telemetry_source,
                     state.telemetry_notice, state.errors.get("telemetry"))
    if state.mark_rendered("telemetry", telemetry_key):
        frames = telemetry_frames(state.telemetry_samples)
        outputs.utilization = frames.utilization_pct
        outputs.system_memory = frames.system_memory_gib
        outputs.process_memory = frames.process_memory_gib
        outputs.pcie = frames.pcie_mb_per_s
        outputs.power = frames.power_w
        latest = state.telemetry_samples[-1] if state.telemetry_samples else None
        outputs.latest_sample = format_latest_sample_markdown(latest, state.telemetry_source, state.telemetry_notice)
        if "telemetry" in state.errors:
            outputs.latest_sample = f"⚠️ Telemetry unavailable: {state.errors['telemetry']}\n\n{outputs.latest_sample}"

    if state.mark_rendered("kv", (state.kv, state.errors.get("kv"))):
        outputs.kv_html = render_kv_html(state.kv, state.errors.get("kv"))

    steps_key = (state.steps_key(), state.peaks, state.errors.get("steps"))
    if state.mark_rendered("steps", steps_key):
        outputs.trace = trace_frame(state.steps_by_worker)
        outputs.steps = steps_table(state.steps_by_worker)
        outputs.roofline_summary = roofline_summary_markdown(state.steps_by_worker, state.peaks)
        if "steps" in state.errors:
            outputs.roofline_summary = f"⚠️ Engine steps unavailable: {state.errors['steps']}"

    due = state.poll_time - state.roofline_drawn_at >= ROOFLINE_REDRAW_INTERVAL_S
    if force_roofline or (due and state.rendered_keys.get("roofline") != steps_key):
        outputs.roofline = roofline_figure(state.steps_by_worker, state.peaks)
        state.roofline_drawn_at = state.poll_time
        state.rendered_keys["roofline"] = steps_key
    return outputs

"""The Gradio playground: chat with the served model and watch what each reply costs.

`build_playground` returns the Blocks, and `launch_playground` serves them on 127.0.0.1 only.
The Chat tab streams TokenEvents from the ingress deployment handle (see `molten.ui.chat`)
and shows, while the reply streams, TTFT, token rates, token counts, the KV handoff, the
per-token timeline and a plot of inter-token latency. Below the chat, the live engine views
(`molten.ui.live_panel`) poll the same handle on a timer: telemetry, KV cache, scheduler
trace and roofline. The Server tab shows the settings and how to open the Ray dashboard.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

# Gradio's telemetry reads this variable on every call; the playground never phones home.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from molten.protocol.request_models import DEFAULT_CHAT_MAX_TOKENS  # noqa: E402
from molten.ui.chat import (  # noqa: E402
    ChatParams,
    TurnUpdate,
    chat_turn,
    message_text,
    parse_stop_strings,
    summarize_exception,
)
from molten.ui.experiments_tab import build_experiments_tab  # noqa: E402
from molten.ui.live_panel import LivePanel  # noqa: E402
from molten.ui.models_tab import build_models_tab  # noqa: E402
from molten.ui.spec_view import format_origin_markdown  # noqa: E402
from molten.ui.stats import ReplyStats, format_stats_markdown  # noqa: E402
from molten.ui.timeline_view import token_timeline_frame  # noqa: E402

logger = logging.getLogger(__name__)

PLAYGROUND_HOST = "127.0.0.1"

UI_UPDATE_INTERVAL_S = 0.05
"""Minimum time between two streamed UI updates. Tokens that arrive faster are shown together
in the next update, so a fast model does not flood the browser with messages."""

CHAT_CONCURRENCY_LIMIT = 8
"""Chat turns served at once across all browser tabs, so two tabs can show continuous batching."""

ITL_COLUMNS = ("token", "itl_ms")

EMPTY_MESSAGE_ERROR = "empty_message"

MAX_TOKENS_SLIDER_MAX = 2048
"""Upper end of the max_tokens slider, raised when the server's own default is larger."""


def initial_max_tokens(settings_info: Mapping[str, Any]) -> tuple[int, str]:
    """Return the max_tokens slider's start value and the note under it: the server's default for chat.

    The slider then agrees with what an API call without max_tokens gets: the server's
    `default_max_tokens` when it was set, else the chat endpoint's own default.
    """
    configured = settings_info.get("default_max_tokens")
    if isinstance(configured, int) and not isinstance(configured, bool) and configured > 0:
        return configured, f"starts at {configured}, this server's default_max_tokens for API requests"
    return DEFAULT_CHAT_MAX_TOKENS, f"starts at {DEFAULT_CHAT_MAX_TOKENS}, the API's default for chat requests"
"""Error type of the notice shown when Send is pressed with no message; no request is sent."""

HandleFactory = Callable[[], Any]
"""Returns the ingress's Serve deployment handle (called on the first chat turn, then cached)."""


def itl_dataframe(stats: ReplyStats) -> pd.DataFrame:
    """Build the inter-token latency plot's data: one row per token after the first (x = token index, y = ms).

    The dtypes are set even for an empty frame, because Gradio 6 picks the axis types (numeric
    or categorical) from the plot's first value, and an empty frame's columns are objects.
    With object columns the axes of later, filled frames were drawn as categories.
    """
    rows = [(index, round(gap_ms, 2)) for index, gap_ms in stats.inter_token_latencies()]
    frame = pd.DataFrame(rows, columns=list(ITL_COLUMNS))
    return frame.astype({"token": "int64", "itl_ms": "float64"})


def format_error_markdown(error: Mapping[str, Any], title: str = "Request failed") -> str:
    """Render an OpenAI-style error object as a Markdown notice naming its type and field."""
    details = [f"`{error.get('type') or 'error'}`"]
    if error.get("param"):
        details.append(f"field `{error['param']}`")
    message = error.get("message") or "the server returned an error without a message"
    return f"### ⚠️ {title}\n**{message}**\n\n({', '.join(details)})"


def _clean_history(history: list[dict] | None) -> list[dict]:
    """Copy Gradio's chat history into plain {"role", "content"} dicts with string content."""
    cleaned = []
    for message in history or []:
        item = {"role": message["role"], "content": message_text(message.get("content"))}
        metadata = {key: value for key, value in (message.get("metadata") or {}).items() if value}
        if metadata:
            item["metadata"] = metadata
        cleaned.append(item)
    return cleaned


def _header_markdown(settings_info: Mapping[str, Any]) -> str:
    model = settings_info.get("model", "?")
    mode = settings_info.get("mode", "?")
    lines = [f"# Molten playground\nModel **`{model}`**, **{mode}** mode."]
    if settings_info.get("api_base"):
        lines.append(f"OpenAI-compatible API: `{settings_info['api_base']}`.")
    if settings_info.get("ray_dashboard"):
        lines.append(f"[Ray dashboard]({settings_info['ray_dashboard']}) (the Server tab says how to sign in).")
    return " ".join(lines)


def format_dashboard_markdown(dashboard_url: str | None, access_lines: list[str]) -> str:
    """Explain where the Ray dashboard is and how to authenticate, without ever showing the token."""
    if not dashboard_url:
        return "### Ray dashboard\nThis server did not report a dashboard URL."
    return "\n".join([
        "### Ray dashboard",
        f"Open [{dashboard_url}]({dashboard_url}) to see the actors (`molten:prefill:<model>`, "
        "`molten:decode:<model>` or `molten:colocated:<model>`, `molten:ingress`, `molten:telemetry`, "
        "`molten:model-manager`), their logs, CPU and memory.",
        "",
        " ".join(access_lines),
    ])


def dashboard_access_lines() -> list[str]:
    """Return `molten serve`'s explanation of the dashboard's token authentication, or a generic one."""
    try:
        from molten.cli_serve import dashboard_access_lines as serve_access_lines

        return serve_access_lines()
    except Exception as exc:  # the explanation only decorates the Server tab
        logger.warning("could not read Ray's authentication mode: %s", exc)
        return [
            "If the dashboard asks for a token, print it with `ray get-auth-token` "
            "(Ray stores it in ~/.ray/auth_token) and paste it into the dashboard's dialog."
        ]


class ChatController:
    """Connects the Chat tab's events to `chat_turn`, holding the lazily created ingress handle."""

    def __init__(self, handle_factory: HandleFactory, model: str, mode: str | None):
        self.handle_factory = handle_factory
        self.model = model
        self.mode = mode
        self._handle = None

    def handle(self):
        if self._handle is None:
            self._handle = self.handle_factory()
        return self._handle

    def render(self, history: list[dict], update: TurnUpdate, pending_message: str = ""):
        """Return the Chat tab's outputs: chatbot, message box, stats, ITL plot, error notice, token timeline."""
        if update.error is None:
            error = gr.Markdown(visible=False)
        else:
            title = "Nothing to send" if update.error.get("type") == EMPTY_MESSAGE_ERROR else "Request failed"
            error = gr.Markdown(format_error_markdown(update.error, title), visible=True)
        return (
            history,
            pending_message,
            format_stats_markdown(update.stats, self.mode) + format_origin_markdown(update.stats),
            itl_dataframe(update.stats),
            error,
            token_timeline_frame(update.stats),
        )

    async def respond(
        self,
        message: str,
        history: list[dict] | None,
        system_prompt: str,
        max_tokens: float,
        temperature: float,
        top_p: float,
        top_k: float,
        min_p: float,
        repetition_penalty: float,
        seed: float | None,
        stop_text: str,
    ) -> AsyncIterator[tuple]:
        """Stream one turn into the Chat tab. Errors become a visible notice, never an exception."""
        history = _clean_history(history)
        if not (message or "").strip():
            empty = TurnUpdate("", ReplyStats(), {"message": "Type a message first.", "type": EMPTY_MESSAGE_ERROR})
            yield self.render(history, empty, message)
            return

        params = ChatParams(
            max_tokens=int(max_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            min_p=float(min_p),
            repetition_penalty=float(repetition_penalty),
            seed=None if seed is None or seed == "" else int(seed),
            stop=parse_stop_strings(stop_text),
            system_prompt=system_prompt or "",
        )
        try:
            handle = self.handle()
        except Exception as exc:
            failed = TurnUpdate("", ReplyStats(), {"message": f"the Molten ingress is not available: {summarize_exception(exc)}"})
            yield self.render(history, failed, message)
            return

        turn = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield self.render(turn, TurnUpdate("", ReplyStats()))
        last_update = time.monotonic()
        async for update in chat_turn(handle, message, history, params, model=self.model):
            if update.error is not None and not update.text:
                # Nothing was generated: drop the turn and give the message back, so it can be resent.
                yield self.render(history, update, message)
                return
            turn[-1] = {"role": "assistant", "content": update.text}
            now = time.monotonic()
            if update.done or now - last_update >= UI_UPDATE_INTERVAL_S:
                last_update = now
                yield self.render(turn, update)


def build_playground(handle_factory: HandleFactory, settings_info: Mapping[str, Any]) -> gr.Blocks:
    """Build the playground's Blocks.

    `handle_factory` returns the ingress deployment handle. It is first called on the
    first chat turn, so the Blocks can be built before Serve runs. `settings_info` must
    contain `model`, the served model id sent in requests, and should contain `mode`.
    The Server tab shows every entry, and the header also shows `api_base`.
    """
    if "model" not in settings_info:
        raise ValueError("settings_info must contain 'model', the served model id")
    controller = ChatController(handle_factory, str(settings_info["model"]), settings_info.get("mode"))

    with gr.Blocks(title="Molten playground", analytics_enabled=False) as blocks:
        gr.Markdown(_header_markdown(settings_info))
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Conversation", height=460, buttons=["copy"])
                    error_box = gr.Markdown(visible=False, elem_id="molten-error")
                    message_box = gr.Textbox(
                        placeholder="Type a message and press Enter", show_label=False, lines=2, max_lines=8
                    )
                    with gr.Row():
                        send_button = gr.Button("Send", variant="primary")
                        stop_button = gr.Button("Stop")
                        clear_button = gr.Button("Clear")
                with gr.Column(scale=2):
                    stats_box = gr.Markdown(format_stats_markdown(ReplyStats(), controller.mode), elem_id="molten-reply-stats")
                    timeline_plot = gr.ScatterPlot(
                        token_timeline_frame(ReplyStats()),
                        x="time_ms",
                        y="token",
                        color="origin_batch",
                        title="Token timeline: each token at its time since the request arrived",
                        x_title="ms since the request arrived",
                        y_title="token index",
                        color_title="origin, batch size",
                        tooltip=["token", "text", "time_ms", "gap_ms", "origin", "batch_size", "step_id"],
                        height=260,
                        elem_id="molten-token-timeline",
                    )
                    itl_plot = gr.LinePlot(
                        itl_dataframe(ReplyStats()),
                        x="token",
                        y="itl_ms",
                        x_title="token index",
                        y_title="ms since previous token",
                        title="Inter-token latency (ms since the previous token, by token index)",
                        height=260,
                        elem_id="molten-itl",
                    )
                    gr.Markdown(
                        "In disaggregated mode, token 1's latency includes the KV handoff. Hover a mark for its "
                        "text, engine step and the batch size of that step."
                    )
            with gr.Accordion("Decoding controls", open=True):
                system_prompt = gr.Textbox(label="System prompt (optional)", lines=1)
                with gr.Row():
                    start_max_tokens, max_tokens_note = initial_max_tokens(settings_info)
                    max_tokens = gr.Slider(
                        1, max(MAX_TOKENS_SLIDER_MAX, start_max_tokens), value=start_max_tokens, step=1,
                        label="max_tokens", info=max_tokens_note,
                    )
                    temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature (0 = greedy)")
                    top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="top_p")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="top_k (0 = off)")
                with gr.Row():
                    min_p = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="min_p")
                    repetition_penalty = gr.Slider(0.5, 2.0, value=1.0, step=0.01, label="repetition_penalty (1 = off)")
                    seed = gr.Number(value=None, precision=0, label="seed (blank = random)")
                    stop_text = gr.Textbox(
                        label="stop strings, one per line (\\n = newline)", lines=2, max_lines=4
                    )
            LivePanel(controller.handle)

        build_experiments_tab()
        build_models_tab(controller.handle)

        with gr.Tab("Server"):
            gr.Markdown(format_dashboard_markdown(settings_info.get("ray_dashboard"), dashboard_access_lines()))
            gr.Markdown("Settings this server was started with.")
            gr.JSON(json.loads(json.dumps(dict(settings_info), default=str)))

        inputs = [
            message_box,
            chatbot,
            system_prompt,
            max_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            repetition_penalty,
            seed,
            stop_text,
        ]
        outputs = [chatbot, message_box, stats_box, itl_plot, error_box, timeline_plot]
        submit_event = message_box.submit(
            controller.respond, inputs, outputs, concurrency_limit=CHAT_CONCURRENCY_LIMIT
        )
        click_event = send_button.click(
            controller.respond, inputs, outputs, concurrency_limit=CHAT_CONCURRENCY_LIMIT
        )
        stop_button.click(None, None, None, cancels=[submit_event, click_event])
        clear_button.click(
            lambda: ([], "", format_stats_markdown(ReplyStats(), controller.mode), itl_dataframe(ReplyStats()),
                     gr.Markdown(visible=False), token_timeline_frame(ReplyStats())),
            None,
            outputs,
            cancels=[submit_event, click_event],
        )
    return blocks


def launch_playground(blocks: gr.Blocks, port: int) -> str:
    """Serve the playground on 127.0.0.1:`port` without blocking, and return its local URL."""
    _, local_url, _ = blocks.launch(
        server_name=PLAYGROUND_HOST,
        server_port=port,
        share=False,
        prevent_thread_lock=True,
        quiet=True,
        ssr_mode=False,
        mcp_server=False,
        show_error=True,
    )
    return local_url

"""Playground construction and the Chat tab's handling of failures that need no server."""

from __future__ import annotations

import asyncio

import gradio as gr
import pytest

from molten.protocol.request_models import DEFAULT_CHAT_MAX_TOKENS
from molten.ui.app import ChatController, build_playground, format_error_markdown, initial_max_tokens
from molten.ui.chat import ChatParams


def collect(async_iterator) -> list:
    async def run():
        return [item async for item in async_iterator]

    return asyncio.run(run())


def respond_args(message: str) -> tuple:
    # message, history, system prompt, max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop
    return (message, [], "", 16, 0.0, 1.0, 0, 0.0, 1.0, None, "")


def test_build_playground_constructs():
    calls = []
    blocks = build_playground(lambda: calls.append("handle"), {"model": "tiny-random-llama", "mode": "colocated"})
    assert isinstance(blocks, gr.Blocks)
    assert calls == [], "the handle must be created lazily, on the first chat turn"


def test_build_playground_requires_model():
    with pytest.raises(ValueError, match="model"):
        build_playground(lambda: None, {"mode": "colocated"})


def test_error_markdown_names_type_and_field():
    error = {"message": "temperature must be a number in [0, 2], got 5", "type": "invalid_request_error",
             "param": "temperature", "code": None}
    markdown = format_error_markdown(error)
    assert "temperature must be a number in [0, 2], got 5" in markdown
    assert "`invalid_request_error`" in markdown
    assert "field `temperature`" in markdown


def test_empty_message_shows_notice():
    controller = ChatController(lambda: pytest.fail("no request may be sent"), "m", "colocated")
    outputs = collect(controller.respond(*respond_args("   ")))
    assert len(outputs) == 1
    history, message_box, _, _, error_box, _ = outputs[0]
    assert history == []
    assert message_box == "   "
    assert error_box.visible is True
    assert "Type a message first." in error_box.value


def test_unavailable_ingress_shows_error():
    def missing_handle():
        raise RuntimeError("Serve is not running")

    controller = ChatController(missing_handle, "m", "colocated")
    outputs = collect(controller.respond(*respond_args("Hello")))
    history, message_box, _, _, error_box, _ = outputs[-1]
    assert history == []
    assert message_box == "Hello", "the unsent message goes back into the message box"
    assert error_box.visible is True
    assert "Serve is not running" in error_box.value


def test_playground_has_live_views():
    blocks = build_playground(lambda: None, {"model": "tiny-random-llama", "mode": "disaggregated"})
    elem_ids = {block.elem_id for block in blocks.blocks.values() if getattr(block, "elem_id", None)}
    expected = {"molten-token-timeline", "molten-telemetry-utilization", "molten-telemetry-memory",
                "molten-telemetry-process-memory", "molten-kv", "molten-trace", "molten-roofline", "molten-live-status"}
    assert expected <= elem_ids
    roofline = next(block for block in blocks.blocks.values() if getattr(block, "elem_id", None) == "molten-roofline")
    assert roofline.show_label is False, "Gradio's label badge would cover the figure's title"
    # Other tabs may add timers of their own.
    timers = [block for block in blocks.blocks.values() if isinstance(block, gr.Timer)]
    assert any(timer.value == 1.0 and timer.active for timer in timers)


def test_refresh_choice_sets_timer():
    from molten.ui.live_panel import LivePanel

    assert LivePanel.set_refresh("off").active is False
    faster = LivePanel.set_refresh("0.5 s")
    assert faster.active is True
    assert faster.value == 0.5


def test_max_tokens_slider_starts_at_the_api_default():
    assert initial_max_tokens({"default_max_tokens": "endpoint default (chat 512, completions 16)"})[0] == (
        DEFAULT_CHAT_MAX_TOKENS)
    assert initial_max_tokens({})[0] == DEFAULT_CHAT_MAX_TOKENS == ChatParams().max_tokens
    value, note = initial_max_tokens({"default_max_tokens": 3000})
    assert value == 3000
    assert "this server's default_max_tokens" in note
    blocks = build_playground(lambda: None, {"model": "m", "default_max_tokens": 3000})
    slider = next(block for block in blocks.blocks.values()
                  if isinstance(block, gr.Slider) and block.label == "max_tokens")
    assert slider.value == 3000
    assert slider.maximum >= 3000

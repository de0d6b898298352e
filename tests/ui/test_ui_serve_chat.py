"""The playground's chat handler and `molten chat` against a real Serve deployment (slow: starts Ray)."""

from __future__ import annotations

import asyncio

import pytest

from molten.cli import main
from molten.ui.app import ChatController, itl_dataframe
from molten.ui.chat import ChatParams, chat_turn
from molten.ui.stats import format_stats_markdown

pytestmark = pytest.mark.slow

MODEL = "tiny-random-llama"
GREEDY = ChatParams(max_tokens=12, temperature=0.0, seed=0)


def collect(async_iterator, limit: int = 10_000) -> list:
    async def run():
        items = []
        async for item in async_iterator:
            items.append(item)
            if len(items) >= limit:
                break
        return items

    return asyncio.run(run())


def respond_args(message: str, temperature: float = 0.0, max_tokens: int = 12) -> tuple:
    # message, history, system prompt, max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop
    return (message, [], "", max_tokens, temperature, 1.0, 0, 0.0, 1.0, 0, "")


def test_chat_turn_streams_increments(serve_app):
    _, handle = serve_app
    updates = collect(chat_turn(handle, "Tell me about KV caches.", [], GREEDY, model=MODEL))

    final = updates[-1]
    assert final.done
    assert final.error is None
    streamed = [update for update in updates if not update.done]
    assert len(streamed) >= 3, "the reply should arrive token by token"
    texts = [update.text for update in streamed]
    for earlier, later in zip(texts, texts[1:]):
        assert later.startswith(earlier)
    assert len({text for text in texts if text}) >= 3
    assert final.text == texts[-1]
    assert final.request_id and final.request_id.startswith("chat-")


def test_chat_turn_reports_timings(serve_app):
    _, handle = serve_app
    final = collect(chat_turn(handle, "Hello there", [], GREEDY, model=MODEL))[-1]
    stats = final.stats
    assert stats.num_output_tokens >= 3
    assert stats.ttft_ms is not None and stats.ttft_ms > 0
    assert stats.decode_tokens_per_s is not None and stats.decode_tokens_per_s > 0
    assert stats.num_prompt_tokens is not None and stats.num_prompt_tokens > 0
    assert stats.num_cached_prompt_tokens is not None
    assert stats.finish_reason in ("length", "stop")


def test_chat_turn_shows_handoff_live(serve_app):
    _, handle = serve_app
    updates = collect(chat_turn(handle, "What is prefill?", [], GREEDY, model=MODEL))
    live = [update for update in updates if not update.done and update.stats.handoff is not None]
    assert live, "the handoff should be visible before the reply finishes"
    handoff = live[0].stats.handoff
    assert handoff.num_bytes > 0
    assert handoff.num_blocks >= 1
    assert handoff.total_ms > 0
    markdown = format_stats_markdown(live[0].stats, "disaggregated")
    assert f"{handoff.num_bytes:,} bytes" in markdown
    assert f"{handoff.num_blocks} KV blocks" in markdown


def test_itl_plot_data_from_reply(serve_app):
    _, handle = serve_app
    stats = collect(chat_turn(handle, "Count to ten.", [], GREEDY, model=MODEL))[-1].stats
    frame = itl_dataframe(stats)
    assert len(frame) == stats.num_output_tokens - 1
    assert frame["token"].tolist() == list(range(1, stats.num_output_tokens))
    assert (frame["itl_ms"] > 0).all()


def test_chat_turn_error_body(serve_app):
    _, handle = serve_app
    params = ChatParams(max_tokens=8, temperature=5.0)
    updates = collect(chat_turn(handle, "Hi", [], params, model=MODEL))
    assert len(updates) == 1
    error = updates[0].error
    assert updates[0].done
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "temperature"
    assert "temperature" in error["message"]


def test_chat_turn_unknown_model(serve_app):
    _, handle = serve_app
    error = collect(chat_turn(handle, "Hi", [], GREEDY, model="no-such-model"))[-1].error
    assert error is not None
    assert "no-such-model" in error["message"]


def test_playground_renders_server_error(serve_app):
    _, handle = serve_app
    controller = ChatController(lambda: handle, MODEL, "disaggregated")
    outputs = collect(controller.respond(*respond_args("Hi", temperature=5.0)))
    history, message_box, _, _, error_box, _ = outputs[-1]
    assert error_box.visible is True
    assert "temperature must be a number in [0, 2]" in error_box.value
    assert "field `temperature`" in error_box.value
    assert history == [], "a turn that produced nothing is removed from the conversation"
    assert message_box == "Hi", "the rejected message goes back into the message box"


def test_playground_streams_reply(serve_app):
    _, handle = serve_app
    controller = ChatController(lambda: handle, MODEL, "disaggregated")
    outputs = collect(controller.respond(*respond_args("Hi", max_tokens=16)))
    assert len(outputs) >= 2
    history, message_box, stats_markdown, plot_frame, error_box, timeline_frame = outputs[-1]
    assert error_box.visible is False
    assert message_box == ""
    assert [message["role"] for message in history] == ["user", "assistant"]
    assert history[1]["content"]
    assert "KV blocks" in stats_markdown
    assert len(plot_frame) >= 1


def test_stopped_turn_leaves_server_working(serve_app):
    _, handle = serve_app
    long_reply = ChatParams(max_tokens=200, temperature=0.0)
    partial = collect(chat_turn(handle, "Write a long story.", [], long_reply, model=MODEL), limit=3)
    assert len(partial) == 3
    assert not partial[-1].done
    final = collect(chat_turn(handle, "Hi again", [], GREEDY, model=MODEL))[-1]
    assert final.error is None
    assert final.stats.num_output_tokens >= 1


def test_cli_chat_streams_over_http(serve_app, capsys):
    settings, _ = serve_app
    url = f"http://127.0.0.1:{settings.http_port}{settings.route_prefix}"
    assert main(["chat", "Hello", "--url", url, "--max-tokens", "10", "--temperature", "0", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip(), "the reply text goes to standard output"
    assert "TTFT" in captured.err
    assert "tokens/s" in captured.err
    assert "output 10" in captured.err
    assert "KV handoff:" in captured.err
    assert "bytes in" in captured.err


def test_cli_chat_shows_server_rejection(serve_app, capsys):
    settings, _ = serve_app
    url = f"http://127.0.0.1:{settings.http_port}{settings.route_prefix}"
    assert main(["chat", "Hello", "--url", url, "--temperature", "9"]) == 1
    err = capsys.readouterr().err
    assert "temperature" in err
    assert "HTTP 400" in err

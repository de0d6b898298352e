"""Reply figures, ITL plot data and request bodies of the playground, from hand-made TokenEvents."""

from __future__ import annotations

import pytest

from molten.engine.events import HandoffStats, TokenEvent
from molten.ui.app import itl_dataframe
from molten.ui.chat import ChatParams, build_chat_body, history_to_messages, parse_stop_strings
from molten.ui.stats import ReplyStats, describe_handoff, format_bytes, format_stats_markdown

HANDOFF = HandoffStats(num_bytes=49_152, num_blocks=3, export_ms=0.5, transfer_ms=4.0, import_ms=1.5)


def make_event(index: int, time_ms: float, *, handoff=None, finish_reason=None, origin=None) -> TokenEvent:
    return TokenEvent(
        request_id="chat-test",
        seq_index=0,
        token_id=100 + index,
        text=f"t{index} ",
        logprob=None,
        top_logprobs=None,
        time_since_arrival_ms=time_ms,
        step_id=index,
        batch_size=1,
        origin=origin or ("prefill" if index == 0 else "decode"),
        index=index,
        finish_reason=finish_reason,
        num_prompt_tokens=40,
        num_cached_prompt_tokens=16,
        handoff=handoff,
    )


def stats_from(times_ms: list[float], **last_event_fields) -> ReplyStats:
    stats = ReplyStats()
    for index, time_ms in enumerate(times_ms):
        fields = last_event_fields if index == len(times_ms) - 1 else {}
        handoff = HANDOFF if index == 1 else None
        stats.add_event(make_event(index, time_ms, handoff=handoff, **fields))
    return stats


def test_reply_stats_timings():
    stats = stats_from([100.0, 130.0, 150.0, 180.0], finish_reason="length")
    assert stats.ttft_ms == 100.0
    assert stats.total_ms == 180.0
    assert stats.num_output_tokens == 4
    assert stats.decode_tokens_per_s == pytest.approx(3 / 0.080)
    assert stats.overall_tokens_per_s == pytest.approx(4 / 0.180)
    assert stats.mean_itl_ms == pytest.approx(80.0 / 3)
    assert stats.num_prompt_tokens == 40
    assert stats.num_cached_prompt_tokens == 16
    assert stats.handoff == HANDOFF
    assert stats.finish_reason == "length"


def test_itl_plot_data_rows():
    stats = stats_from([100.0, 130.0, 150.0, 180.0])
    frame = itl_dataframe(stats)
    assert list(frame.columns) == ["token", "itl_ms"]
    assert frame["token"].tolist() == [1, 2, 3]
    assert frame["itl_ms"].tolist() == pytest.approx([30.0, 20.0, 30.0])


def test_itl_plot_data_empty_before_second_token():
    assert len(itl_dataframe(ReplyStats())) == 0
    assert len(itl_dataframe(stats_from([55.0]))) == 0


def test_single_token_has_no_rates():
    stats = stats_from([50.0], finish_reason="stop")
    assert stats.decode_tokens_per_s is None
    assert stats.mean_itl_ms is None
    assert describe_handoff(stats, "disaggregated").startswith("none: the reply ended")


def test_handoff_description_states():
    assert describe_handoff(ReplyStats(), "disaggregated") == "–"
    assert describe_handoff(stats_from([10.0]), "disaggregated").startswith("pending")
    assert describe_handoff(stats_from([10.0]), "colocated").startswith("none: one co-located worker")
    text = describe_handoff(stats_from([10.0, 20.0]), "disaggregated")
    assert "48.0 KiB (49,152 bytes)" in text
    assert "3 KV blocks" in text
    assert "6.0 ms" in text


def test_stats_markdown_lists_figures():
    markdown = format_stats_markdown(stats_from([100.0, 130.0]), "disaggregated")
    assert "| Time to first token (TTFT) | 100.0 ms |" in markdown
    assert "| Prompt tokens | 40 |" in markdown
    assert "16 (40% of the prompt)" in markdown
    assert "| Output tokens | 2 |" in markdown
    assert "3 KV blocks" in markdown


def test_empty_stats_show_dashes():
    markdown = format_stats_markdown(ReplyStats(), "disaggregated")
    values = [line.split("|")[2].strip() for line in markdown.splitlines()[2:]]
    assert values and set(values) == {"–"}, f"an empty reply shows no figure yet, saw {values}"
    ended = ReplyStats(finish_reason="abort")
    assert "| Output tokens | 0 |" in format_stats_markdown(ended), "a reply that ended without tokens has 0"


@pytest.mark.parametrize(
    ("num_bytes", "expected"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (49_152, "48.0 KiB"), (3 * 1024 * 1024, "3.0 MiB"),
     (5 * 1024**3 // 2, "2.5 GiB")],
)
def test_format_bytes_units(num_bytes, expected):
    assert format_bytes(num_bytes) == expected


def test_stop_strings_parse_escapes():
    assert parse_stop_strings("") == []
    assert parse_stop_strings("END\n\n  \n\\n\\n") == ["END", "\n\n"]
    assert parse_stop_strings("a\\tb\nback\\\\slash\n\\x") == ["a\tb", "back\\slash", "\\x"]
    assert parse_stop_strings(" keep spaces ") == [" keep spaces "]


def test_history_to_messages_flattens_gradio_parts():
    history = [
        {"role": "user", "metadata": None, "content": [{"type": "text", "text": "hi"}], "options": None},
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "metadata": {"title": "note"}, "content": "not sent"},
    ]
    assert history_to_messages(history) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello\nthere"},
    ]


def test_chat_body_fields():
    params = ChatParams(max_tokens=12, temperature=0.0, top_k=5, seed=7, stop=["\n"], system_prompt="Be brief.")
    body = build_chat_body("tiny-random-llama", "Why?", [{"role": "user", "content": "Hi"}], params)
    assert body["model"] == "tiny-random-llama"
    assert body["stream"] is True
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Why?"},
    ]
    expected = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_k": 5, "min_p": 0.0,
                "repetition_penalty": 1.0, "seed": 7, "stop": ["\n"]}
    for name, value in expected.items():
        assert body[name] == value, name


def test_chat_body_without_stop_sends_null():
    body = build_chat_body("m", "Hi", [], ChatParams())
    assert body["stop"] is None
    assert body["seed"] is None
    assert body["messages"] == [{"role": "user", "content": "Hi"}]

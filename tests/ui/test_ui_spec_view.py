"""The figures panel's reply colored by token origin and its speculative decoding statistics."""

from __future__ import annotations

import re

from molten.engine.events import TokenEvent
from molten.engine.spec_decode.stats import SpecDecodeStats
from molten.ui.spec_view import (
    ORIGIN_COLORS,
    colored_reply_html,
    format_accepted_length_histogram,
    format_origin_markdown,
    format_spec_markdown,
)
from molten.ui.stats import ReplyStats

SPAN = re.compile(r'<span title="([^"]+)" style="background:(#[0-9a-f]{6});[^"]*">(.*?)</span>')


def reply(tokens: list[tuple[str, str]], spec_stats: SpecDecodeStats | None = None) -> ReplyStats:
    """A ReplyStats fed one TokenEvent per (text, origin); `spec_stats` rides on the last one."""
    stats = ReplyStats()
    for index, (text, origin) in enumerate(tokens):
        is_last = index == len(tokens) - 1
        stats.add_event(TokenEvent(
            request_id="r", seq_index=0, token_id=index, text=text, logprob=None, top_logprobs=None,
            time_since_arrival_ms=10.0 * (index + 1), step_id=index, batch_size=1, origin=origin, index=index,
            finish_reason="stop" if is_last else None, num_prompt_tokens=4,
            spec_stats=spec_stats if is_last else None,
        ))
    return stats


def test_each_token_gets_its_origin_color():
    stats = reply([("Hi", "prefill"), (" there", "draft-accepted"), ("!", "recovered"), ("\n", "bonus"), ("x", "decode")])
    spans = SPAN.findall(colored_reply_html(stats))
    assert [origin for origin, _, _ in spans] == ["prefill", "draft-accepted", "recovered", "bonus", "decode"]
    assert [color for _, color, _ in spans] == [ORIGIN_COLORS[origin] for origin, _, _ in spans]
    assert spans[3][2] == "⏎<br>"


def test_markup_in_token_text_is_escaped():
    stats = reply([("<b>", "prefill"), ("*a*_", "decode"), ("", "decode")])
    texts = [text for _, _, text in SPAN.findall(colored_reply_html(stats))]
    assert texts == ["&#60;b&#62;", "&#42;a&#42;&#95;", "∅"]


def test_panel_has_legend_and_spec_section_with_speculation():
    spec = SpecDecodeStats(3)
    spec.record(3, 3, 4)
    spec.record(3, 1, 2)
    markdown = format_origin_markdown(reply([("a", "prefill"), ("b", "draft-accepted"), ("c", "bonus")], spec))
    legend_origins = [origin for origin, _, _ in SPAN.findall(markdown)][: len(ORIGIN_COLORS)]
    assert legend_origins == list(ORIGIN_COLORS)
    assert "Acceptance rate | 66.7% (4 of 6 drafts)" in markdown
    assert "Mean accepted length | 2.00 of 3" in markdown
    assert " 0 accepted |  0" in markdown


def test_panel_without_speculation_or_tokens():
    assert format_origin_markdown(ReplyStats()) == ""
    markdown = format_origin_markdown(reply([("a", "prefill"), ("b", "decode")]))
    assert "Reply by token origin" in markdown
    assert "Speculative decoding" not in markdown
    assert format_spec_markdown(SpecDecodeStats(4)) == "", "no verification, no section"


def test_histogram_bars_scale_to_the_largest_count():
    spec = SpecDecodeStats(2)
    for accepted in (0, 2, 2, 2, 2):
        spec.record(2, accepted, accepted + 1)
    lines = format_accepted_length_histogram(spec).splitlines()
    assert lines == [" 0 accepted | █████ 1", " 1 accepted |  0", " 2 accepted | ████████████████████ 4"]


def test_kv_view_shows_memory_saved_by_sharing():
    from molten.ui.kv_view import render_kv_html

    worker = {
        "role": "colocated", "num_blocks": 40, "num_free_blocks": 33, "num_cached_free_blocks": 0, "kv_block_size": 16,
        "num_running": 2, "num_waiting": 0, "num_shared_blocks": 2, "num_saved_blocks": 2, "saved_kv_bytes": 3 * 1024 * 1024,
        "sequences": [
            {"request_id": "cmpl-n2", "status": "running", "num_tokens": 40, "num_computed_tokens": 39,
             "block_table": [0, 1, 2]},
            {"request_id": "cmpl-n2", "status": "running", "num_tokens": 40, "num_computed_tokens": 39,
             "block_table": [0, 1, 5]},
        ],
    }
    assert "Sharing saves 3.0 MiB (2 blocks) against a copy per sequence." in render_kv_html({"workers": [worker]})
    assert "Sharing saves" not in render_kv_html({"workers": [worker | {"saved_kv_bytes": 0, "num_saved_blocks": 0}]})

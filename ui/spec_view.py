"""The reply's tokens colored by origin, and its acceptance statistics under speculative decoding.

Each token carries how the engine produced it (`TokenEvent.origin`): sampled after the
prompt (`prefill`), one target step for one token (`decode`), a draft the target
verified (`draft-accepted`), sampled in place of the first rejected draft
(`recovered`), sampled after every draft was accepted (`bonus`), or streamed from the
best beam once beam search ended (`beam`). The sections below are Markdown with inline
HTML, appended to the playground's figures panel. This module has no Gradio import.
"""

from __future__ import annotations

import html

from molten.ui.stats import ReplyStats

from molten.engine.spec_decode.stats import SpecDecodeStats

ORIGIN_COLORS = {
    "prefill": "#9ca3af",
    "decode": "#93c5fd",
    "draft-accepted": "#86efac",
    "recovered": "#fdba74",
    "bonus": "#d8b4fe",
    "beam": "#67e8f9",
}
"""Background color of a token of each origin; light, so dark text stays readable."""

UNKNOWN_ORIGIN_COLOR = "#e5e7eb"

TEXT_ENTITIES = str.maketrans({char: f"&#{ord(char)};" for char in "&<>\"'\\`*_[]#~|"})
"""Characters HTML or Markdown would read as markup inside the spans, written as entities instead."""

HISTOGRAM_BAR_WIDTH = 20
"""Characters of the longest bar in the accepted-length histogram."""


def _token_span(text: str, origin: str) -> str:
    color = ORIGIN_COLORS.get(origin, UNKNOWN_ORIGIN_COLOR)
    # Empty deltas (half a UTF-8 character, held-back text) still get a mark, so every token shows.
    shown = text.translate(TEXT_ENTITIES).replace("\n", "⏎<br>") if text else "∅"
    return (
        f'<span title="{html.escape(origin)}" '
        f'style="background:{color};color:#111827;border-radius:3px;padding:0 1px;white-space:pre-wrap">{shown}</span>'
    )


def origin_legend_html(origins: list[str] | None = None) -> str:
    """One colored sample per origin; every known origin unless `origins` narrows it."""
    shown = [origin for origin in ORIGIN_COLORS if origins is None or origin in origins]
    return " ".join(_token_span(origin, origin) for origin in shown)


def colored_reply_html(stats: ReplyStats) -> str:
    """The reply's text with each token on the background color of its origin; hover names the origin."""
    return "".join(_token_span(text, origin) for text, origin in zip(stats.token_texts, stats.origins))


def format_accepted_length_histogram(stats: SpecDecodeStats) -> str:
    """A text bar chart: one line per accepted length 0..k with its verification count."""
    counts = stats.accepted_length_histogram
    largest = max(counts, default=0)
    lines = []
    for accepted, count in enumerate(counts):
        bar = "█" * round(HISTOGRAM_BAR_WIDTH * count / largest) if largest else ""
        lines.append(f"{accepted:>2} accepted | {bar} {count}")
    return "\n".join(lines)


def format_spec_markdown(stats: SpecDecodeStats | None) -> str:
    """The request's acceptance statistics as Markdown, or "" when it verified no drafts."""
    if stats is None or stats.num_verifications == 0:
        return ""
    rows = [
        ("Acceptance rate", f"{100.0 * stats.acceptance_rate:.1f}% ({stats.num_accepted_tokens} of {stats.num_draft_tokens} drafts)"),
        ("Mean accepted length", f"{stats.mean_accepted_length:.2f} of {stats.num_speculative_tokens}"),
        ("Tokens per verification", f"{stats.tokens_per_verification:.2f}"),
        ("Verifications", str(stats.num_verifications)),
    ]
    lines = ["#### Speculative decoding", "", "| Figure | Value |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "Accepted drafts per verification:", "", "```", format_accepted_length_histogram(stats), "```"]
    return "\n".join(lines)


def format_origin_markdown(stats: ReplyStats) -> str:
    """The sections appended to the figures panel: the reply by origin, then acceptance statistics.

    Returns "" before the first token, so an idle panel shows only the figures table.
    """
    if not stats.origins:
        return ""
    sections = [
        "",
        "",
        "#### Reply by token origin",
        "",
        origin_legend_html(),
        "",
        colored_reply_html(stats),
    ]
    spec = format_spec_markdown(stats.spec_stats)
    if spec:
        sections += ["", spec]
    return "\n".join(sections)

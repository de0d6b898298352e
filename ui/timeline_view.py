"""The reply's per-token timeline: each token a mark at its time since arrival, colored by origin and batch size.

A long gap between marks is time the reply waited (prefill, the KV handoff, a step shared
with other requests). A change of color shows that the token came from a different kind of
step, or from a step whose batch had more or fewer sequences. This module has no Gradio import.
"""

from __future__ import annotations

import pandas as pd

from molten.ui.stats import ReplyStats

TIMELINE_COLUMNS = ("time_ms", "token", "origin_batch", "origin", "batch_size", "step_id", "text", "gap_ms")


def origin_batch_label(origin: str, batch_size: int) -> str:
    """Name the color group of a token, e.g. `decode, batch 3`."""
    return f"{origin}, batch {batch_size}"


def visible_text(text: str) -> str:
    """Show whitespace and empty deltas in a tooltip, where they would otherwise be invisible."""
    if text == "":
        return "(no text yet)"
    return text.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "·")


def token_timeline_frame(stats: ReplyStats) -> pd.DataFrame:
    """Build the timeline's rows: x = ms since the request arrived, y = token index, color = origin and batch size.

    `gap_ms` is the time since the previous token (for token 0, since arrival: the TTFT).
    """
    rows = []
    previous_ms = 0.0
    for index, time_ms in enumerate(stats.token_times_ms):
        origin = stats.origins[index]
        batch_size = stats.batch_sizes[index]
        rows.append((
            round(time_ms, 2),
            index,
            origin_batch_label(origin, batch_size),
            origin,
            batch_size,
            stats.step_ids[index],
            visible_text(stats.token_texts[index]),
            round(time_ms - previous_ms, 2),
        ))
        previous_ms = time_ms
    frame = pd.DataFrame(rows, columns=list(TIMELINE_COLUMNS))
    return frame.astype({
        "time_ms": "float64", "token": "int64", "origin_batch": "string", "origin": "string",
        "batch_size": "int64", "step_id": "int64", "text": "string", "gap_ms": "float64",
    })

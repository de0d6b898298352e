"""The KV cache view: each worker's block pool, every live sequence's block table and the shared prefix blocks.

The input is one worker's entry of `MoltenIngress.kv_state()`: the block manager's counts
(`num_blocks`, `num_free_blocks`, `num_cached_free_blocks`, `kv_block_size`,
`prefix_cache_hit_rate`), optionally `cached_free_block_ids` (free blocks that still hold a
cached prefix's KV) and, per live sequence, its `block_table`. A block listed in more
than one block table is shared: the prefix cache mapped both sequences' identical prompt
prefix to the same physical block. The output is HTML for Gradio's `gr.HTML`, built with
inline styles so it needs no stylesheet. This module has no Gradio import.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from molten.ui.stats import format_bytes

MAX_POOL_CELLS = 512
"""Most cells drawn for one pool. A larger pool draws one cell per group of consecutive blocks,
so the page stays light whatever the KV cache size."""

SEQUENCE_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f")
FREE_COLOR = "#e3e3e3"
SHARED_COLOR = "#d62728"
CACHED_COLOR = "repeating-linear-gradient(135deg, #e3e3e3 0 2px, #7f7f7f 2px 4px)"
"""Grey stripes: a free block that still contains a cached prefix's KV. A matching prompt reuses
it, and the pool evicts it when it needs a fresh block."""

CELL_STYLE = "display:inline-block;width:11px;height:11px;margin:1px;border-radius:2px;vertical-align:middle"
TABLE_CELL_STYLE = (
    "display:inline-block;min-width:26px;padding:1px 3px;margin:1px;border-radius:3px;"
    "font:11px monospace;text-align:center;color:#fff"
)


@dataclass
class BlockMap:
    """The live sequences that reference each physical KV block of one worker."""

    num_blocks: int
    owners: dict[int, list[str]] = field(default_factory=dict)
    """Block id to the request ids whose block tables list it. Blocks absent here are free."""
    cached_free: set[int] = field(default_factory=set)
    """Free blocks that still hold a cached prefix's KV (empty when the engine does not list them)."""

    @property
    def shared_blocks(self) -> list[int]:
        return sorted(block for block, owners in self.owners.items() if len(owners) > 1)

    @property
    def num_referenced_blocks(self) -> int:
        return len(self.owners)


def build_block_map(state: Mapping[str, Any]) -> BlockMap:
    """Collect, for every block id in any live sequence's block table, the sequences that reference it."""
    block_map = BlockMap(num_blocks=int(state.get("num_blocks") or 0))
    block_map.cached_free = {int(block) for block in state.get("cached_free_block_ids") or []}
    for sequence in state.get("sequences") or []:
        request_id = str(sequence.get("request_id"))
        for block in sequence.get("block_table") or []:
            owners = block_map.owners.setdefault(int(block), [])
            if request_id not in owners:
                owners.append(request_id)
    return block_map


def sequence_colors(state: Mapping[str, Any]) -> dict[str, str]:
    """Give each live sequence a color, in the order the engine lists them."""
    request_ids = [str(sequence.get("request_id")) for sequence in state.get("sequences") or []]
    return {request_id: SEQUENCE_COLORS[index % len(SEQUENCE_COLORS)] for index, request_id in enumerate(request_ids)}


def block_color(owners: Sequence[str], colors: Mapping[str, str], cached: bool = False) -> str:
    if not owners:
        return CACHED_COLOR if cached else FREE_COLOR
    if len(owners) > 1:
        return SHARED_COLOR
    return colors.get(owners[0], SEQUENCE_COLORS[0])


def pool_cells(block_map: BlockMap, colors: Mapping[str, str]) -> list[tuple[str, str]]:
    """Return (color, tooltip) per pool cell, where each cell is `ceil(num_blocks / MAX_POOL_CELLS)` blocks.

    A grouped cell takes the color of its most telling block: shared, then in use, then
    holding cached prefix KV, then free.
    """
    group = max(1, math.ceil(block_map.num_blocks / MAX_POOL_CELLS))
    cells = []
    for first in range(0, block_map.num_blocks, group):
        blocks = range(first, min(first + group, block_map.num_blocks))
        owners_per_block = [block_map.owners.get(block, []) for block in blocks]
        shared = [owners for owners in owners_per_block if len(owners) > 1]
        used = [owners for owners in owners_per_block if owners]
        cached = [block for block in blocks if block in block_map.cached_free and not block_map.owners.get(block)]
        chosen: list[str] = []
        if shared:
            chosen = shared[0]
        elif used:
            chosen = used[0]
        if group == 1:
            label = f"block {first}"
        else:
            label = f"blocks {first}–{blocks[-1]} ({len(used)} in use"
            label += f", {len(cached)} holding cached prefix KV)" if cached else ")"
        if len(chosen) > 1:
            label += ": shared by " + ", ".join(chosen)
        elif chosen:
            label += f": {chosen[0]}"
        elif cached:
            label += ": free, holds cached prefix KV (reusable until evicted)"
        else:
            label += ": free"
        cells.append((block_color(chosen, colors, cached=bool(cached)), label))
    return cells


def _cell(color: str, tooltip: str) -> str:
    return f'<span style="{CELL_STYLE};background:{color}" title="{html.escape(tooltip)}"></span>'


def _legend(state: Mapping[str, Any], colors: Mapping[str, str]) -> str:
    """Name every color of the pool map: the three block states, then one color per live sequence."""
    if "cached_free_block_ids" in state:
        cached_label = "free, still holds cached prefix KV (a matching prompt reuses it; evicted when needed)"
    else:
        cached_label = (f"free, still holds cached prefix KV ({int(state.get('num_cached_free_blocks') or 0)} blocks; "
                        "this engine does not list which, so the map draws them as free)")
    items = [(FREE_COLOR, "free, empty"), (CACHED_COLOR, cached_label),
             (SHARED_COLOR, "shared by several sequences (prefix cache or n > 1)")]
    states = " ".join(f"{_cell(color, label)} {html.escape(label)}" for color, label in items)
    if colors:
        sequences = " ".join(f"{_cell(color, request_id)} <code>{html.escape(request_id)}</code>"
                             for request_id, color in colors.items())
    else:
        sequences = "none"
    return f"{states}<br>Live sequences (one color each, in use by that sequence alone): {sequences}"


def _summary(state: Mapping[str, Any], block_map: BlockMap) -> str:
    num_blocks = block_map.num_blocks
    num_free = int(state.get("num_free_blocks") or 0)
    num_cached_free = int(state.get("num_cached_free_blocks") or 0)
    in_use = num_blocks - num_free
    percent = 100.0 * in_use / num_blocks if num_blocks else 0.0
    hit_rate = state.get("prefix_cache_hit_rate")
    hit_text = "–" if hit_rate is None else f"{100.0 * float(hit_rate):.0f}%"
    return (
        f"<b>{html.escape(str(state.get('role', 'worker')))} worker</b>: {in_use} of {num_blocks} blocks in use "
        f"({percent:.1f}%), {len(block_map.shared_blocks)} shared; {num_free} free, of which {num_cached_free} "
        f"still hold cached prefix KV; kv_block_size {state.get('kv_block_size', '?')} tokens; prefix-cache hit "
        f"rate {hit_text}; {state.get('num_running', 0)} running, {state.get('num_waiting', 0)} waiting."
        + _saved_text(state)
    )


def _saved_text(state: Mapping[str, Any]) -> str:
    """Describe the memory that shared blocks (prefix cache, n > 1 forks) save now against separate copies."""
    saved_bytes = int(state.get("saved_kv_bytes") or 0)
    if not saved_bytes:
        return ""
    return (
        f" Sharing saves {format_bytes(saved_bytes)} ({int(state.get('num_saved_blocks') or 0)} blocks) "
        "against a copy per sequence."
    )


def _block_table_rows(state: Mapping[str, Any], block_map: BlockMap, colors: Mapping[str, str]) -> str:
    sequences = state.get("sequences") or []
    if not sequences:
        return (
            "<p><i>No live sequences: every block is free or holds cached prefix KV. A reply's blocks are in use "
            "only while it is generated; when it ends, its full blocks stay as cached prefix KV.</i></p>"
        )
    kv_block_size = int(state.get("kv_block_size") or 1)
    rows = [
        "<table style='border-collapse:collapse;font-size:12px'><tr><th align=left>request</th>"
        "<th align=left>status</th><th align=right>computed / total tokens</th>"
        "<th align=left>block table (logical block → physical block id)</th></tr>"
    ]
    for sequence in sequences:
        request_id = str(sequence.get("request_id"))
        cells = []
        for logical, block in enumerate(sequence.get("block_table") or []):
            owners = block_map.owners.get(int(block), [])
            shared = len(owners) > 1
            color = SHARED_COLOR if shared else colors.get(request_id, SEQUENCE_COLORS[0])
            first_token = logical * kv_block_size
            tooltip = f"logical block {logical} (tokens {first_token}–{first_token + kv_block_size - 1}) → block {block}"
            if shared:
                tooltip += ", shared with " + ", ".join(owner for owner in owners if owner != request_id)
            cells.append(
                f'<span style="{TABLE_CELL_STYLE};background:{color}" title="{html.escape(tooltip)}">{int(block)}</span>'
            )
        rows.append(
            f"<tr><td><code>{html.escape(request_id)}</code></td><td>{html.escape(str(sequence.get('status')))}</td>"
            f"<td align=right>{sequence.get('num_computed_tokens')} / {sequence.get('num_tokens')}</td>"
            f"<td>{''.join(cells)}</td></tr>"
        )
    rows.append("</table>")
    return "".join(rows)


def render_worker_kv_html(state: Mapping[str, Any]) -> str:
    """Render one worker's pool map and block tables as HTML."""
    block_map = build_block_map(state)
    colors = sequence_colors(state)
    cells = "".join(_cell(color, tooltip) for color, tooltip in pool_cells(block_map, colors))
    group = max(1, math.ceil(block_map.num_blocks / MAX_POOL_CELLS))
    scale_note = "" if group == 1 else f" Each cell stands for {group} consecutive blocks."
    return (
        f"<div style='margin-bottom:12px'><p>{_summary(state, block_map)}</p>"
        f"<p style='font-size:12px'>Pool map, block 0 at the top left.{scale_note}<br>{_legend(state, colors)}</p>"
        f"<div style='line-height:0;max-width:760px'>{cells}</div>"
        f"{_block_table_rows(state, block_map, colors)}</div>"
    )


def render_kv_html(kv: Mapping[str, Any] | None, error: str | None = None) -> str:
    """Render every worker's KV cache from `MoltenIngress.kv_state()`, or the reason it is unavailable.

    With several models served (`kv["models"]`), each model's workers get a heading.
    """
    if error:
        return f"<p>⚠️ KV cache state unavailable: {html.escape(error)}</p>"
    if not kv or not kv.get("workers"):
        return "<p>No KV cache state yet.</p>"
    models = kv.get("models") or []
    if len(models) <= 1:
        return "".join(render_worker_kv_html(state) for state in kv["workers"])
    parts = []
    for model in models:
        parts.append(f"<h4>Model <code>{html.escape(str(model.get('model')))}</code> ({html.escape(str(model.get('mode')))})</h4>")
        parts += [render_worker_kv_html(state) for state in model.get("workers") or []]
    return "".join(parts)

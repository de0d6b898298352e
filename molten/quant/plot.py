"""PNG plot of a precision comparison, drawn on a matplotlib Figure without pyplot state."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from molten.quant.compare import PrecisionComparison


def save_comparison_plot(comparison: PrecisionComparison, path: str | Path) -> None:
    """Write four bar charts (weight MB, decode tokens/s, perplexity, logprob drift) to `path`."""
    rows = [row for row in comparison.rows if row.error is None]
    names = [row.precision for row in rows]
    positions = list(range(len(rows)))
    figure = Figure(figsize=(10, 7))
    axes = figure.subplots(2, 2)
    figure.suptitle(f"Precision variants of {comparison.model}")

    memory = axes[0][0]
    memory.bar(positions, [(row.weight_bytes or 0) / 1e6 for row in rows], color="tab:blue")
    memory.set_title("weight memory (MB)")

    speed = axes[0][1]
    width = 0.4
    speed.bar([p - width / 2 for p in positions], [row.single_stream_tokens_per_s or 0 for row in rows],
              width, label="single stream")
    speed.bar([p + width / 2 for p in positions], [row.batched_tokens_per_s or 0 for row in rows],
              width, label=f"batch of {comparison.settings.batch_size}")
    speed.set_title("decode tokens/s")
    speed.legend()

    perplexity = axes[1][0]
    perplexity.bar(positions, [row.perplexity or 0 for row in rows], color="tab:green")
    perplexity.set_title(f"perplexity ({comparison.num_corpus_tokens} corpus tokens)")

    drift = axes[1][1]
    drift.bar(positions, [row.logprob_drift_mean or 0 for row in rows], color="tab:red")
    drift.set_title("mean |logprob - logprob fp32| (nats)")

    for axis in (memory, speed, perplexity, drift):
        axis.set_xticks(positions, names)
    figure.tight_layout()
    figure.savefig(Path(path), format="png", dpi=100)

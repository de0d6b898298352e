"""PNG plots for experiment records, drawn with matplotlib's non-interactive Agg backend."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def figure_to_png(figure: Figure) -> bytes:
    """Render `figure` as PNG bytes and close it."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def two_panel_plot(
    title: str,
    x_label: str,
    x_values: Sequence[float],
    left: tuple[str, dict[str, Sequence[float]]],
    right: tuple[str, dict[str, Sequence[float]]],
    *,
    log_x: bool = False,
) -> bytes:
    """Draw two line charts side by side over the same x values; each panel is (y label, {series: ys})."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (y_label, series) in zip(axes, (left, right)):
        for name, values in series.items():
            axis.plot(list(x_values), list(values), marker="o", label=name)
        axis.set_xlabel(x_label)
        axis.set_ylabel(y_label)
        if log_x:
            axis.set_xscale("log", base=2)
        axis.grid(True, alpha=0.3)
        if len(series) > 1:
            axis.legend(fontsize=8)
    figure.suptitle(title)
    return figure_to_png(figure)


def grouped_bar_plot(title: str, labels: Sequence[str], panels: list[tuple[str, Sequence[float]]]) -> bytes:
    """Draw one bar chart per panel, (y label, values), with a bar per label."""
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    if len(panels) == 1:
        axes = [axes]
    for axis, (y_label, values) in zip(axes, panels):
        axis.bar(range(len(labels)), list(values))
        axis.set_xticks(range(len(labels)), list(labels), rotation=30, ha="right", fontsize=8)
        axis.set_ylabel(y_label)
        axis.grid(True, axis="y", alpha=0.3)
    figure.suptitle(title)
    return figure_to_png(figure)

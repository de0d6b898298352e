"""The results page: markdown tables, ratio lines and matplotlib plots (PNG, Agg backend).

Workload modules describe what to show as `Section`s of `Table`s and `Plot`s. This
module is the only one that formats them, for the terminal and for `docs/benchmarks.md`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    title: str = ""
    note: str = ""
    """Paragraph shown between the title and the table: what was run and how to read it."""


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    dashed: bool = False


@dataclass
class Plot:
    filename: str
    """PNG file name, written into the plot folder."""
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    log_x: bool = False


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    ratios: list[str] = field(default_factory=list)
    """Lines such as `Molten engine float32 / transformers float32 = 1.3x`."""
    plots: list[Plot] = field(default_factory=list)


@dataclass
class BenchReport:
    command: str
    date: str
    hardware: str
    notes: list[str]
    sections: list[Section]


def format_number(value: float | None, digits: int = 1) -> str:
    """Format a figure for a table cell; `-` when there is none."""
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def format_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or not denominator:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def render_table_markdown(table: Table) -> str:
    lines = []
    if table.title:
        lines += [f"**{table.title}**", ""]
    if table.note:
        lines += [table.note, ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("| " + " | ".join("---" for _ in table.columns) + " |")
    for row in table.rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def render_table_text(table: Table) -> str:
    """Align a table in fixed-width columns for the terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(table.columns, *table.rows)]
    lines = [table.title] if table.title else []
    for row in [table.columns, *table.rows]:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


def render_console(report: BenchReport) -> str:
    parts = []
    for section in report.sections:
        parts.append(f"== {section.title} ==")
        parts.extend(render_table_text(table) for table in section.tables)
        parts.extend(section.ratios)
        parts.append("")
    return "\n".join(parts)


def render_markdown(report: BenchReport, plot_folder: str) -> str:
    """Build the page; images are linked relative to the page as `plot_folder/<file>`."""
    lines = [
        "# Benchmarks",
        "",
        "Produced by:",
        "",
        "```",
        report.command,
        "```",
        "",
        f"Date: {report.date}",
        "",
        f"Hardware: {report.hardware}",
        "",
    ]
    for note in report.notes:
        lines += [note, ""]
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        for table in section.tables:
            lines += [render_table_markdown(table), ""]
        if section.ratios:
            lines += [f"- {ratio}" for ratio in section.ratios]
            lines.append("")
        for plot in section.plots:
            lines += [f"![{plot.title}]({plot_folder}/{plot.filename})", ""]
    return "\n".join(lines).rstrip() + "\n"


def draw_plot(plot: Plot, folder: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    for series in plot.series:
        style = {"linestyle": "--", "marker": ""} if series.dashed else {"linestyle": "-", "marker": "o"}
        axes.plot(series.xs, series.ys, label=series.label, **style)
    if plot.log_x:
        # Label the measured points in plain numbers instead of powers of two.
        axes.set_xscale("log", base=2)
        ticks = sorted({x for series in plot.series for x in series.xs})
        axes.set_xticks(ticks, [f"{tick:g}" for tick in ticks])
        axes.minorticks_off()
    axes.set_title(plot.title)
    axes.set_xlabel(plot.xlabel)
    axes.set_ylabel(plot.ylabel)
    axes.grid(True, alpha=0.3)
    if plot.series:
        axes.legend(fontsize="small")
    figure.tight_layout()
    path = folder / plot.filename
    figure.savefig(path)
    plt.close(figure)
    return path


def write_report(report: BenchReport, output: Path, plot_dir: Path) -> list[Path]:
    """Write the markdown page to `output` and every plot into `plot_dir`; return the written paths."""
    output.parent.mkdir(parents=True, exist_ok=True)
    written = []
    plots = [plot for section in report.sections for plot in section.plots]
    if plots:
        plot_dir.mkdir(parents=True, exist_ok=True)
        written += [draw_plot(plot, plot_dir) for plot in plots]
    folder = Path(os.path.relpath(plot_dir, output.parent)).as_posix()
    output.write_text(render_markdown(report, folder))
    written.append(output)
    return written

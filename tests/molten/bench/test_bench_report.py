"""The results page writer: markdown tables, ratio lines and PNG plots."""

from __future__ import annotations

from pathlib import Path

from molten.bench.report import (
    BenchReport,
    Plot,
    Section,
    Series,
    Table,
    format_number,
    format_ratio,
    render_console,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_report() -> BenchReport:
    section = Section(
        title="Single stream",
        paragraphs=["One request at a time."],
        tables=[Table(["system", "tokens/s"], [["Molten engine", "42.0"], ["a|b", "1.0"]])],
        ratios=["Molten engine float32 / transformers float32 = 1.30x"],
        plots=[Plot("throughput.png", "Throughput", "batch", "tokens/s",
                    [Series("Molten", [1, 4, 16], [10.0, 30.0, 80.0]), Series("roofline", [1, 16], [50, 90], True)],
                    log_x=True)],
    )
    return BenchReport(command="molten bench --quick", date="2026-01-01 12:00 UTC", hardware="CPU test",
                       notes=["Quick run."], sections=[section])


def test_write_report_markdown_and_png(tmp_path: Path):
    output = tmp_path / "docs" / "benchmarks.md"
    plot_dir = tmp_path / "docs" / "benchmarks"
    written = write_report(make_report(), output, plot_dir)

    assert output in written
    assert plot_dir / "throughput.png" in written
    assert (plot_dir / "throughput.png").read_bytes().startswith(PNG_SIGNATURE)
    page = output.read_text()
    assert "```\nmolten bench --quick\n```" in page
    assert "Hardware: CPU test" in page
    assert "| system | tokens/s |\n| --- | --- |\n| Molten engine | 42.0 |" in page
    assert "| a\\|b | 1.0 |" in page
    assert "- Molten engine float32 / transformers float32 = 1.30x" in page
    assert "![Throughput](benchmarks/throughput.png)" in page


def test_write_report_without_plots_creates_no_folder(tmp_path: Path):
    report = make_report()
    report.sections[0].plots = []
    write_report(report, tmp_path / "page.md", tmp_path / "page")
    assert (tmp_path / "page.md").exists()
    assert not (tmp_path / "page").exists()


def test_render_console_aligns_columns():
    text = render_console(make_report())
    assert "== Single stream ==" in text
    assert "system         tokens/s" in text
    assert "Molten engine  42.0" in text


def test_number_and_ratio_formatting():
    assert format_number(None) == "-"
    assert format_number(1234.567) == "1,234.6"
    assert format_number(0.5, 0) == "0"
    assert format_ratio(3.0, 2.0) == "1.50x"
    assert format_ratio(None, 2.0) == "n/a"
    assert format_ratio(1.0, 0.0) == "n/a"

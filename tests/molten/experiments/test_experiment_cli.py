"""`molten experiment`: run a stage, list, show, compare, export and import, and errors as one line."""

from __future__ import annotations

import pytest

from molten.cli import main
from molten.experiments.record import list_records


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    """A records folder holding two quick context-length runs made through the command."""
    root = tmp_path_factory.mktemp("records")
    for _ in range(2):
        assert main(["experiment", "context-length", "--quick", "--threads", "1", "--dir", str(root)]) == 0
    return root


def record_ids(root) -> list[str]:
    return [record.record_id for record in list_records(root)]


def test_stage_command_prints_table(tmp_path, capsys):
    code = main([
        "experiment", "context-length", "--quick", "--threads", "1", "--model", "tiny-random-qwen2",
        "--set", "context_lengths=16,32", "--dir", str(tmp_path),
    ])
    output = capsys.readouterr()
    assert code == 0
    assert "| prompt tokens | TTFT ms |" in output.out
    assert "[molten] context 32 tokens" in output.err
    (record,) = list_records(tmp_path)
    assert record.settings["model"] == "tiny-random-qwen2"
    assert record.settings["context_lengths"] == [16, 32]
    assert record.record_id in output.out


def test_list_show_compare(records_dir, capsys):
    first, second = record_ids(records_dir)
    assert main(["experiment", "list", "--dir", str(records_dir)]) == 0
    listing = capsys.readouterr().out
    assert first in listing
    assert second in listing

    assert main(["experiment", "show", first, "--dir", str(records_dir)]) == 0
    note = capsys.readouterr().out
    assert "## Observations" in note
    assert "KV memory per token = 2 (K and V) x 4 layers" in note

    assert main(["experiment", "compare", first, second, "--dir", str(records_dir)]) == 0
    table = capsys.readouterr().out
    assert f"| figure | {first} | {second} |" in table
    assert "| kv_bytes_per_token | 1024 | 1024 |" in table


def test_export_then_import(records_dir, tmp_path, capsys):
    first = record_ids(records_dir)[0]
    archive = tmp_path / "shared.zip"
    assert main(["experiment", "export", first, "--output", str(archive), "--dir", str(records_dir)]) == 0
    assert archive.is_file()
    elsewhere = tmp_path / "friend"
    assert main(["experiment", "import", str(archive), "--dir", str(elsewhere)]) == 0
    assert f"imported {first}" in capsys.readouterr().out
    assert record_ids(elsewhere) == [first]


def test_errors_exit_with_one_line(tmp_path, capsys):
    assert main(["experiment", "show", "missing-record", "--dir", str(tmp_path)]) == 1
    assert "molten: error: experiment record 'missing-record' was not found" in capsys.readouterr().err
    assert main(["experiment", "batch-size", "--quick", "--set", "batch_sizes", "--dir", str(tmp_path)]) == 1
    assert "--set expects FIELD=VALUE" in capsys.readouterr().err
    assert main(["experiment", "compare", "only-one", "--dir", str(tmp_path)]) == 1
    assert list_records(tmp_path) == []


def test_stages_and_help(capsys):
    assert main(["experiment", "stages"]) == 0
    output = capsys.readouterr().out
    for name in ("model-size", "quantization", "batch-size", "context-length", "disaggregation", "speculative",
                 "parallel-sampling"):
        assert name in output
    assert main(["experiment"]) == 2

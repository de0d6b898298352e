"""`molten bench` options as the molten CLI parses them."""

from __future__ import annotations

from pathlib import Path

import pytest

from molten.cli import build_parser


def test_bench_defaults():
    args = build_parser().parse_args(["bench"])
    assert args.workloads == ["single", "concurrent", "shared-prefix", "long-context", "disagg"]
    assert args.doors == ["engine", "handle", "http"]
    assert args.output == Path("docs/benchmarks.md")
    assert args.quick is False
    assert args.dtypes is None


def test_bench_parses_lists():
    args = build_parser().parse_args(
        ["bench", "--workloads", "single, concurrent", "--doors", "engine,http", "--quick", "--dtypes", "float32"]
    )
    assert args.workloads == ["single", "concurrent"]
    assert args.doors == ["engine", "http"]
    assert args.dtypes == ["float32"]
    assert args.quick is True


def test_bench_rejects_unknown_workload(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--workloads", "single,warp"])
    assert exit_info.value.code == 2
    assert "unknown name(s) warp" in capsys.readouterr().err


def test_bench_help_mentions_quick_and_duration(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    help_text = capsys.readouterr().out
    assert "--quick" in help_text
    assert "hour or more" in help_text

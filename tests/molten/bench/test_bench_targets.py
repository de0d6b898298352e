"""Target checks: met, missed by how much, and not measured."""

from __future__ import annotations

from molten.bench.targets import TargetResult


def test_at_least_target_met():
    target = TargetResult("speed", 1.5, True, 1.6, "")
    assert target.met is True
    assert target.status == "met"
    assert target.bound_text == ">= 1.5"


def test_at_least_target_missed_reports_factor():
    target = TargetResult("speed", 3.0, True, 1.5, "")
    assert target.met is False
    assert target.status == "missed: needs 2.00x"


def test_at_most_target_missed_reports_factor():
    target = TargetResult("ttft", 1 / 3, False, 0.5, "")
    assert target.met is False
    assert target.status == "missed: needs 1.50x"
    assert target.bound_text == "<= 0.333"


def test_at_most_target_met():
    assert TargetResult("itl", 3.0, False, 2.0, "").status == "met"


def test_unmeasured_target():
    target = TargetResult("speed", 1.0, True, None, "llama.cpp: not installed")
    assert target.met is None
    assert target.status == "not measured"

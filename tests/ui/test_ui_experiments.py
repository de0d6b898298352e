"""The Experiments tab's handlers: run a stage, open, annotate, compare, export and import records."""

from __future__ import annotations

import zipfile

import gradio as gr
import pytest
from PIL import Image

from molten.experiments.record import load_record
from molten.ui.experiments_tab import ExperimentsController, build_experiments_tab, parse_settings_text


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    """A controller over a fresh folder holding two quick batch-size runs made through the tab's handler."""
    controller = ExperimentsController(tmp_path_factory.mktemp("ui-records"))
    for _ in range(2):
        outputs = list(controller.run_stage("batch-size", True, "", "batch_sizes=1,2", 1))
        log, table, dropdown = outputs[-1]
        assert "Done: record" in log, log
        assert "batch size 2" in log
    return controller


def test_run_stage_lists_and_selects(controller):
    table = controller.records_frame()
    assert len(table) == 2
    assert list(table["stage"]) == ["batch-size", "batch-size"]
    newest = controller.record_ids()[0]
    dropdown = controller.record_choices(newest)
    assert dropdown.value == newest


def test_open_record_shows_table_plot_note(controller):
    note, table, plot, observations = controller.open_outputs(controller.record_ids()[0])
    assert list(table["batch size"]) == [1, 2]
    assert isinstance(plot, Image.Image)
    assert "What to expect, and why" in note
    assert "## Observations" not in note
    assert observations == ""


def test_save_observations_round_trip(controller):
    record_id = controller.record_ids()[0]
    status, table = controller.save_observations(record_id, "Batch 2 nearly doubled tokens/s.")
    assert status.startswith("Saved observations")
    assert load_record(record_id, controller.root).observations == "Batch 2 nearly doubled tokens/s."
    assert controller.open_outputs(record_id)[3] == "Batch 2 nearly doubled tokens/s."
    assert "yes" in list(table["observations"])


def test_compare_two_records(controller):
    first, second = controller.record_ids()
    status, frame, plots = controller.compare([first, second])
    assert status == "Comparing 2 records."
    assert list(frame.columns) == ["figure", first, second]
    assert "throughput_gain" in list(frame["figure"])
    assert [caption for _, caption in plots] == [first, second]
    assert all(isinstance(image, Image.Image) for image, _ in plots)
    status, _, plots = controller.compare([first])
    assert "at least two" in status
    assert plots == []


def test_export_then_import(controller):
    record_id = controller.record_ids()[0]
    status, path = controller.export(record_id)
    assert record_id in status
    assert zipfile.is_zipfile(path)
    status, table, open_choices, compare_choices = controller.import_file(path)
    assert status == f"Imported {record_id}-import2."
    assert len(table) == 3
    imported = load_record(f"{record_id}-import2", controller.root)
    assert imported.observations == load_record(record_id, controller.root).observations
    status, *_ = controller.import_file(None)
    assert "Choose a .zip file" in status


def test_run_stage_reports_errors(tmp_path):
    controller = ExperimentsController(tmp_path)
    log, _, _ = list(controller.run_stage("batch-size", True, "", "no_such_field=3", 1))[-1]
    assert "Error: stage 'batch-size' has no setting 'no_such_field'" in log
    log, _, _ = list(controller.run_stage("batch-size", True, "", "not a pair", 1))[-1]
    assert "FIELD=VALUE" in log
    assert controller.record_ids() == []


def test_describe_stage_lists_settings():
    text = ExperimentsController().describe_stage("parallel-sampling")
    assert "Stage 7" in text
    assert "`n_values`" in text


def test_parse_settings_text():
    assert parse_settings_text("a=1\n\n# comment\nb = x,y\n") == {"a": "1", "b": "x,y"}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_settings_text("oops")


def test_tab_builds_inside_blocks(tmp_path):
    with gr.Blocks() as blocks:
        controller = build_experiments_tab(tmp_path)
    assert isinstance(blocks, gr.Blocks)
    assert controller.root == tmp_path

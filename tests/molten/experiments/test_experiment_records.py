"""Experiment records: save and load, observations, export and import as one zip file, comparison."""

from __future__ import annotations

import json
import zipfile

import pytest

from molten.experiments.plotting import two_panel_plot
from molten.experiments.record import (
    EXPORT_SUFFIX,
    FORMAT_VERSION,
    NOTE_FILE,
    OBSERVATIONS_HEADING,
    PLOT_FILE,
    RECORD_FILE,
    ExperimentRecord,
    RecordError,
    compare_records,
    export_record,
    import_record,
    list_records,
    load_record,
    parse_observations,
    save_record,
    update_observations,
)


def make_record(record_id: str = "20260101-000000-batch-size-abcd", created_at: str = "2026-01-01T00:00:00Z",
                tokens_per_s: float = 10.0) -> ExperimentRecord:
    png = two_panel_plot("t", "x", [1, 2], ("a", {"s": [1, 2]}), ("b", {"s": [2, 1]}))
    return ExperimentRecord(
        record_id=record_id,
        stage="batch-size",
        title="Stage 3: Batch size against throughput and latency",
        created_at=created_at,
        duration_s=1.5,
        settings={"model": "tiny-random-llama", "batch_sizes": [1, 2]},
        environment={"cpu": "test cpu", "torch": "2.13"},
        summary={"tokens_per_s_at_batch_1": tokens_per_s, "throughput_gain": 1.8},
        columns=["batch size", "tokens/s"],
        rows=[[1, tokens_per_s], [2, tokens_per_s * 1.8]],
        explanation="## What this measures\n\nA test.",
        observations="",
        plot_png=png,
    )


def test_save_load_round_trip(tmp_path):
    record = make_record()
    directory = save_record(record, tmp_path)
    assert sorted(path.name for path in directory.iterdir()) == [NOTE_FILE, PLOT_FILE, RECORD_FILE]
    loaded = load_record(record.record_id, tmp_path)
    assert loaded == record
    assert loaded.plot_png.startswith(b"\x89PNG")


def test_note_has_observations_field(tmp_path):
    record = make_record()
    save_record(record, tmp_path)
    note = (tmp_path / record.record_id / NOTE_FILE).read_text()
    assert OBSERVATIONS_HEADING in note
    assert "| batch size | tokens/s |" in note
    assert "cpu: test cpu" in note
    assert parse_observations(note) == ""


def test_update_observations_writes_both_files(tmp_path):
    record = make_record()
    save_record(record, tmp_path)
    update_observations(record.record_id, "Throughput doubled.\n", tmp_path)
    data = json.loads((tmp_path / record.record_id / RECORD_FILE).read_text())
    assert data["observations"] == "Throughput doubled."
    assert "Throughput doubled." in (tmp_path / record.record_id / NOTE_FILE).read_text()
    assert load_record(record.record_id, tmp_path).observations == "Throughput doubled."


def test_hand_edited_note_wins(tmp_path):
    record = make_record()
    save_record(record, tmp_path)
    note_file = tmp_path / record.record_id / NOTE_FILE
    head, _, _ = note_file.read_text().partition(OBSERVATIONS_HEADING)
    note_file.write_text(head + OBSERVATIONS_HEADING + "\nEdited in my editor.\n")
    assert load_record(record.record_id, tmp_path).observations == "Edited in my editor."


def test_export_import_round_trip(tmp_path):
    source, target, exports = tmp_path / "a", tmp_path / "b", tmp_path / "exports"
    exports.mkdir()
    record = make_record()
    save_record(record, source)
    update_observations(record.record_id, "Shared with a friend.", source)
    archive = export_record(record.record_id, exports, source)
    assert archive.name == record.record_id + EXPORT_SUFFIX
    assert sorted(zipfile.ZipFile(archive).namelist()) == [NOTE_FILE, PLOT_FILE, RECORD_FILE]
    imported = import_record(archive, target)
    assert imported.record_id == record.record_id
    reloaded = load_record(record.record_id, target)
    assert reloaded.rows == record.rows
    assert reloaded.summary == record.summary
    assert reloaded.settings == record.settings
    assert reloaded.plot_png == record.plot_png
    assert reloaded.observations == "Shared with a friend."


def test_import_collision_gets_new_id(tmp_path):
    record = make_record()
    save_record(record, tmp_path)
    archive = export_record(record.record_id, tmp_path / "out.zip", tmp_path)
    first = import_record(archive, tmp_path)
    second = import_record(archive, tmp_path)
    assert first.record_id == record.record_id + "-import2"
    assert second.record_id == record.record_id + "-import3"
    replaced = import_record(archive, tmp_path, replace=True)
    assert replaced.record_id == record.record_id
    assert len(list_records(tmp_path)) == 3


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"notes.txt": b"hello"}, "contains no record.json"),
        ({RECORD_FILE: b"{not json"}, "not valid JSON"),
        ({RECORD_FILE: json.dumps({"format_version": 99}).encode()}, "format_version"),
        ({RECORD_FILE: json.dumps({"format_version": FORMAT_VERSION, "record_id": "x"}).encode()}, "missing"),
    ],
)
def test_import_rejects_bad_archives(tmp_path, members, message):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for name, data in members.items():
            handle.writestr(name, data)
    with pytest.raises(RecordError, match=message):
        import_record(archive, tmp_path / "records")


def test_import_rejects_unsafe_id_and_bad_png(tmp_path):
    data = make_record().to_json_dict()
    unsafe = dict(data, record_id="../../escape")
    archive = tmp_path / "unsafe.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr(RECORD_FILE, json.dumps(unsafe))
    with pytest.raises(RecordError, match="invalid record id"):
        import_record(archive, tmp_path / "records")
    assert not (tmp_path / "escape").exists()

    not_png = tmp_path / "not_png.zip"
    with zipfile.ZipFile(not_png, "w") as handle:
        handle.writestr(RECORD_FILE, json.dumps(data))
        handle.writestr(PLOT_FILE, b"GIF89a")
    with pytest.raises(RecordError, match="not a PNG"):
        import_record(not_png, tmp_path / "records")


def test_import_rejects_non_zip(tmp_path):
    path = tmp_path / "record.zip"
    path.write_text("plain text")
    with pytest.raises(RecordError, match="not a readable zip"):
        import_record(path, tmp_path)


def test_list_records_newest_first_skips_broken(tmp_path):
    save_record(make_record("old-record", "2026-01-01T00:00:00Z"), tmp_path)
    save_record(make_record("new-record", "2026-02-01T00:00:00Z"), tmp_path)
    broken = tmp_path / "broken-record"
    broken.mkdir()
    (broken / RECORD_FILE).write_text("{")
    assert [record.record_id for record in list_records(tmp_path)] == ["new-record", "old-record"]


def test_load_missing_record(tmp_path):
    with pytest.raises(RecordError, match="not found"):
        load_record("nothing-here", tmp_path)


def test_compare_side_by_side():
    first, second = make_record("first", tokens_per_s=10.0), make_record("second", tokens_per_s=12.5)
    second.summary["only_in_second"] = 3
    columns, rows = compare_records([first, second])
    assert columns == ["figure", "first", "second"]
    by_name = {row[0]: row[1:] for row in rows}
    assert by_name["tokens_per_s_at_batch_1"] == [10.0, 12.5]
    assert by_name["only_in_second"] == ["-", 3]
    assert by_name["setting: model"] == ["tiny-random-llama", "tiny-random-llama"]
    with pytest.raises(RecordError, match="at least two"):
        compare_records([first])

"""Experiment records: what a stage measured, saved so a person can reopen, compare and share it.

A record is one directory under `$MOLTEN_HOME/experiments/<record_id>/`:

    record.json   settings, environment, summary figures, table rows, observations
    plot.png      the stage's plot
    note.md       a Markdown note: what was measured, what to expect and why, the table,
                  and an "Observations" section for the person's own notes

`record.json` is the source of the figures. The observations live in both files: the UI
writes them to both, and a person may edit the section in `note.md` by hand, which
`load_record` prefers when the two differ. A record exports as one `.zip` file holding
the same three files, and imports from it.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the record layout; `load_record` and `import_record` reject other versions."""

RECORD_FILE = "record.json"
PLOT_FILE = "plot.png"
NOTE_FILE = "note.md"
EXPORT_SUFFIX = ".molten-experiment.zip"

OBSERVATIONS_HEADING = "## Observations"
OBSERVATIONS_PLACEHOLDER = "_Write what you noticed here: which figures surprised you, and why._"

MAX_IMPORT_BYTES = 64 * 2**20
"""Largest uncompressed size of one file in an imported archive; records are a few hundred KB."""

_RECORD_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RecordError(ValueError):
    """A record that is missing, unreadable or not in Molten's record format."""


@dataclass
class ExperimentRecord:
    """One run of a learning-path stage."""

    record_id: str
    stage: str
    """Stage name, such as `batch-size`."""
    title: str
    created_at: str
    """UTC time the run finished, ISO 8601."""
    duration_s: float
    settings: dict[str, Any]
    """The stage's settings as run, field name to value."""
    environment: dict[str, Any]
    """Machine and software: CPU, GPU, memory, package versions, load average."""
    summary: dict[str, Any]
    """Headline figures, name to number (units in the name, such as `decode_tokens_per_s`)."""
    columns: list[str]
    """Column names of `rows`."""
    rows: list[list[Any]]
    """The measured table, one list per measured point, in `columns` order."""
    explanation: str
    """Markdown: what the stage measures, what to expect and why."""
    observations: str = ""
    """The person's own notes, edited in the UI or in note.md."""
    plot_png: bytes = field(default=b"", repr=False)
    """The stage's plot as PNG bytes, or empty when the stage drew none."""
    format_version: int = FORMAT_VERSION

    def to_json_dict(self) -> dict[str, Any]:
        """Return everything but the plot, as written to record.json."""
        return {
            "format_version": self.format_version,
            "record_id": self.record_id,
            "stage": self.stage,
            "title": self.title,
            "created_at": self.created_at,
            "duration_s": self.duration_s,
            "settings": self.settings,
            "environment": self.environment,
            "summary": self.summary,
            "columns": self.columns,
            "rows": self.rows,
            "explanation": self.explanation,
            "observations": self.observations,
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], plot_png: bytes = b"") -> ExperimentRecord:
        """Build a record from record.json's content. Raises RecordError naming a missing or invalid field."""
        if not isinstance(data, dict):
            raise RecordError("record.json must contain a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise RecordError(
                f"record format_version is {version!r}, this Molten reads version {FORMAT_VERSION}; "
                "export the record again with a matching Molten version"
            )
        required = ("record_id", "stage", "title", "created_at", "settings", "summary", "columns", "rows")
        missing = [name for name in required if name not in data]
        if missing:
            raise RecordError(f"record.json is missing the field(s) {', '.join(missing)}")
        check_record_id(data["record_id"])
        for name in ("settings", "summary"):
            if not isinstance(data[name], dict):
                raise RecordError(f"record field {name!r} must be a JSON object")
        if not isinstance(data["columns"], list) or not isinstance(data["rows"], list):
            raise RecordError("record fields 'columns' and 'rows' must be JSON arrays")
        return cls(
            record_id=data["record_id"],
            stage=str(data["stage"]),
            title=str(data["title"]),
            created_at=str(data["created_at"]),
            duration_s=float(data.get("duration_s", 0.0)),
            settings=data["settings"],
            environment=data.get("environment") or {},
            summary=data["summary"],
            columns=[str(column) for column in data["columns"]],
            rows=[list(row) for row in data["rows"]],
            explanation=str(data.get("explanation", "")),
            observations=str(data.get("observations", "")),
            plot_png=plot_png,
        )

    def table_markdown(self) -> str:
        """Render `rows` as a Markdown table."""
        return markdown_table(self.columns, self.rows)

    def note_markdown(self) -> str:
        """Render note.md: title, settings, explanation, table, environment and observations."""
        settings = ", ".join(f"`{key}={value}`" for key, value in self.settings.items())
        summary = "\n".join(f"- {key}: {format_value(value)}" for key, value in self.summary.items())
        environment = "\n".join(f"- {key}: {value}" for key, value in self.environment.items())
        observations = self.observations.strip() or OBSERVATIONS_PLACEHOLDER
        parts = [
            f"# {self.title}",
            f"Record `{self.record_id}`, stage `{self.stage}`, finished {self.created_at} "
            f"after {self.duration_s:.1f} s.",
            f"Settings: {settings}",
            self.explanation.strip(),
            "## Results",
            summary,
            self.table_markdown(),
            f"![plot]({PLOT_FILE})" if self.plot_png else "",
            "## Environment",
            environment,
            OBSERVATIONS_HEADING,
            observations,
        ]
        return "\n\n".join(part for part in parts if part) + "\n"


def format_value(value: Any) -> str:
    """Format a table cell: floats to 4 significant digits, large ones as whole numbers with separators."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    header = "| " + " | ".join(columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(format_value(cell) for cell in row) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def parse_observations(note: str) -> str | None:
    """Return the text under the note's Observations heading, or None when the heading is missing.

    The placeholder counts as empty.
    """
    _, heading, rest = note.partition(OBSERVATIONS_HEADING + "\n")
    if not heading:
        return None
    text = rest.strip()
    return "" if text == OBSERVATIONS_PLACEHOLDER else text


def check_record_id(record_id: Any) -> str:
    """Return `record_id` if it is a safe directory name; raise RecordError otherwise."""
    if not isinstance(record_id, str) or not _RECORD_ID_PATTERN.match(record_id) or ".." in record_id:
        raise RecordError(
            f"invalid record id {record_id!r}: use letters, digits, '.', '_' and '-' only (at most 128 characters)"
        )
    return record_id


def new_record_id(stage: str) -> str:
    """Return a fresh id: UTC time, stage name and 4 random hex digits, e.g. `20260101-120000-batch-size-1a2b`."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{stage}-{secrets.token_hex(2)}"


def records_root() -> Path:
    """Return `$MOLTEN_HOME/experiments`, the folder holding one directory per record."""
    from molten.models.paths import molten_home  # molten.models imports torch; keep `molten --help` fast

    return molten_home() / "experiments"


def _record_dir(record_id: str, root: Path | None) -> Path:
    return (root or records_root()) / check_record_id(record_id)


def save_record(record: ExperimentRecord, root: Path | None = None) -> Path:
    """Write the record's three files into its directory (created if needed) and return the directory."""
    directory = _record_dir(record.record_id, root)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RECORD_FILE).write_text(json.dumps(record.to_json_dict(), indent=2, default=str) + "\n")
    (directory / NOTE_FILE).write_text(record.note_markdown())
    if record.plot_png:
        (directory / PLOT_FILE).write_bytes(record.plot_png)
    logger.info("saved experiment record %s in %s", record.record_id, directory)
    return directory


def load_record(record_id: str, root: Path | None = None) -> ExperimentRecord:
    """Read a saved record. Observations edited by hand in note.md win over record.json's copy."""
    directory = _record_dir(record_id, root)
    record_file = directory / RECORD_FILE
    if not record_file.is_file():
        raise RecordError(f"experiment record {record_id!r} was not found in {directory.parent}")
    try:
        data = json.loads(record_file.read_text())
    except json.JSONDecodeError as error:
        raise RecordError(f"{record_file} is not valid JSON: {error}") from error
    plot_file = directory / PLOT_FILE
    record = ExperimentRecord.from_json_dict(data, plot_file.read_bytes() if plot_file.is_file() else b"")
    note_file = directory / NOTE_FILE
    if note_file.is_file():
        edited = parse_observations(note_file.read_text())
        if edited is not None and edited != record.observations.strip():
            record.observations = edited
    return record


def list_records(root: Path | None = None) -> list[ExperimentRecord]:
    """Return every readable record under `root`, newest first. Unreadable directories are logged and skipped."""
    base = root or records_root()
    if not base.is_dir():
        return []
    records = []
    for directory in sorted(base.iterdir()):
        if not (directory / RECORD_FILE).is_file():
            continue
        try:
            records.append(load_record(directory.name, base))
        except RecordError as error:
            logger.warning("skipping experiment record %s: %s", directory.name, error)
    records.sort(key=lambda record: record.created_at, reverse=True)
    return records


def update_observations(record_id: str, observations: str, root: Path | None = None) -> ExperimentRecord:
    """Store new observations in record.json and note.md, and return the updated record."""
    record = load_record(record_id, root)
    record.observations = observations.strip()
    save_record(record, root)
    return record


def delete_record(record_id: str, root: Path | None = None) -> None:
    directory = _record_dir(record_id, root)
    if not directory.is_dir():
        raise RecordError(f"experiment record {record_id!r} was not found in {directory.parent}")
    shutil.rmtree(directory)


def export_record(record_id: str, destination: Path, root: Path | None = None) -> Path:
    """Write the record as one zip file and return its path.

    `destination` is a directory (the file is named `<record_id>.molten-experiment.zip`
    inside it) or a file path.
    """
    record = load_record(record_id, root)
    target = destination / f"{record_id}{EXPORT_SUFFIX}" if destination.is_dir() else destination
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(RECORD_FILE, json.dumps(record.to_json_dict(), indent=2, default=str) + "\n")
        archive.writestr(NOTE_FILE, record.note_markdown())
        if record.plot_png:
            archive.writestr(PLOT_FILE, record.plot_png)
    logger.info("exported experiment record %s to %s", record_id, target)
    return target


def _read_member(archive: zipfile.ZipFile, name: str) -> bytes | None:
    try:
        info = archive.getinfo(name)
    except KeyError:
        return None
    if info.file_size > MAX_IMPORT_BYTES:
        raise RecordError(f"{name} in the archive is {info.file_size} bytes, more than the {MAX_IMPORT_BYTES} allowed")
    return archive.read(info)


def import_record(archive_path: Path, root: Path | None = None, *, replace: bool = False) -> ExperimentRecord:
    """Read an exported zip file and save it as a record; return the saved record.

    Only record.json, note.md and plot.png are read from the archive, so member names
    cannot write outside the record's directory. When a record with the same id exists,
    `replace=True` overwrites it; otherwise the import gets a new id with a suffix.
    Raises RecordError for a file that is not a record archive.
    """
    try:
        archive = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise RecordError(f"{archive_path} is not a readable zip file: {error}") from error
    with archive:
        raw = _read_member(archive, RECORD_FILE)
        if raw is None:
            raise RecordError(f"{archive_path} contains no {RECORD_FILE}: it is not an exported Molten experiment")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RecordError(f"{RECORD_FILE} in {archive_path} is not valid JSON: {error}") from error
        plot = _read_member(archive, PLOT_FILE) or b""
        note = _read_member(archive, NOTE_FILE)
    if plot and not plot.startswith(_PNG_SIGNATURE):
        raise RecordError(f"{PLOT_FILE} in {archive_path} is not a PNG image")
    record = ExperimentRecord.from_json_dict(data, plot)
    if note is not None:
        edited = parse_observations(note.decode("utf-8", errors="replace"))
        if edited:
            record.observations = edited
    base = root or records_root()
    if (base / record.record_id).exists() and not replace:
        suffix = 2
        while (base / f"{record.record_id}-import{suffix}").exists():
            suffix += 1
        record.record_id = f"{record.record_id}-import{suffix}"
    save_record(record, base)
    logger.info("imported experiment record %s from %s", record.record_id, archive_path)
    return record


def compare_records(records: list[ExperimentRecord]) -> tuple[list[str], list[list[Any]]]:
    """Put the records' summary figures and settings side by side.

    Returns (columns, rows): the first column names the figure, then one column per
    record. A figure a record lacks shows as "-". Settings rows are prefixed `setting:`.
    """
    if len(records) < 2:
        raise RecordError(f"select at least two records to compare, got {len(records)}")
    columns = ["figure", *(record.record_id for record in records)]
    rows: list[list[Any]] = [["stage", *(record.stage for record in records)]]
    setting_names = list(dict.fromkeys(name for record in records for name in record.settings))
    for name in setting_names:
        rows.append([f"setting: {name}", *(record.settings.get(name, "-") for record in records)])
    figure_names = list(dict.fromkeys(name for record in records for name in record.summary))
    for name in figure_names:
        rows.append([name, *(record.summary.get(name, "-") for record in records)])
    for key in ("cpu", "gpu", "torch"):
        rows.append([f"environment: {key}", *(record.environment.get(key, "-") for record in records)])
    return columns, rows

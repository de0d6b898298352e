"""The Experiments tab: run a learning-path stage, then list, open, annotate, compare, export and import records.

`build_experiments_tab` must be called inside a `gr.Blocks` context. Every event calls a
method of `ExperimentsController`, which returns plain values (Markdown strings, pandas
frames, PIL images, file paths) so tests can call it without a browser.

Stages run in the playground's own process, in a background thread, with the engine
in-process (no Ray): on a small machine they share the cores with the served model.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from molten.experiments.record import (
    ExperimentRecord,
    RecordError,
    compare_records,
    export_record,
    import_record,
    list_records,
    load_record,
    records_root,
    update_observations,
)
from molten.experiments.stage_list import STAGE_LIST

logger = logging.getLogger(__name__)

RECORD_COLUMNS = ("record", "stage", "finished (UTC)", "seconds", "observations")
STAGE_CHOICES = [(f"{number}. {title}", name) for number, name, title in STAGE_LIST]
RUN_POLL_INTERVAL_S = 0.2
"""How often the running stage's progress lines are pushed to the page."""
RUN_CONCURRENCY_LIMIT = 1
"""Stages run one at a time: two would share the cores and spoil each other's timings."""


@dataclasses.dataclass
class OpenedRecord:
    """The contents of the "open" view for one record."""

    note_markdown: str
    """The note without its Observations section, which has its own text box."""
    table: pd.DataFrame
    plot: Image.Image | None
    observations: str


def parse_settings_text(text: str) -> dict[str, str]:
    """Parse one FIELD=VALUE per line (blank lines and lines starting with # are skipped).

    Raises ValueError naming the line without '='.
    """
    settings = {}
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, value = line.partition("=")
        if not separator or not name.strip():
            raise ValueError(f"each settings line must be FIELD=VALUE, got {line!r}")
        settings[name.strip()] = value.strip()
    return settings


class ExperimentsController:
    """Handlers of the Experiments tab; `root` is the records folder (default $MOLTEN_HOME/experiments)."""

    def __init__(self, root: Path | None = None):
        self.root = root

    # -- stages -------------------------------------------------------------------------

    def describe_stage(self, stage_name: str) -> str:
        """Return Markdown naming the stage's question and each setting with its default."""
        from molten.experiments.stages import get_stage

        stage = get_stage(stage_name)
        defaults = stage.settings_class()
        lines = [f"**Stage {stage.number}: {stage.title}.** {stage.question}", "", "Settings (FIELD=VALUE):"]
        for item in dataclasses.fields(stage.settings_class):
            quick = stage.quick_overrides.get(item.name)
            quick_text = f", quick: `{quick}`" if quick is not None else ""
            lines.append(f"- `{item.name}` default `{getattr(defaults, item.name)}`{quick_text}")
        reason = stage.availability()
        if reason is not None:
            lines.append(f"\n**Not available here:** {reason}")
        return "\n".join(lines)

    def run_stage(
        self, stage_name: str, quick: bool, model: str, settings_text: str, threads: float | None
    ) -> Iterator[tuple[str, pd.DataFrame, Any]]:
        """Run a stage in a thread and yield (progress log, records table, record choices) as it goes.

        Errors (bad settings, unavailable stage, a failed run) end the log with one line
        naming them; nothing is raised into Gradio.
        """
        from molten.experiments.runner import run_stage
        from molten.experiments.stages import get_stage

        log: list[str] = []
        try:
            stage = get_stage(stage_name)
            overrides = parse_settings_text(settings_text)
            if model and model.strip():
                overrides["models" if stage.name == "model-size" else "model"] = model.strip()
            thread_count = int(threads) if threads else None
        except ValueError as error:
            yield f"Error: {error}", self.records_frame(), self.record_choices()
            return

        lines: queue.Queue[str] = queue.Queue()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["record"] = run_stage(
                    stage.name, overrides, quick=quick, threads=thread_count, progress=lines.put, root=self.root
                )
            except Exception as error:  # shown to the person, who can fix the settings and retry
                logger.exception("experiment stage %s failed", stage.name)
                outcome["error"] = error

        worker = threading.Thread(target=work, name=f"molten-experiment-{stage.name}", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(RUN_POLL_INTERVAL_S)
            if _drain(lines, log):
                yield "\n".join(log), gr.skip(), gr.skip()
        _drain(lines, log)
        if "error" in outcome:
            log.append(f"Error: {outcome['error']}")
            yield "\n".join(log), self.records_frame(), self.record_choices()
            return
        new_id = outcome["record"].record_id
        log.append(f"Done: record {new_id}, opened below.")
        yield "\n".join(log), self.records_frame(), self.record_choices(new_id)

    # -- records ------------------------------------------------------------------------

    def records_frame(self) -> pd.DataFrame:
        rows = [
            [record.record_id, record.stage, record.created_at, round(record.duration_s, 1),
             "yes" if record.observations else "no"]
            for record in list_records(self.root)
        ]
        return pd.DataFrame(rows, columns=list(RECORD_COLUMNS))

    def record_ids(self) -> list[str]:
        return [record.record_id for record in list_records(self.root)]

    def record_choices(self, selected: str | None = None) -> gr.Dropdown:
        """Return a record dropdown update listing every record id, newest first, with `selected` chosen."""
        if selected is None:
            return gr.Dropdown(choices=self.record_ids())
        return gr.Dropdown(choices=self.record_ids(), value=selected)

    def refresh(self) -> tuple[pd.DataFrame, gr.Dropdown, gr.Dropdown]:
        """Return the records table and the choices of the open and compare dropdowns."""
        ids = self.record_ids()
        return self.records_frame(), gr.Dropdown(choices=ids), gr.Dropdown(choices=ids)

    def open_record(self, record_id: str | None) -> OpenedRecord:
        if not record_id:
            return OpenedRecord("Choose a record to open.", pd.DataFrame(), None, "")
        try:
            record = load_record(record_id, self.root)
        except RecordError as error:
            return OpenedRecord(f"**Error:** {error}", pd.DataFrame(), None, "")
        return OpenedRecord(
            note_markdown=_note_without_observations(record),
            table=pd.DataFrame(record.rows, columns=record.columns),
            plot=Image.open(io.BytesIO(record.plot_png)) if record.plot_png else None,
            observations=record.observations,
        )

    def open_outputs(self, record_id: str | None) -> tuple[str, pd.DataFrame, Image.Image | None, str]:
        opened = self.open_record(record_id)
        return opened.note_markdown, opened.table, opened.plot, opened.observations

    def save_observations(self, record_id: str | None, observations: str) -> tuple[str, pd.DataFrame]:
        """Store the observations in the record; return a status line and the refreshed records table."""
        if not record_id:
            return "Open a record first.", self.records_frame()
        try:
            update_observations(record_id, observations or "", self.root)
        except RecordError as error:
            return f"Error: {error}", self.records_frame()
        return f"Saved observations of {record_id} at {time.strftime('%H:%M:%S')}.", self.records_frame()

    def compare(self, record_ids: list[str] | None) -> tuple[str, pd.DataFrame, list[tuple[Image.Image, str]]]:
        """Return (status, side-by-side table, each record's plot with its id as caption) for two or more records."""
        try:
            records = [load_record(record_id, self.root) for record_id in record_ids or []]
            columns, rows = compare_records(records)
        except RecordError as error:
            return f"Error: {error}", pd.DataFrame(), []
        frame = pd.DataFrame([[str(cell) for cell in row] for row in rows], columns=columns)
        plots = [(Image.open(io.BytesIO(record.plot_png)), record.record_id) for record in records if record.plot_png]
        return f"Comparing {len(records)} records.", frame, plots

    def export(self, record_id: str | None) -> tuple[str, str | None]:
        """Write the record's zip into a fresh temporary folder; return (status, file path for download)."""
        if not record_id:
            return "Open a record first.", None
        try:
            path = export_record(record_id, Path(tempfile.mkdtemp(prefix="molten-export-")), self.root)
        except RecordError as error:
            return f"Error: {error}", None
        return f"Exported {record_id}: download {path.name} below.", str(path)

    def import_file(self, uploaded: str | None) -> tuple[str, pd.DataFrame, gr.Dropdown, gr.Dropdown]:
        """Import an uploaded zip; return a status line and the refreshed table and dropdowns."""
        if not uploaded:
            return ("Choose a .zip file exported from Molten first.", *self.refresh())
        try:
            record = import_record(Path(uploaded), self.root)
        except RecordError as error:
            return (f"Error: {error}", *self.refresh())
        return (f"Imported {record.record_id}.", *self.refresh())


def _drain(lines: queue.Queue[str], log: list[str]) -> bool:
    added = False
    while True:
        try:
            log.append(lines.get_nowait())
        except queue.Empty:
            return added
        added = True


def _note_without_observations(record: ExperimentRecord) -> str:
    """Render the note without its Observations section and plot link, which the tab shows in their own components."""
    saved_observations = record.observations
    record.observations = ""
    note = record.note_markdown()
    record.observations = saved_observations
    note = note.split("\n## Observations\n", 1)[0]
    return note.replace("![plot](plot.png)\n\n", "")


def build_experiments_tab(root: Path | None = None) -> ExperimentsController:
    """Add the Experiments tab to the enclosing Blocks and return its controller."""
    controller = ExperimentsController(root)
    first_stage = STAGE_CHOICES[0][1]
    with gr.Tab("Experiments"):
        gr.Markdown(
            "## Learning path\nRun a stage, then open its record: a table, a plot, a note on what to expect "
            "and why, and a box for your own observations. The same stages run from a terminal with "
            "`molten experiment <stage>`. Records live in "
            f"`{root or records_root()}`."
        )
        with gr.Row():
            with gr.Column(scale=2):
                stage = gr.Dropdown(STAGE_CHOICES, value=first_stage, label="stage")
                quick = gr.Checkbox(value=True, label="quick (a tiny model, a few seconds)")
                model = gr.Textbox(label="model (blank = the stage's default)", lines=1)
                settings_text = gr.Textbox(label="other settings, one FIELD=VALUE per line", lines=3)
                threads = gr.Number(value=1, precision=0, label="torch threads (blank = torch's default)")
                run_button = gr.Button("Run stage", variant="primary")
            with gr.Column(scale=3):
                stage_help = gr.Markdown(controller.describe_stage(first_stage))
                run_log = gr.Textbox(label="progress", lines=8, max_lines=16, interactive=False)

        gr.Markdown("### Records")
        records_table = gr.Dataframe(controller.records_frame(), interactive=False, wrap=True)
        with gr.Row():
            record_id = gr.Dropdown(choices=controller.record_ids(), value=None, label="record")
            open_button = gr.Button("Open")
            refresh_button = gr.Button("Refresh list")
        with gr.Row():
            with gr.Column(scale=3):
                note = gr.Markdown()
                table = gr.Dataframe(interactive=False, wrap=True)
            with gr.Column(scale=2):
                plot = gr.Image(type="pil", label="plot", interactive=False)
                observations = gr.Textbox(label="your observations (saved into the record)", lines=5)
                save_button = gr.Button("Save observations")
                save_status = gr.Markdown()
        with gr.Row():
            export_button = gr.Button("Export as one .zip file")
            export_file = gr.File(label="exported record", interactive=False)
            import_file = gr.File(label="import a record (.zip)", file_types=[".zip"], type="filepath")
            import_button = gr.Button("Import")
        transfer_status = gr.Markdown()

        gr.Markdown("### Compare")
        with gr.Row():
            compare_ids = gr.Dropdown(
                choices=controller.record_ids(), multiselect=True, label="records to compare (two or more)"
            )
            compare_button = gr.Button("Compare")
        compare_status = gr.Markdown()
        compare_table = gr.Dataframe(interactive=False, wrap=True)
        compare_plots = gr.Gallery(label="plots", columns=2, height="auto")

        stage.change(controller.describe_stage, stage, stage_help)
        run_button.click(
            controller.run_stage,
            [stage, quick, model, settings_text, threads],
            [run_log, records_table, record_id],
            concurrency_limit=RUN_CONCURRENCY_LIMIT,
        )
        refresh_button.click(controller.refresh, None, [records_table, record_id, compare_ids])
        open_button.click(controller.open_outputs, record_id, [note, table, plot, observations])
        record_id.change(controller.open_outputs, record_id, [note, table, plot, observations])
        save_button.click(controller.save_observations, [record_id, observations], [save_status, records_table])
        export_button.click(controller.export, record_id, [transfer_status, export_file])
        import_button.click(
            controller.import_file, import_file, [transfer_status, records_table, record_id, compare_ids]
        )
        compare_button.click(controller.compare, compare_ids, [compare_status, compare_table, compare_plots])
    return controller

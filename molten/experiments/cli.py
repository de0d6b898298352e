"""`molten experiment`: run a learning-path stage, and list, show, compare, export and import records.

Building the parser imports nothing heavy; each subcommand imports the engine, records
or stages when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from molten.experiments.stage_list import STAGE_LIST

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Define `molten experiment`'s subcommands: one per stage, plus list, stages, show, compare, export, import."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", type=Path, default=None,
        help="folder of experiment records (default: $MOLTEN_HOME/experiments, i.e. ~/.cache/molten/experiments)",
    )
    commands = parser.add_subparsers(title="experiment commands", metavar="COMMAND")
    parser.set_defaults(run_experiment=_print_help(parser))

    for number, name, title in STAGE_LIST:
        stage_parser = commands.add_parser(
            name, parents=[common], help=f"stage {number}: {title}", description=f"Stage {number}: {title}."
        )
        stage_parser.add_argument(
            "--quick", action="store_true",
            help="a tiny model and few points, finishing in seconds (other flags still apply)",
        )
        stage_parser.add_argument(
            "--model", default=None,
            help="model to run; for model-size a comma-separated list (default: the stage's own)",
        )
        stage_parser.add_argument(
            "--set", dest="settings", action="append", default=[], metavar="FIELD=VALUE",
            help="change one stage setting; lists are comma-separated. Repeat the flag for several. "
            "`molten experiment stages` lists every setting",
        )
        stage_parser.add_argument(
            "--threads", type=int, default=None,
            help="torch threads for the run (default: torch's own); 1 gives steadier timings on a busy machine",
        )
        stage_parser.set_defaults(run_experiment=_run_stage, stage=name)

    list_parser = commands.add_parser("list", parents=[common], help="list saved experiment records, newest first")
    list_parser.set_defaults(run_experiment=_run_list)

    stages_parser = commands.add_parser("stages", help="list the learning-path stages and their settings")
    stages_parser.set_defaults(run_experiment=_run_stages)

    show = commands.add_parser("show", parents=[common], help="print a record's note (Markdown)")
    show.add_argument("record_id")
    show.set_defaults(run_experiment=_run_show)

    compare = commands.add_parser("compare", parents=[common], help="print two or more records' figures side by side")
    compare.add_argument("record_ids", nargs="+")
    compare.set_defaults(run_experiment=_run_compare)

    export = commands.add_parser("export", parents=[common], help="write a record as one .zip file to share")
    export.add_argument("record_id")
    export.add_argument(
        "--output", type=Path, default=Path("."),
        help="file or folder to write (default: ./<record id>.molten-experiment.zip)",
    )
    export.set_defaults(run_experiment=_run_export)

    import_parser = commands.add_parser("import", parents=[common], help="add a record from an exported .zip file")
    import_parser.add_argument("archive", type=Path)
    import_parser.add_argument(
        "--replace", action="store_true", help="overwrite a record with the same id instead of importing it under a new id"
    )
    import_parser.set_defaults(run_experiment=_run_import)


def main(args: argparse.Namespace) -> int:
    """Run the chosen experiment subcommand; print errors as one line and return 1 for them."""
    from molten.experiments.measure import ExperimentTimeoutError
    from molten.experiments.record import RecordError
    from molten.experiments.stages import StageSettingsError, StageUnavailableError

    try:
        return args.run_experiment(args)
    except (RecordError, StageSettingsError, StageUnavailableError, ExperimentTimeoutError) as error:
        print(f"molten: error: {error}", file=sys.stderr)
        return 1


def _print_help(parser: argparse.ArgumentParser):
    def run(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return run


def _show_progress(message: str) -> None:
    print(f"[molten] {message}", file=sys.stderr, flush=True)


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """Turn ["field=value", ...] into a dict; raise StageSettingsError for an item without '='."""
    from molten.experiments.stages import StageSettingsError

    settings = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name.strip():
            raise StageSettingsError("--set", f"--set expects FIELD=VALUE, got {pair!r}")
        settings[name.strip()] = value
    return settings


def _run_stage(args: argparse.Namespace) -> int:
    from molten.experiments.record import format_value, records_root
    from molten.experiments.runner import run_stage
    from molten.experiments.stages import STAGES

    stage = STAGES[args.stage]
    overrides = parse_settings(args.settings)
    if args.model is not None:
        field_name = "models" if stage.name == "model-size" else "model"
        overrides[field_name] = args.model
    record = run_stage(
        stage.name, overrides, quick=args.quick, threads=args.threads, progress=_show_progress, root=args.dir
    )
    print(record.table_markdown())
    print()
    for name, value in record.summary.items():
        print(f"{name}: {format_value(value)}")
    print(f"\nrecord {record.record_id} saved in {args.dir or records_root()}")
    print(f"open it with `molten experiment show {record.record_id}`, or in the playground's Experiments tab")
    return 0


def _run_list(args: argparse.Namespace) -> int:
    from molten.experiments.record import list_records, markdown_table, records_root

    records = list_records(args.dir)
    if not records:
        print(f"no experiment records in {args.dir or records_root()}; run one with `molten experiment batch-size --quick`")
        return 0
    rows = [[record.record_id, record.stage, record.created_at, f"{record.duration_s:.1f}",
             "yes" if record.observations else "no"] for record in records]
    print(markdown_table(["record", "stage", "finished (UTC)", "seconds", "observations"], rows))
    return 0


def _run_stages(args: argparse.Namespace) -> int:
    import dataclasses

    from molten.experiments.stages import STAGES

    for stage in STAGES.values():
        reason = stage.availability()
        status = "" if reason is None else f"  [not available: {reason}]"
        print(f"{stage.number}. {stage.name}: {stage.title}{status}")
        print(f"   {stage.question}")
        defaults = stage.settings_class()
        for item in dataclasses.fields(stage.settings_class):
            print(f"   --set {item.name}=...  (default {getattr(defaults, item.name)!r})")
    return 0


def _run_show(args: argparse.Namespace) -> int:
    from molten.experiments.record import load_record

    print(load_record(args.record_id, args.dir).note_markdown())
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from molten.experiments.record import compare_records, load_record, markdown_table

    records = [load_record(record_id, args.dir) for record_id in args.record_ids]
    columns, rows = compare_records(records)
    print(markdown_table(columns, rows))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from molten.experiments.record import export_record

    path = export_record(args.record_id, args.output, args.dir)
    print(f"wrote {path}")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from molten.experiments.record import import_record, records_root

    record = import_record(args.archive, args.dir, replace=args.replace)
    print(f"imported {record.record_id} into {args.dir or records_root()}")
    return 0

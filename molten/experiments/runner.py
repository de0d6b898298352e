"""Run one stage and save what it measured as an experiment record."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from molten.experiments.environment import collect_environment
from molten.experiments.measure import Progress, no_progress
from molten.experiments.record import ExperimentRecord, new_record_id, save_record
from molten.experiments.stages import StageSettingsError, StageUnavailableError, get_stage

logger = logging.getLogger(__name__)


def run_stage(
    name: str,
    overrides: dict[str, Any] | None = None,
    *,
    quick: bool = False,
    threads: int | None = None,
    progress: Progress = no_progress,
    root: Path | None = None,
) -> ExperimentRecord:
    """Run stage `name` with its defaults updated by `overrides`, save the record, and return it.

    `quick` applies the stage's quick settings (a tiny model, few points) before
    `overrides`. `threads` sets torch's intra-op threads for the run and is restored
    afterwards; on a busy machine one thread gives steadier timings than oversubscribed
    cores. Raises StageSettingsError for a bad setting and StageUnavailableError when the
    stage needs an engine feature this checkout lacks.
    """
    stage = get_stage(name)
    reason = stage.availability()
    if reason is not None:
        raise StageUnavailableError(f"stage {stage.name} cannot run: {reason}")
    if threads is not None and threads < 1:
        raise StageSettingsError("threads", f"threads must be at least 1, got {threads}")
    settings = stage.build_settings(overrides, quick=quick)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    logger.info("running experiment stage %s with %s", stage.name, settings)
    progress(f"stage {stage.number}: {stage.title}")
    started = time.perf_counter()
    try:
        environment = collect_environment()
        result = stage.run(settings, progress)
    finally:
        torch.set_num_threads(previous_threads)
    duration_s = time.perf_counter() - started
    recorded_settings = dataclasses.asdict(settings) | {"quick": quick, "threads": threads or previous_threads}
    record = ExperimentRecord(
        record_id=new_record_id(stage.name),
        stage=stage.name,
        title=f"Stage {stage.number}: {stage.title}",
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        duration_s=round(duration_s, 2),
        settings=recorded_settings,
        environment=environment,
        summary=result.summary,
        columns=result.columns,
        rows=result.rows,
        explanation=f"_{stage.question}_\n\n{result.explanation}",
        plot_png=result.plot_png,
    )
    directory = save_record(record, root)
    progress(f"saved record {record.record_id} in {directory} after {duration_s:.1f} s")
    return record

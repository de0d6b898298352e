"""The seven stages of the learning path, in order. Each module defines one stage's settings and run."""

from __future__ import annotations

from molten.experiments.stage_list import STAGE_LIST
from molten.experiments.stages import (
    batch_size,
    context_length,
    disaggregation,
    model_size,
    parallel_sampling,
    quantization,
    speculative,
)
from molten.experiments.stages.base import (
    Stage,
    StageResult,
    StageSettingsError,
    StageUnavailableError,
)

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        model_size.STAGE,
        quantization.STAGE,
        batch_size.STAGE,
        context_length.STAGE,
        disaggregation.STAGE,
        speculative.STAGE,
        parallel_sampling.STAGE,
    )
}
"""Stages by command-line name, in learning-path order."""

if [(stage.number, stage.name, stage.title) for stage in STAGES.values()] != list(STAGE_LIST):
    raise RuntimeError("molten/experiments/stage_list.py disagrees with the stage modules; update STAGE_LIST")


def get_stage(name: str) -> Stage:
    """Return the stage called `name` (or numbered `name`, "1" to "7"); raise StageSettingsError otherwise."""
    for stage in STAGES.values():
        if name in (stage.name, str(stage.number)):
            return stage
    raise StageSettingsError("stage", f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")


__all__ = ["STAGES", "Stage", "StageResult", "StageSettingsError", "StageUnavailableError", "get_stage"]

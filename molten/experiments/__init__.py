"""The guided learning path: seven stages that each measure one inference mechanism.

Each run of a stage becomes an `ExperimentRecord` saved under
`$MOLTEN_HOME/experiments` (see record.py for the layout) that the `molten experiment`
command and the playground's Experiments tab list, open, compare, export and import.
The stages run the engine in-process and never import Ray.
"""

import importlib

_EXPORTS = {
    "ExperimentRecord": "molten.experiments.record",
    "RecordError": "molten.experiments.record",
    "compare_records": "molten.experiments.record",
    "delete_record": "molten.experiments.record",
    "export_record": "molten.experiments.record",
    "import_record": "molten.experiments.record",
    "list_records": "molten.experiments.record",
    "load_record": "molten.experiments.record",
    "records_root": "molten.experiments.record",
    "save_record": "molten.experiments.record",
    "update_observations": "molten.experiments.record",
    "run_stage": "molten.experiments.runner",
    "STAGES": "molten.experiments.stages",
    "StageSettingsError": "molten.experiments.stages",
    "StageUnavailableError": "molten.experiments.stages",
    "get_stage": "molten.experiments.stages",
}
"""Public names and their modules. They are imported on first use, because the stages
import torch and the engine, and `molten --help` imports this package."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'molten.experiments' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

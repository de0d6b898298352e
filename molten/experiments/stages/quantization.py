"""Stage 2: quantization comparison, one row per precision of a model.

The measurement itself is `molten.quant.compare.compare_precisions`: weight memory,
single-stream and batched decode tokens/s, TTFT, perplexity on the text corpus shipped
in `molten/data/`, and per-token logprob drift against fp32 on the same prompts. This
stage runs it and saves its table and plot as an experiment record.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molten.experiments.measure import Progress
from molten.experiments.stages.base import Stage, StageResult, StageSettingsError, StageUnavailableError

logger = logging.getLogger(__name__)

COMPARE_MODULE = "molten.quant.compare"
PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")


@dataclass
class QuantizationSettings:
    model: str = "smollm2-135m-instruct"
    """Model to quantize (catalog name, directory, .gguf file or hub id), without a precision suffix."""
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16", "int8", "int4"])
    """Precisions to compare: fp32, bf16, fp16 (GPU only), int8, int4. fp32 is the reference for drift."""
    quick: bool = False
    """Ask the comparison for its short version (fewer prompts and tokens), which finishes in seconds."""

    def validate(self) -> None:
        if ":" in self.model:
            raise StageSettingsError(
                "model", f"give the model without a precision suffix (got {self.model!r}); list precisions instead"
            )
        unknown = [precision for precision in self.precisions if precision not in PRECISIONS]
        if unknown or not self.precisions:
            raise StageSettingsError(
                "precisions", f"precisions must be a non-empty list among {', '.join(PRECISIONS)}, got {self.precisions}"
            )


QUICK = {"model": "tiny-random-llama", "precisions": ["fp32", "int8"], "quick": True}


def availability() -> str | None:
    if importlib.util.find_spec(COMPARE_MODULE) is None:
        return (
            f"the quantization comparison ({COMPARE_MODULE}.compare_precisions) is not in this checkout yet; "
            "update Molten, or compare precisions by hand with `molten experiment model-size`"
        )
    return None


def run(settings: QuantizationSettings, progress: Progress) -> StageResult:
    reason = availability()
    if reason is not None:
        raise StageUnavailableError(f"stage quantization cannot run: {reason}")
    compare = importlib.import_module(COMPARE_MODULE)
    comparison = compare.compare_precisions(settings.model, list(settings.precisions), quick=settings.quick, progress=progress)
    columns, rows = _table(comparison.rows)
    with tempfile.TemporaryDirectory(prefix="molten-quant-plot-") as folder:
        plot_path = Path(folder) / "plot.png"
        comparison.save_plot(plot_path)
        plot_png = plot_path.read_bytes() if plot_path.is_file() else b""
    summary = _summary(comparison.to_dict())
    explanation = (
        "## What this measures\n\n"
        f"`{settings.model}` in each precision ({', '.join(settings.precisions)}), measured by "
        "`molten.quant.compare.compare_precisions`.\n\n"
        "## What to expect, and why\n\n"
        "A decode step at batch 1 reads every weight once, so fewer bytes per weight mean proportionally "
        "fewer bytes moved: int8 weights are a quarter of fp32 and int4 an eighth, which raises the "
        "bandwidth ceiling on single-stream tokens/s by 4x and 8x. Whether the measured speed follows depends "
        "on the kernels: de-quantizing costs arithmetic, so at large batch, where the step is compute bound, "
        "quantized weights can be slower than bf16. Rounding the weights changes the logits a little: "
        "the logprob drift against fp32 and the perplexity on the shipped corpus show how much quality "
        "each saving costs.\n\n"
        + comparison.to_markdown()
    )
    return StageResult(summary, columns, rows, plot_png, explanation)


def _as_dict(row: Any) -> dict[str, Any]:
    if isinstance(row, dict):
        return row
    if dataclasses.is_dataclass(row):
        return dataclasses.asdict(row)
    return dict(vars(row))


def _table(rows: list[Any]) -> tuple[list[str], list[list[Any]]]:
    dicts = [_as_dict(row) for row in rows]
    columns = list(dict.fromkeys(key for row in dicts for key in row))
    return columns, [[row.get(column) for column in columns] for row in dicts]


def _summary(data: dict[str, Any]) -> dict[str, Any]:
    """Keep the comparison's scalar figures as the record's summary; per-row figures stay in the table."""
    summary = {key: value for key, value in data.items() if isinstance(value, (int, float, str, bool))}
    for row in data.get("rows", []):
        row = _as_dict(row)
        precision = row.get("precision")
        if precision is None:
            continue
        for key, value in row.items():
            if key != "precision" and isinstance(value, (int, float)) and not isinstance(value, bool):
                summary[f"{key} {precision}"] = float(f"{value:.4g}") if isinstance(value, float) else value
    return summary


STAGE = Stage(
    number=2,
    name="quantization",
    title="Quantization comparison",
    question="What do int8 and int4 weights save in memory and time, and what do they cost in accuracy?",
    settings_class=QuantizationSettings,
    quick_overrides=QUICK,
    run=run,
    availability=availability,
)

"""The parts every learning-path stage provides: settings, a run function, and its result."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from molten.experiments.measure import Progress


class StageUnavailableError(RuntimeError):
    """The stage needs an engine feature that this checkout does not have yet."""


class StageSettingsError(ValueError):
    """An invalid stage setting. `field` names the setting to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class StageResult:
    """The figures, plot and explanation of one stage run. The runner adds the record id, time and environment."""

    summary: dict[str, Any]
    """Headline figures, name to number; units are in the names."""
    columns: list[str]
    rows: list[list[Any]]
    plot_png: bytes
    explanation: str
    """Markdown: what was measured, what to expect and why."""


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    """Command-line name, such as `batch-size`."""
    title: str
    question: str
    """One sentence: what the stage shows."""
    settings_class: type
    """Dataclass of the stage's settings; every field has a default and `quick=False`."""
    quick_overrides: dict[str, Any]
    """Settings that `--quick` changes, so the stage finishes in seconds on a tiny model."""
    run: Callable[[Any, Progress], StageResult]
    availability: Callable[[], str | None] = lambda: None
    """Returns None when the stage can run here, else why it cannot."""

    def build_settings(self, overrides: dict[str, Any] | None = None, *, quick: bool = False):
        """Return validated settings: defaults, then the quick overrides, then `overrides`.

        Values may be strings (from the command line or the UI) and are converted to the
        field's type. Raises StageSettingsError naming an unknown field or a bad value.
        """
        fields = {item.name: item for item in dataclasses.fields(self.settings_class)}
        hints = typing.get_type_hints(self.settings_class)
        values: dict[str, Any] = dict(self.quick_overrides) if quick else {}
        for name, value in (overrides or {}).items():
            if name not in fields:
                raise StageSettingsError(
                    name, f"stage {self.name!r} has no setting {name!r}; its settings are {', '.join(fields)}"
                )
            values[name] = convert_setting(name, value, hints[name])
        settings = self.settings_class(**values)
        validate = getattr(settings, "validate", None)
        if validate is not None:
            validate()
        return settings


def convert_setting(name: str, value: Any, annotation: Any) -> Any:
    """Convert a string from the command line or the UI to the field's type; pass other values through."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(annotation)
    try:
        if origin is list:
            (item_type,) = typing.get_args(annotation)
            return [item_type(part.strip()) for part in value.split(",") if part.strip()]
        if annotation is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if annotation in (int, float, str):
            return annotation(value.strip())
    except ValueError as error:
        raise StageSettingsError(name, f"setting {name!r} must be of type {annotation}, got {value!r}") from error
    return value


def check_positive(name: str, values: list[int] | int) -> None:
    """Raise StageSettingsError unless `values` (one int or a non-empty list) are all at least 1."""
    items = values if isinstance(values, list) else [values]
    if not items:
        raise StageSettingsError(name, f"{name} must list at least one value")
    for value in items:
        if not isinstance(value, int) or value < 1:
            raise StageSettingsError(name, f"{name} must contain integers >= 1, got {value!r}")

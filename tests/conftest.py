"""Settings and fixtures shared by every test directory."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub: with this set, a hub id that is not cached fails at once
# with ModelNotFoundError instead of retrying the network. huggingface_hub reads the
# variable when it is first imported, which is after this file runs.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def bundled_model():
    """The bundled SmolLM2-135M-Instruct in float32, loaded once per test session.

    Mark tests that use it `@pytest.mark.slow`: the first load on a machine converts the
    GGUF file (about a minute), later loads read the cache (a few seconds).
    """
    from molten.models import load_model

    return load_model()

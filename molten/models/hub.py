"""Checks that a Hugging Face Hub model can be loaded, before transformers tries.

Left alone, `from_pretrained` retries an unreachable hub five times (about 23 s here) and
then raises an OSError that does not name the model. These checks read the local
cache first, send one request with a timeout, and turn every failure into a
ModelNotFoundError that names the model and the fix.
"""

from __future__ import annotations

import logging
import os

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    HTTPError,
    RepositoryNotFoundError,
)

from molten.models.errors import ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_HUB_TIMEOUT_S = 10.0

_TRUE_VALUES = {"1", "true", "yes", "on"}


def is_hub_offline() -> bool:
    """Return True when HF_HUB_OFFLINE is set now or was set when huggingface_hub loaded.

    huggingface_hub reads the variable once, at import, so the environment is read again
    here to honour a value set later in the process.
    """
    from_env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE_VALUES
    return from_env or hub_constants.is_offline_mode()


def is_valid_repo_id(spec: str) -> bool:
    try:
        huggingface_hub.utils.validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def is_cached_on_disk(repo_id: str) -> bool:
    """Return True when the model's config.json is in the local Hugging Face cache."""
    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    return isinstance(cached, str)


def check_hub_model(repo_id: str, *, timeout_s: float, other_choices: str) -> None:
    """Raise ModelNotFoundError unless the hub reports that `repo_id` exists and is readable.

    `other_choices` is appended to every message, to tell the user what else to try.
    """
    if is_hub_offline():
        raise ModelNotFoundError(
            f"Model {repo_id!r} is not in the local Hugging Face cache, and HF_HUB_OFFLINE "
            f"is set, so it cannot be downloaded. Unset HF_HUB_OFFLINE on a machine with "
            f"network access, or {other_choices}"
        )

    try:
        huggingface_hub.HfApi().model_info(repo_id, timeout=timeout_s)
    except GatedRepoError:
        raise ModelNotFoundError(
            f"Model {repo_id!r} is gated on the Hugging Face Hub. Accept its terms on the "
            f"model page, log in with `hf auth login`, and try again, or {other_choices}"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"Model {repo_id!r} was not found on the Hugging Face Hub (or it is private "
            f"and you are not logged in). Check the spelling, or {other_choices}"
        ) from None
    except (HTTPError, OSError) as error:
        # DNS failures, refused connections, timeouts, 5xx responses, and offline mode
        # switched on through huggingface_hub's own setting.
        logger.info("Hub request for %s failed: %r", repo_id, error)
        raise ModelNotFoundError(
            f"Model {repo_id!r} is not in the local Hugging Face cache, and the Hugging "
            f"Face Hub could not be reached ({type(error).__name__}: {error}). Connect to "
            f"a network, or {other_choices}"
        ) from None

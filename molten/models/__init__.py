"""Model catalog and loading: the bundled SmolLM2, tiny test models, local and hub models."""

from molten.models.bundled import (
    SMOLLM2_135M_INSTRUCT,
    BundledGGUF,
    ensure_bundled_cache,
    find_bundled_gguf,
    verify_gguf_file,
)
from molten.models.catalog import (
    DEFAULT_MODEL,
    CatalogEntry,
    LoadedModel,
    ModelSource,
    SourceKind,
    list_models,
    load_model,
    load_tokenizer,
    resolve_model,
)
from molten.models.errors import (
    BundledModelError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
)
from molten.models.gguf_cache import ProgressFn
from molten.models.paths import molten_home, models_cache_root
from molten.models.tiny import TINY_MODELS, TinyModelSpec, build_tiny_model

__all__ = [
    "BundledGGUF",
    "BundledModelError",
    "CatalogEntry",
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelSource",
    "ProgressFn",
    "SMOLLM2_135M_INSTRUCT",
    "SourceKind",
    "TINY_MODELS",
    "TinyModelSpec",
    "build_tiny_model",
    "ensure_bundled_cache",
    "find_bundled_gguf",
    "list_models",
    "load_model",
    "load_tokenizer",
    "models_cache_root",
    "molten_home",
    "resolve_model",
    "verify_gguf_file",
]

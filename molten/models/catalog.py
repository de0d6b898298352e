"""Model catalog: turn a model spec into a source, load it, and list what is available.

A spec is one of, checked in this order:

1. a catalog name: the bundled `smollm2-135m-instruct` (the default; its alias
   `SmolLM2-135M-Instruct` also works), `tiny-random-llama` or `tiny-random-qwen2`;
2. a path to a local directory containing `config.json` (as written by `save_pretrained`);
3. a path to a `.gguf` file, converted once into a cache directory like the bundled model;
4. a Hugging Face Hub model id such as `HuggingFaceTB/SmolLM2-360M-Instruct`.

Any of them may end in `:<precision>` (fp32, bf16, fp16, int8, int4), for example
`smollm2-135m-instruct:int8`; without a suffix the model loads in fp32. int8 and int4
quantize the float32 weights at load time (molten.quant), so no extra files are stored.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from molten.models import hub
from molten.models.bundled import SMOLLM2_135M_INSTRUCT, ensure_bundled_cache, find_bundled_gguf
from molten.models.errors import BundledModelError, ModelLoadError, ModelNotFoundError, PrecisionError
from molten.models.gguf_cache import (
    CACHE_MARKER_NAME,
    ProgressFn,
    convert_gguf_to_cache,
    directory_size_bytes,
    is_complete_cache,
    read_cache_marker,
    report,
    sha256_of_file,
)
from molten.models.paths import models_cache_root
from molten.models.precision import FLOAT_DTYPES, QUANTIZED_PRECISIONS, check_precision_supported, split_precision
from molten.models.tiny import TINY_MODELS, build_tiny_model, count_tiny_parameters

logger = logging.getLogger(__name__)

DEFAULT_MODEL = SMOLLM2_135M_INSTRUCT.name

_BUNDLED_NAMES = {
    name.lower() for name in (SMOLLM2_135M_INSTRUCT.name, *SMOLLM2_135M_INSTRUCT.aliases)
}
_PATH_PREFIXES = ("/", "./", "../", "~")


class SourceKind(enum.StrEnum):
    BUNDLED = "bundled"
    TINY = "tiny"
    LOCAL_DIR = "local-dir"
    GGUF_FILE = "gguf-file"
    HUB = "hub"


@dataclass(frozen=True)
class ModelSource:
    """Source of a model's weights and tokenizer, as found by `resolve_model`."""

    kind: SourceKind
    model_id: str
    """Name the model is served under, as `GET /v1/models` lists it."""
    location: str
    """Catalog name, absolute path, or hub model id, by `kind`."""
    description: str
    hub_cached: bool = False
    """For hub models: whether config.json is already in the local Hugging Face cache,
    in which case loading never touches the network."""
    precision: str | None = None
    """Precision named by the spec's `:<precision>` suffix. None when the spec had none,
    in which case `load_model`'s `dtype` applies."""

    def __str__(self) -> str:
        return self.description


@dataclass
class LoadedModel:
    """A model ready for inference, with the facts an engine needs about it."""

    model: PreTrainedModel
    """In eval mode, with `requires_grad` off for every parameter."""
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    model_id: str
    eos_token_ids: frozenset[int]
    """Union of the config's, the generation config's and the tokenizer's EOS ids."""
    max_model_len: int
    """Context window in tokens: prompt plus generated tokens."""
    dtype: torch.dtype
    """Dtype of the float parts and activations (float32 for int8 and int4 models)."""
    source: ModelSource
    load_seconds: float
    precision: str = "fp32"
    """fp32, bf16, fp16, int8 or int4: how the weights are stored."""

    @property
    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights in memory, the integer weights and scales of int8 and int4
        layers included. Other buffers such as RoPE tables are left out."""
        from molten.quant.quantize import weight_bytes

        return weight_bytes(self.model)


@dataclass(frozen=True)
class CatalogEntry:
    """One row of `molten models list`."""

    name: str
    kind: SourceKind
    description: str
    status: str
    """Short state for a person: converted, not converted yet, missing, built on load."""
    is_available: bool
    """Whether `load_model(name)` can succeed without a network."""
    is_default: bool
    num_bytes: int | None
    """Bytes on disk of the cache (or the GGUF file before conversion); for tiny
    models, the float32 weights they are built with."""
    location: str | None


def resolve_model(spec: str = DEFAULT_MODEL, *, hub_timeout_s: float = hub.DEFAULT_HUB_TIMEOUT_S) -> ModelSource:
    """Find which model `spec` names, without loading it.

    A hub id not in the local cache is checked with one request that waits at most
    `hub_timeout_s` seconds. Raises ModelNotFoundError, naming the model and what to do,
    when nothing matches.
    """
    spec = spec.strip()
    if not spec:
        raise ModelNotFoundError(f"The model name is empty. Use {_other_choices()}")
    # A local path may itself contain a colon, so an existing path is never split.
    if ":" in spec and not Path(spec).expanduser().exists():
        base_spec, precision = split_precision(spec)
        return _with_precision(resolve_model(base_spec, hub_timeout_s=hub_timeout_s), precision)

    catalog_source = _resolve_catalog_name(spec)
    if catalog_source is not None:
        return catalog_source

    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_local_path(spec, path.resolve())
    if spec.startswith(_PATH_PREFIXES) or spec.endswith(".gguf"):
        raise ModelNotFoundError(
            f"Model {spec!r} was not found: no such file or directory. Check the path, "
            f"or {_other_choices()}"
        )
    if not hub.is_valid_repo_id(spec):
        raise ModelNotFoundError(
            f"Model {spec!r} was not found: it is not a catalog name, an existing path, "
            f"or a valid Hugging Face model id. Check the spelling, or {_other_choices()}"
        )
    return _resolve_hub_id(spec, hub_timeout_s)


def load_model(
    spec: str | ModelSource = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    progress: ProgressFn | None = None,
    *,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Resolve `spec` if needed, then load its model and tokenizer.

    `progress` receives one line per stage (verifying, parsing GGUF, converting, saving,
    loading). `attn_implementation` is passed to transformers ("eager", "sdpa", or a
    registered custom function); None keeps transformers' default.
    A `:<precision>` suffix on `spec` sets the dtype (bf16, fp16) or quantizes the
    float32 weights (int8, int4); `dtype` must then be float32 or agree with it.
    Raises ModelNotFoundError, BundledModelError, ModelLoadError or PrecisionError, all
    ModelError.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    precision, dtype = _precision_and_dtype(source, dtype)
    check_precision_supported(precision, device, model_id=source.model_id)
    started = time.perf_counter()
    report(progress, f"Loading {source.model_id} ({source.description})")

    location, local_files_only = _pretrained_location(source, progress)
    if source.kind is SourceKind.TINY:
        model = build_tiny_model(TINY_MODELS[source.location], dtype)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
    else:
        model = _load_pretrained_model(
            source, location, dtype, attn_implementation, local_files_only
        )
    tokenizer = _load_tokenizer(source, location, local_files_only)
    if precision in QUANTIZED_PRECISIONS:
        from molten.quant.quantize import quantize_model

        report(progress, f"Quantizing the float32 weights to {precision}")
        quantize_model(model, precision)

    model.to(device)
    model.eval()
    model.requires_grad_(False)
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=model.config,
        model_id=source.model_id,
        eos_token_ids=_collect_eos_token_ids(model, tokenizer),
        max_model_len=_find_max_model_len(source, model.config, tokenizer),
        dtype=dtype,
        source=source,
        load_seconds=time.perf_counter() - started,
        precision=precision,
    )
    report(
        progress,
        f"Loaded {loaded.model_id}: {precision} weights, {loaded.weight_bytes / 1e6:.1f} MB, "
        f"context {loaded.max_model_len} tokens, in {loaded.load_seconds:.1f} s",
    )
    return loaded


def load_tokenizer(
    spec: str | ModelSource = DEFAULT_MODEL, progress: ProgressFn | None = None
) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of `spec`. For tiny models this is the bundled tokenizer.

    A GGUF source is converted into its cache first, as `load_model` does, because the
    cached tokenizer files load in under a second and the GGUF file takes about 10 s.
    """
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec)
    location, local_files_only = _pretrained_location(source, progress)
    return _load_tokenizer(source, location, local_files_only)


def list_models() -> list[CatalogEntry]:
    """List the catalog models and the GGUF files already converted into the cache."""
    entries = [_bundled_entry()]
    for spec in TINY_MODELS.values():
        num_parameters = count_tiny_parameters(spec)
        entries.append(
            CatalogEntry(
                name=spec.name,
                kind=SourceKind.TINY,
                description=spec.description,
                status="built on load (uses the bundled tokenizer)",
                is_available=_bundled_is_loadable(),
                is_default=False,
                num_bytes=num_parameters * 4,
                location=None,
            )
        )
    entries.extend(_converted_gguf_entries())
    return entries


def _resolve_catalog_name(spec: str) -> ModelSource | None:
    if spec.lower() in _BUNDLED_NAMES:
        bundle = SMOLLM2_135M_INSTRUCT
        return ModelSource(
            kind=SourceKind.BUNDLED,
            model_id=bundle.name,
            location=bundle.name,
            description=f"bundled {bundle.description}",
        )
    if spec in TINY_MODELS:
        return ModelSource(
            kind=SourceKind.TINY,
            model_id=spec,
            location=spec,
            description=TINY_MODELS[spec].description,
        )
    return None


def _resolve_local_path(spec: str, path: Path) -> ModelSource:
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(
            kind=SourceKind.GGUF_FILE,
            model_id=path.stem,
            location=str(path),
            description=f"GGUF file {path}",
        )
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(
            kind=SourceKind.LOCAL_DIR,
            model_id=path.name,
            location=str(path),
            description=f"local directory {path}",
        )
    problem = "directory has no config.json" if path.is_dir() else "file is not a .gguf file"
    raise ModelNotFoundError(
        f"Model {spec!r} cannot be loaded: the {problem}. Pass a directory written by "
        f"transformers' save_pretrained, a .gguf file, or {_other_choices()}"
    )


def _resolve_hub_id(repo_id: str, timeout_s: float) -> ModelSource:
    # NOTE: only the cached, offline and unreachable paths have been run. A real download
    # is left to transformers and has not been tried from a machine with hub access.
    cached = hub.is_cached_on_disk(repo_id)
    if not cached:
        hub.check_hub_model(repo_id, timeout_s=timeout_s, other_choices=_other_choices())
    return ModelSource(
        kind=SourceKind.HUB,
        model_id=repo_id,
        location=repo_id,
        description=f"Hugging Face model {repo_id}" + (" (cached)" if cached else ""),
        hub_cached=cached,
    )


def _with_precision(source: ModelSource, precision: str) -> ModelSource:
    """Return `source` marked with `precision`; fp32 keeps the plain model id because it is the default."""
    model_id = source.model_id if precision == "fp32" else f"{source.model_id}:{precision}"
    return dataclasses.replace(
        source,
        model_id=model_id,
        description=f"{source.description}, {precision} weights",
        precision=precision,
    )


def _precision_and_dtype(source: ModelSource, dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """Return the precision to load and the dtype of the model's float parts."""
    if source.precision is None:
        names = {value: name for name, value in FLOAT_DTYPES.items()}
        return names.get(dtype, str(dtype).removeprefix("torch.")), dtype
    wanted = FLOAT_DTYPES.get(source.precision, torch.float32)
    if dtype not in (torch.float32, wanted):
        raise PrecisionError(
            f"Model {source.model_id!r} requests precision {source.precision}, which conflicts "
            f"with dtype {str(dtype).removeprefix('torch.')}. Drop the suffix or set dtype to float32."
        )
    return source.precision, wanted


def _other_choices() -> str:
    names = ", ".join([SMOLLM2_135M_INSTRUCT.name, *TINY_MODELS])
    return f"use one of Molten's catalog models: {names} (see `molten models list`)."


def _pretrained_location(source: ModelSource, progress: ProgressFn | None) -> tuple[str, bool]:
    """Return the directory or hub id to pass to from_pretrained, and local_files_only.

    For tiny models this is where their tokenizer comes from: the bundled model's cache.
    """
    if source.kind in (SourceKind.BUNDLED, SourceKind.TINY):
        return str(ensure_bundled_cache(progress)), True
    if source.kind is SourceKind.GGUF_FILE:
        return str(_ensure_gguf_cache(Path(source.location), progress)), True
    if source.kind is SourceKind.LOCAL_DIR:
        return source.location, True
    return source.location, source.hub_cached


def _ensure_gguf_cache(gguf_path: Path, progress: ProgressFn | None) -> Path:
    report(progress, f"Computing sha256 of {gguf_path} to find its converted cache")
    try:
        sha256 = sha256_of_file(gguf_path)
    except OSError as error:
        raise ModelNotFoundError(f"Cannot read the GGUF file {gguf_path}: {error}") from error

    if sha256 == SMOLLM2_135M_INSTRUCT.sha256:
        cache_dir = SMOLLM2_135M_INSTRUCT.cache_dir
    else:
        safe_stem = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf_path.stem)
        cache_dir = models_cache_root() / f"{safe_stem}-{sha256[:12]}"
    if is_complete_cache(cache_dir):
        return cache_dir
    report(progress, f"Converting {gguf_path.name} into {cache_dir} (once)")
    return convert_gguf_to_cache(gguf_path, cache_dir, sha256=sha256, progress=progress)


def _load_pretrained_model(
    source: ModelSource,
    location: str,
    dtype: torch.dtype,
    attn_implementation: str | None,
    local_files_only: bool,
) -> PreTrainedModel:
    options = {"dtype": dtype, "local_files_only": local_files_only}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(location, **options)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(
            f"Failed to load the weights of model {source.model_id!r} from {location}: "
            f"{error}"
        ) from error


def _load_tokenizer(
    source: ModelSource, location: str, local_files_only: bool
) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(location, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(
            f"Failed to load the tokenizer of model {source.model_id!r} from {location}: "
            f"{error}. Molten needs the tokenizer files next to the weights."
        ) from error


def _collect_eos_token_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> frozenset[int]:
    candidates = [model.config.eos_token_id, tokenizer.eos_token_id]
    if model.generation_config is not None:
        candidates.append(model.generation_config.eos_token_id)

    eos_token_ids: set[int] = set()
    for candidate in candidates:
        if isinstance(candidate, int):
            eos_token_ids.add(candidate)
        elif isinstance(candidate, (list, tuple)):
            eos_token_ids.update(int(token_id) for token_id in candidate)
    if not eos_token_ids:
        logger.warning("Model %s defines no EOS token: only max_tokens and stop strings "
                       "will end its sequences", model.config.name_or_path)
    return frozenset(eos_token_ids)


def _find_max_model_len(
    source: ModelSource, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> int:
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        return max_positions
    # transformers sets model_max_length to a huge sentinel (about 1e30) when unknown.
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 10_000_000:
        return tokenizer_limit
    raise ModelLoadError(
        f"Cannot find the context window of model {source.model_id!r}: its config has no "
        f"max_position_embeddings and its tokenizer no model_max_length."
    )


def _bundled_is_loadable() -> bool:
    if is_complete_cache(SMOLLM2_135M_INSTRUCT.cache_dir):
        return True
    try:
        find_bundled_gguf()
    except BundledModelError:
        return False
    return True


def _bundled_entry() -> CatalogEntry:
    bundle = SMOLLM2_135M_INSTRUCT
    cache_dir = bundle.cache_dir
    common = {
        "name": bundle.name,
        "kind": SourceKind.BUNDLED,
        "description": bundle.description,
        "is_default": True,
    }
    if is_complete_cache(cache_dir):
        return CatalogEntry(
            **common,
            status="converted",
            is_available=True,
            num_bytes=directory_size_bytes(cache_dir),
            location=str(cache_dir),
        )
    try:
        gguf_path = find_bundled_gguf(bundle)
    except BundledModelError:
        return CatalogEntry(
            **common,
            status=f"missing: run {bundle.install_command}",
            is_available=False,
            num_bytes=None,
            location=None,
        )
    return CatalogEntry(
        **common,
        status="not converted yet: run `molten models fetch` (about a minute)",
        is_available=True,
        num_bytes=gguf_path.stat().st_size,
        location=str(gguf_path),
    )


def _converted_gguf_entries() -> list[CatalogEntry]:
    """Describe converted caches of user GGUF files (every cache but the bundled one)."""
    root = models_cache_root()
    if not root.is_dir():
        return []
    entries = []
    for marker_path in sorted(root.glob(f"*/{CACHE_MARKER_NAME}")):
        cache_dir = marker_path.parent
        marker = read_cache_marker(cache_dir)
        if marker is None or cache_dir == SMOLLM2_135M_INSTRUCT.cache_dir:
            continue
        source_file = Path(str(marker.get("source_file", cache_dir.name)))
        entries.append(
            CatalogEntry(
                name=str(source_file),
                kind=SourceKind.GGUF_FILE,
                description=f"converted from {source_file.name}",
                status="converted",
                is_available=True,
                is_default=False,
                num_bytes=directory_size_bytes(cache_dir),
                location=str(cache_dir),
            )
        )
    return entries

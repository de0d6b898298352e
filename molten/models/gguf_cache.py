"""Convert a GGUF file once into a cache directory that transformers loads quickly.

Loading a GGUF file through transformers parses its metadata and de-quantizes every tensor
on each call: 45 to 100 s for the 98 MB bundled SmolLM2, measured on a shared 2-core
CPU. The cache directory contains the de-quantized float32 weights as safetensors plus
the tokenizer files, which `from_pretrained` reads in about a second on the same CPU.

A cache directory is complete when it contains the marker file, which is written last,
and the whole directory is built under a temporary name and renamed into place, so an
interrupted conversion never leaves a cache that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from molten.models.errors import ModelLoadError

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str], None]
"""Receives one human-readable line per loading stage."""

CACHE_MARKER_NAME = "molten-cache.json"
CACHE_FORMAT_VERSION = 1
"""Bump when the cache layout changes, so older caches are rebuilt instead of misread."""

_PARTIAL_INFIX = ".partial-"
_HASH_CHUNK_BYTES = 4 * 1024 * 1024


def report(progress: ProgressFn | None, message: str) -> None:
    """Log a loading stage and pass it to the caller's progress callback, if any."""
    logger.info("%s", message)
    if progress is not None:
        progress(message)


def sha256_of_file(path: Path) -> str:
    """Return the hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_cache_marker(cache_dir: Path) -> dict | None:
    """Return the marker of a complete cache of the current format, else None."""
    try:
        marker = json.loads((cache_dir / CACHE_MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format_version") != CACHE_FORMAT_VERSION:
        return None
    return marker


def is_complete_cache(cache_dir: Path) -> bool:
    return read_cache_marker(cache_dir) is not None


def directory_size_bytes(path: Path) -> int:
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


def convert_gguf_to_cache(
    gguf_path: Path,
    cache_dir: Path,
    *,
    sha256: str,
    progress: ProgressFn | None = None,
) -> Path:
    """Convert `gguf_path` into `cache_dir` unless a complete cache is already there.

    `sha256` is the caller's digest of the GGUF file and is recorded in the marker.
    A file lock makes a second process wait for the first one's conversion instead of
    repeating it. Raises ModelLoadError when transformers cannot read the file.
    """
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir.parent / f".{cache_dir.name}.lock", progress):
        if is_complete_cache(cache_dir):
            report(progress, f"Another process already converted {gguf_path.name} into {cache_dir}")
            return cache_dir
        _remove_partial_dirs(cache_dir)

        partial_dir = Path(
            tempfile.mkdtemp(dir=cache_dir.parent, prefix=f".{cache_dir.name}{_PARTIAL_INFIX}")
        )
        partial_dir.chmod(0o755)  # mkdtemp creates it private (0700)
        try:
            _write_cache(gguf_path, partial_dir, sha256=sha256, progress=progress)
            _replace_dir(partial_dir, cache_dir)
        except BaseException:
            # KeyboardInterrupt included: the half-written directory must not stay.
            shutil.rmtree(partial_dir, ignore_errors=True)
            raise
    return cache_dir


def _write_cache(
    gguf_path: Path, target_dir: Path, *, sha256: str, progress: ProgressFn | None
) -> None:
    started = time.perf_counter()
    folder, file_name = str(gguf_path.parent), gguf_path.name
    try:
        report(progress, f"Parsing GGUF metadata and tokenizer of {file_name} (about 10 s)")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)

        report(progress, f"Parsing and de-quantizing the weights of {file_name} to float32")
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file_name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        raise ModelLoadError(
            f"transformers {transformers.__version__} failed to read the GGUF file "
            f"{gguf_path}: {error}. Check that the file is a complete GGUF model of an "
            f"architecture that transformers supports."
        ) from error

    # NOTE: conversion has been checked (bit-identical weights) only for the bundled Llama
    # GGUF. Architectures whose GGUF loader in transformers renames or permutes tensors
    # differently could need more than removing the quantizer.
    # The weights are plain float32 tensors now. Dropping the GGUF quantizer lets
    # save_pretrained write an ordinary checkpoint instead of one marked as quantized.
    model.hf_quantizer = None
    del model.config.quantization_config

    report(progress, f"Saving float32 safetensors and tokenizer files to {target_dir}")
    model.save_pretrained(target_dir)
    tokenizer.save_pretrained(target_dir)

    marker = {
        "format_version": CACHE_FORMAT_VERSION,
        "source_file": str(gguf_path),
        "source_sha256": sha256,
        "source_bytes": gguf_path.stat().st_size,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created_unix_s": time.time(),
    }
    (target_dir / CACHE_MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    report(progress, f"Converted {file_name} in {time.perf_counter() - started:.1f} s")


def _replace_dir(new_dir: Path, cache_dir: Path) -> None:
    """Move `new_dir` to `cache_dir`, setting aside an incomplete or outdated cache."""
    if cache_dir.exists():
        outdated = cache_dir.with_name(f".{cache_dir.name}.outdated-{os.getpid()}")
        os.rename(cache_dir, outdated)
        shutil.rmtree(outdated, ignore_errors=True)
    os.rename(new_dir, cache_dir)


def _remove_partial_dirs(cache_dir: Path) -> None:
    """Delete temporary directories left by a conversion that was killed.

    Only call this while holding the cache lock: no other conversion is running then.
    """
    for leftover in cache_dir.parent.glob(f".{cache_dir.name}{_PARTIAL_INFIX}*"):
        logger.info("Removing %s, left by an interrupted conversion", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, progress: ProgressFn | None) -> Iterator[None]:
    with lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(progress, f"Waiting for another process that holds {lock_path}")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)

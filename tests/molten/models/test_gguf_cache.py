"""Converting GGUF files into cache directories: atomic writes and reuse."""

from __future__ import annotations

import json
import time

import pytest
import torch

from molten.models import SMOLLM2_135M_INSTRUCT, find_bundled_gguf, load_model
from molten.models import gguf_cache
from molten.models.gguf_cache import CACHE_MARKER_NAME, convert_gguf_to_cache, is_complete_cache


def fake_write_cache(calls: list):
    """Stand in for the slow transformers conversion: write a weights file and the marker."""

    def write(gguf_path, target_dir, *, sha256, progress):
        calls.append(target_dir)
        (target_dir / "model.safetensors").write_bytes(b"weights")
        marker = {"format_version": gguf_cache.CACHE_FORMAT_VERSION, "source_sha256": sha256}
        (target_dir / CACHE_MARKER_NAME).write_text(json.dumps(marker))

    return write


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "source" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF")
    return path


def test_conversion_writes_complete_cache(tmp_path, gguf_file, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf_cache, "_write_cache", fake_write_cache(calls))
    cache_dir = tmp_path / "cache" / "model-abc"

    result = convert_gguf_to_cache(gguf_file, cache_dir, sha256="abc")

    assert result == cache_dir
    assert is_complete_cache(cache_dir)
    assert (cache_dir / "model.safetensors").read_bytes() == b"weights"
    assert [path.name for path in cache_dir.parent.iterdir() if path.name.startswith(".model-abc.partial")] == []


def test_complete_cache_is_not_rebuilt(tmp_path, gguf_file, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf_cache, "_write_cache", fake_write_cache(calls))
    cache_dir = tmp_path / "cache" / "model-abc"

    convert_gguf_to_cache(gguf_file, cache_dir, sha256="abc")
    convert_gguf_to_cache(gguf_file, cache_dir, sha256="abc")

    assert len(calls) == 1


def test_interrupted_conversion_leaves_nothing(tmp_path, gguf_file, monkeypatch):
    def write_then_interrupt(gguf_path, target_dir, *, sha256, progress):
        (target_dir / "model.safetensors").write_bytes(b"half of the weights")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "_write_cache", write_then_interrupt)
    cache_dir = tmp_path / "cache" / "model-abc"

    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_cache(gguf_file, cache_dir, sha256="abc")

    assert not cache_dir.exists()
    leftovers = [path.name for path in cache_dir.parent.iterdir() if not path.name.endswith(".lock")]
    assert leftovers == []


def test_killed_conversion_partial_dir_removed(tmp_path, gguf_file, monkeypatch):
    monkeypatch.setattr(gguf_cache, "_write_cache", fake_write_cache([]))
    cache_dir = tmp_path / "cache" / "model-abc"
    stale = cache_dir.parent / ".model-abc.partial-12345-xyz"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"from a killed process")

    convert_gguf_to_cache(gguf_file, cache_dir, sha256="abc")

    assert not stale.exists()
    assert is_complete_cache(cache_dir)


def test_cache_without_marker_is_rebuilt(tmp_path, gguf_file, monkeypatch):
    calls = []
    monkeypatch.setattr(gguf_cache, "_write_cache", fake_write_cache(calls))
    cache_dir = tmp_path / "cache" / "model-abc"
    cache_dir.mkdir(parents=True)
    (cache_dir / "config.json").write_text("{}")

    assert not is_complete_cache(cache_dir)
    convert_gguf_to_cache(gguf_file, cache_dir, sha256="abc")

    assert len(calls) == 1
    assert is_complete_cache(cache_dir)
    assert not (cache_dir / "config.json").exists()


def test_older_cache_format_is_incomplete(tmp_path):
    cache_dir = tmp_path / "model-abc"
    cache_dir.mkdir()
    marker = {"format_version": gguf_cache.CACHE_FORMAT_VERSION - 1}
    (cache_dir / CACHE_MARKER_NAME).write_text(json.dumps(marker))

    assert not is_complete_cache(cache_dir)


@pytest.mark.slow
def test_bundled_conversion_reused_and_exact(tmp_path, monkeypatch):
    """Convert the bundled GGUF into an empty MOLTEN_HOME, then load it again from the cache.

    The cached float32 weights must equal a direct GGUF load bit for bit.
    """
    monkeypatch.setenv("MOLTEN_HOME", str(tmp_path / "molten-home"))
    first_stages, second_stages = [], []

    started = time.perf_counter()
    first = load_model(progress=first_stages.append)
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    second = load_model(progress=second_stages.append)
    second_seconds = time.perf_counter() - started
    print(f"bundled model: first load (converts) {first_seconds:.1f} s, second load {second_seconds:.1f} s")

    cache_dir = SMOLLM2_135M_INSTRUCT.cache_dir
    assert cache_dir.parent == tmp_path / "molten-home" / "models"
    assert is_complete_cache(cache_dir)
    assert any("Verifying size and sha256" in stage for stage in first_stages)
    assert any("Parsing GGUF metadata" in stage for stage in first_stages)
    assert any("Saving float32 safetensors" in stage for stage in first_stages)
    assert not any("Verifying" in stage or "Converting" in stage for stage in second_stages)
    assert second_seconds < first_seconds / 3

    from transformers import AutoModelForCausalLM

    gguf_path = find_bundled_gguf()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    direct_state = direct.state_dict()
    cached_state = second.model.state_dict()
    assert cached_state.keys() == direct_state.keys()
    for name, tensor in direct_state.items():
        assert torch.equal(cached_state[name], tensor), name
    assert first.tokenizer.get_vocab() == second.tokenizer.get_vocab()

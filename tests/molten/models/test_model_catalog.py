"""Resolving model specs, loading each kind, listing the catalog, and the models CLI."""

from __future__ import annotations

import pytest
import torch

from molten.cli import main
from molten.models import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    SourceKind,
    build_tiny_model,
    find_bundled_gguf,
    list_models,
    load_model,
    load_tokenizer,
    resolve_model,
    TINY_MODELS,
)
from molten.models import hub


@pytest.mark.parametrize("spec", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct", "SMOLLM2-135M-INSTRUCT"])
def test_resolve_bundled_aliases(spec):
    source = resolve_model(spec)

    assert source.kind is SourceKind.BUNDLED
    assert source.model_id == "smollm2-135m-instruct"


def test_default_model_is_bundled():
    assert resolve_model().kind is SourceKind.BUNDLED
    assert DEFAULT_MODEL == "smollm2-135m-instruct"


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-qwen2"])
def test_resolve_tiny_models(name):
    source = resolve_model(name)

    assert source.kind is SourceKind.TINY
    assert source.model_id == name


def test_resolve_local_directory(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")

    source = resolve_model(str(model_dir))

    assert source.kind is SourceKind.LOCAL_DIR
    assert source.model_id == "my-model"
    assert source.location == str(model_dir)


def test_resolve_gguf_file(tmp_path):
    gguf_path = tmp_path / "weights.Q8_0.gguf"
    gguf_path.write_bytes(b"GGUF")

    source = resolve_model(str(gguf_path))

    assert source.kind is SourceKind.GGUF_FILE
    assert source.model_id == "weights.Q8_0"


def test_resolve_relative_path(tmp_path, monkeypatch):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)

    source = resolve_model("./weights.gguf")

    assert source.location == str(tmp_path / "weights.gguf")


@pytest.mark.parametrize("spec", ["/no/such/model-dir", "./missing-model", "missing.gguf", "~/no-such-molten-model"])
def test_missing_local_path_rejected(spec):
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model(spec)

    message = str(caught.value)
    assert spec in message
    assert "no such file or directory" in message
    assert "tiny-random-llama" in message


def test_directory_without_config_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="directory has no config.json"):
        resolve_model(str(tmp_path))


def test_non_gguf_file_rejected(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"")

    with pytest.raises(ModelNotFoundError, match="file is not a .gguf file"):
        resolve_model(str(weights))


@pytest.mark.parametrize("spec", ["", "   ", "not a model id", "two//slashes"])
def test_invalid_spec_rejected(spec):
    with pytest.raises(ModelNotFoundError):
        resolve_model(spec)


def test_hub_id_offline_names_model():
    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("molten-tests/no-such-model")

    message = str(caught.value)
    assert "'molten-tests/no-such-model'" in message
    assert "HF_HUB_OFFLINE" in message
    assert "smollm2-135m-instruct" in message


def test_hub_id_unreachable_names_model(monkeypatch):
    """With offline mode off, a hub that refuses connections gives a clear error at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(hub, "is_hub_offline", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Port 9 on loopback: nothing listens there, so the connection is refused locally.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")

    with pytest.raises(ModelNotFoundError) as caught:
        resolve_model("molten-tests/no-such-model", hub_timeout_s=2.0)

    message = str(caught.value)
    assert "'molten-tests/no-such-model'" in message
    assert "could not be reached" in message
    assert "ConnectError" in message


def test_load_local_directory(tmp_path):
    model_dir = tmp_path / "saved-tiny"
    tiny = build_tiny_model(TINY_MODELS["tiny-random-qwen2"])
    tiny.save_pretrained(model_dir)
    load_tokenizer("tiny-random-qwen2").save_pretrained(model_dir)

    loaded = load_model(str(model_dir))

    assert loaded.source.kind is SourceKind.LOCAL_DIR
    assert loaded.model_id == "saved-tiny"
    assert loaded.max_model_len == 2048
    assert loaded.eos_token_ids == {2}
    for name, tensor in tiny.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_load_gguf_path_reuses_bundled_cache():
    stages = []

    loaded = load_model(str(find_bundled_gguf()), progress=stages.append)

    assert loaded.source.kind is SourceKind.GGUF_FILE
    assert loaded.model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert not any("Converting" in stage for stage in stages)


def test_list_models_covers_catalog():
    entries = {entry.name: entry for entry in list_models()}

    assert {"smollm2-135m-instruct", "tiny-random-llama", "tiny-random-qwen2"} <= entries.keys()
    assert entries["smollm2-135m-instruct"].is_default
    assert entries["smollm2-135m-instruct"].is_available
    assert not entries["tiny-random-llama"].is_default
    assert entries["tiny-random-llama"].num_bytes == 4 * sum(
        parameter.numel() for parameter in build_tiny_model(TINY_MODELS["tiny-random-llama"]).parameters()
    )


def test_list_models_empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOLTEN_HOME", str(tmp_path))

    bundled = next(entry for entry in list_models() if entry.is_default)

    assert bundled.status.startswith("not converted yet")
    assert bundled.num_bytes == 98_362_432


def test_cli_models_list(capsys):
    assert main(["models", "list"]) == 0

    output = capsys.readouterr().out
    assert "smollm2-135m-instruct (default)" in output
    assert "tiny-random-qwen2" in output


def test_cli_fetch_missing_model(capsys):
    assert main(["models", "fetch", "molten-tests/no-such-model"]) == 1

    error_output = capsys.readouterr().err
    assert "molten: error: Model 'molten-tests/no-such-model'" in error_output
    assert "Traceback" not in error_output


def test_cli_fetch_tiny_model(capsys):
    assert main(["models", "fetch", "tiny-random-llama"]) == 0

    captured = capsys.readouterr()
    assert "tiny-random-llama is ready" in captured.out
    assert "[molten] Loaded tiny-random-llama" in captured.err


def test_cli_models_without_subcommand(capsys):
    assert main(["models"]) == 2
    assert "fetch" in capsys.readouterr().out

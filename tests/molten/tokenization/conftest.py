"""Tokenizers for the tokenization tests: SmolLM2's real one and a small Llama-style one."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

SMOLLM2_TOKENIZER_DIR = Path("/tmp/smolcache")


def load_smollm2_tokenizer():
    """Load SmolLM2-135M-Instruct's tokenizer from molten.models if it can, else from a local copy."""
    try:
        from molten.models import load_tokenizer
    except ImportError:
        load_tokenizer = None
    if load_tokenizer is not None:
        return load_tokenizer("smollm2-135m-instruct")

    from transformers import AutoTokenizer

    if not (SMOLLM2_TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip(f"SmolLM2 tokenizer not found: molten.models.load_tokenizer is missing and {SMOLLM2_TOKENIZER_DIR} is empty")
    return AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER_DIR)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    return load_smollm2_tokenizer()


def build_llama_style_tokenizer(add_bos: bool = False, chat_template: str | None = None):
    """Build a tiny SentencePiece-style tokenizer in memory.

    It behaves like Llama 2's: words start with "▁", characters outside its small
    vocabulary fall back to one token per UTF-8 byte (<0xE6>), and the decoder strips
    the leading space of the first token. `add_bos` makes encoding prepend <s>.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁" + string.ascii_letters + string.digits + ".,:!?'-\né":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "s"), ("▁", "is")]
    for left, right in merges:
        vocab[left + right] = len(vocab)

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def llama_style_tokenizer():
    return build_llama_style_tokenizer()


@pytest.fixture(scope="session")
def make_llama_style_tokenizer():
    """Factory for Llama-style tokenizers with a chosen BOS behavior and chat template."""
    return build_llama_style_tokenizer

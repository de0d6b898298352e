"""Data files shipped with Molten: the perplexity corpus."""

from __future__ import annotations

from importlib import resources

CORPUS_FILE = "public_domain_corpus.txt"
"""Public-domain English text (U.S. founding documents and two Lincoln speeches)."""


def load_corpus_text() -> str:
    """Return the perplexity corpus without its `# ` header lines."""
    text = resources.files(__package__).joinpath(CORPUS_FILE).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.startswith("# ")]
    return "\n".join(lines).strip() + "\n"

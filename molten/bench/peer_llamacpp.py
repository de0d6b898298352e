"""The llama.cpp peer, through `llama-cpp-python` (the optional `llamacpp` extra).

It runs the bundled model's own GGUF file (Q4_1 weights), one request at a time,
greedy, and stops after the requested token count (`Llama.generate` does not stop at
EOS by itself).
"""

from __future__ import annotations

import time
from pathlib import Path

from molten.bench.door_engine import BenchTimeoutError
from molten.bench.metrics import RequestRecord, RequestSpec

INSTALL_HINT = "pip install 'molten[llamacpp]' (or: pip install llama-cpp-python)"


class LlamaCppUnavailableError(RuntimeError):
    """llama-cpp-python is not installed, or the GGUF file is missing."""


def gguf_path_for(model: str) -> Path:
    """Find the GGUF file llama.cpp runs for `model`: the bundled file, or `model` itself when it is a .gguf path.

    Raises LlamaCppUnavailableError for any other model, since llama.cpp reads only GGUF.
    """
    from molten.models import BundledModelError, SourceKind, find_bundled_gguf, resolve_model

    source = resolve_model(model)
    if source.kind is SourceKind.BUNDLED:
        try:
            return find_bundled_gguf()
        except BundledModelError as exc:
            raise LlamaCppUnavailableError(str(exc)) from None
    if source.kind is SourceKind.GGUF_FILE:
        return Path(source.location)
    raise LlamaCppUnavailableError(f"llama.cpp needs a GGUF file, and model {model!r} is {source.description}")


class LlamaCppPeer:
    def __init__(self, gguf_path: str, num_threads: int, context_len: int):
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise LlamaCppUnavailableError(f"llama-cpp-python is not importable ({exc}); {INSTALL_HINT}") from None
        self.llm = Llama(
            model_path=gguf_path,
            n_ctx=context_len,
            n_batch=512,
            n_threads=num_threads,
            n_threads_batch=num_threads,
            seed=0,
            verbose=False,
        )

    def warm_up(self) -> None:
        self.run([RequestSpec(list(range(1000, 1016)), 4)], time_limit_s=600)

    def run(self, requests: list[RequestSpec], time_limit_s: float) -> list[RequestRecord]:
        """Run `requests` one after another; arrival times are ignored. Raises BenchTimeoutError past the limit."""
        deadline = time.perf_counter() + time_limit_s
        records = []
        for spec in requests:
            # reset() drops the previous prompt, so llama.cpp cannot reuse its KV cache.
            self.llm.reset()
            record = RequestRecord(spec=spec, sent_time=time.perf_counter())
            for token_id in self.llm.generate(spec.prompt_token_ids, temp=0.0, repeat_penalty=1.0, reset=True):
                record.add_token(time.perf_counter(), int(token_id))
                if record.num_output_tokens >= spec.max_tokens:
                    break
                if time.perf_counter() > deadline:
                    raise BenchTimeoutError(f"llama.cpp run exceeded {time_limit_s:.0f} s")
            records.append(record)
        return records

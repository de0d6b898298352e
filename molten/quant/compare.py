"""Compare precision variants of one model: memory, speed, perplexity and drift from fp32.

For each precision the model is loaded as `<model>:<precision>` and measured in turn:

- weight memory: `LoadedModel.weight_bytes` (integer weights, scales and zero points);
- perplexity on molten/data's public-domain corpus, with a sliding window through the
  model's forward, and the per-token drift of the same target tokens' logprobs from
  fp32 (mean and max of |logprob - logprob_fp32|) plus top-1 agreement;
- through Molten's engine: TTFT of one prompt, single-stream decode tokens/s, and
  decode tokens/s of a batch of prompts run together.

fp32 is always measured first, because it is the reference for drift. Precisions the
device cannot run (fp16 on CPU) become rows carrying the load error.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from molten.config import CacheConfig, EngineConfig, SchedulerConfig
from molten.data import load_corpus_text
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams
from molten.models import LoadedModel, load_model
from molten.models.errors import PrecisionError
from molten.models.precision import PRECISIONS, split_precision

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""Receives one line per stage of the comparison."""


@dataclass(frozen=True)
class ComparisonSettings:
    """Workload sizes of one comparison. `for_quick` shrinks them for tests and previews."""

    max_corpus_tokens: int | None = None
    """Corpus tokens scored for perplexity and drift; None scores the whole corpus."""
    window_tokens: int = 512
    """Tokens per sliding window of the perplexity pass."""
    stride_tokens: int = 256
    """Tokens the window advances by. Each window scores only the targets no earlier window scored."""
    prompt_tokens: int = 128
    """Prompt length of the TTFT and decode runs."""
    new_tokens: int = 64
    """Tokens generated per request in the decode runs."""
    batch_size: int = 16
    """Requests decoded together in the batched run."""
    num_threads: int | None = None
    """Torch intra-op threads during the run; None keeps the current setting."""

    @classmethod
    def for_quick(cls, num_threads: int | None = None) -> ComparisonSettings:
        return cls(
            max_corpus_tokens=256,
            window_tokens=128,
            stride_tokens=64,
            prompt_tokens=16,
            new_tokens=8,
            batch_size=4,
            num_threads=num_threads,
        )

    def validate(self) -> None:
        if self.window_tokens < 2:
            raise ValueError(f"window_tokens must be at least 2, got {self.window_tokens}")
        if not 1 <= self.stride_tokens <= self.window_tokens:
            raise ValueError(f"stride_tokens must be between 1 and window_tokens, got {self.stride_tokens}")
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.batch_size < 1:
            raise ValueError("prompt_tokens and batch_size must be at least 1 and new_tokens at least 2")


@dataclass
class PrecisionRow:
    """Measurements of one precision. Every figure is None when `error` is set, and the
    drift fields are None for fp32 itself."""

    precision: str
    model_id: str
    weight_bytes: int | None = None
    weight_fraction_of_fp32: float | None = None
    """weight_bytes divided by fp32's weight_bytes."""
    ttft_ms: float | None = None
    """Time to first token of one `prompt_tokens` prompt, engine step to engine step."""
    single_stream_tokens_per_s: float | None = None
    """Decode tokens/s of one request, after its first token."""
    batched_tokens_per_s: float | None = None
    """Decode tokens/s summed over `batch_size` requests decoded together."""
    single_stream_speedup: float | None = None
    """single_stream_tokens_per_s divided by fp32's."""
    perplexity: float | None = None
    perplexity_change_pct: float | None = None
    """Percent change of perplexity against fp32."""
    logprob_drift_mean: float | None = None
    """Mean over corpus targets of |logprob - logprob_fp32| in nats."""
    logprob_drift_max: float | None = None
    top1_agreement: float | None = None
    """Fraction of corpus positions whose argmax token equals fp32's."""
    load_seconds: float | None = None
    error: str | None = None


@dataclass
class PrecisionComparison:
    """Result of `compare_precisions`: one row per precision, fp32 first."""

    model: str
    settings: ComparisonSettings
    rows: list[PrecisionRow]
    environment: dict = field(default_factory=dict)
    """Torch version, threads, CPU count and load average when the run started and ended."""
    num_corpus_tokens: int = 0

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "settings": asdict(self.settings),
            "environment": self.environment,
            "num_corpus_tokens": self.num_corpus_tokens,
            "rows": [asdict(row) for row in self.rows],
        }

    def to_markdown(self) -> str:
        header = (
            "| precision | weight MB | of fp32 | TTFT ms | decode tok/s | speed-up | "
            f"batched tok/s (x{self.settings.batch_size}) | perplexity | change | "
            "drift mean | drift max | top-1 agree |"
        )
        lines = [header, "|" + " --- |" * 12]
        for row in self.rows:
            if row.error is not None:
                lines.append(f"| {row.precision} | rejected: {row.error} |" + " |" * 10)
                continue
            cells = [
                row.precision,
                _format(row.weight_bytes and row.weight_bytes / 1e6, "{:.1f}"),
                _format(row.weight_fraction_of_fp32, "{:.1%}"),
                _format(row.ttft_ms, "{:.0f}"),
                _format(row.single_stream_tokens_per_s, "{:.1f}"),
                _format(row.single_stream_speedup, "{:.2f}x"),
                _format(row.batched_tokens_per_s, "{:.1f}"),
                _format(row.perplexity, "{:.3f}"),
                _format(row.perplexity_change_pct, "{:+.2f}%"),
                _format(row.logprob_drift_mean, "{:.4f}"),
                _format(row.logprob_drift_max, "{:.3f}"),
                _format(row.top1_agreement, "{:.1%}"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def save_plot(self, path) -> None:
        """Write a PNG with four bar charts: weight memory, decode speed, perplexity, drift."""
        from molten.quant.plot import save_comparison_plot

        save_comparison_plot(self, path)


def compare_precisions(
    model: str,
    precisions: list[str],
    *,
    quick: bool = False,
    progress: Progress | None = None,
    settings: ComparisonSettings | None = None,
) -> PrecisionComparison:
    """Measure each precision of `model` side by side (see the module docstring).

    `model` is a model id without a precision suffix. `quick` uses the small workload of
    `ComparisonSettings.for_quick()`, and `settings`, when given, replaces both. Raises PrecisionError for a name that is not a precision.
    """
    base_model, suffix = split_precision(model)
    if suffix is not None:
        raise PrecisionError(f"compare_precisions takes a model id without a precision suffix, got {model!r}")
    unknown = [name for name in precisions if name not in PRECISIONS]
    if unknown:
        raise PrecisionError(f"Unknown precisions {unknown}: choose from {', '.join(PRECISIONS)}")
    if settings is None:
        settings = ComparisonSettings.for_quick() if quick else ComparisonSettings()
    settings.validate()
    report = progress or (lambda message: None)

    ordered = ["fp32"] + [name for name in dict.fromkeys(precisions) if name != "fp32"]
    previous_threads = torch.get_num_threads()
    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    environment = _environment()
    try:
        corpus_ids: list[int] = []
        reference: CorpusScores | None = None
        rows = []
        for precision in ordered:
            report(f"Loading {base_model}:{precision}")
            row, scores, scored_ids = _measure_precision(base_model, precision, settings, reference, report)
            corpus_ids = scored_ids or corpus_ids
            if precision == "fp32":
                reference = scores
            rows.append(row)
        _fill_ratios(rows)
    finally:
        torch.set_num_threads(previous_threads)
    environment["load_average_end"] = _load_average()
    comparison = PrecisionComparison(base_model, settings, rows, environment, len(corpus_ids))
    if "fp32" not in precisions:
        comparison.rows = [row for row in rows if row.precision != "fp32"]
    return comparison


@dataclass
class CorpusScores:
    target_logprobs: torch.Tensor
    """[num_targets] float32 logprob of each scored corpus token."""
    argmax_ids: torch.Tensor
    """[num_targets] the model's top-1 prediction at each scored position."""


def _measure_precision(
    base_model: str,
    precision: str,
    settings: ComparisonSettings,
    reference: CorpusScores | None,
    report: Progress,
) -> tuple[PrecisionRow, CorpusScores | None, list[int]]:
    model_id = f"{base_model}:{precision}"
    try:
        loaded = load_model(model_id)
    except PrecisionError as error:
        logger.info("Precision %s of %s rejected: %s", precision, base_model, error)
        return PrecisionRow(precision=precision, model_id=model_id, error=str(error)), None, []
    row = PrecisionRow(
        precision=precision,
        model_id=loaded.model_id,
        weight_bytes=loaded.weight_bytes,
        load_seconds=round(loaded.load_seconds, 2),
    )

    corpus_ids = loaded.tokenizer(load_corpus_text())["input_ids"][: settings.max_corpus_tokens]
    report(f"{precision}: perplexity over {len(corpus_ids)} corpus tokens")
    scores = score_corpus(loaded.model, corpus_ids, settings)
    row.perplexity = math.exp(-scores.target_logprobs.double().mean().item())
    if reference is not None:
        drift = (scores.target_logprobs - reference.target_logprobs).abs()
        row.logprob_drift_mean = drift.mean().item()
        row.logprob_drift_max = drift.max().item()
        row.top1_agreement = (scores.argmax_ids == reference.argmax_ids).float().mean().item()

    # The engine points the model at its paged attention, so the plain forward passes
    # above must come first.
    report(f"{precision}: TTFT and decode speed in the engine")
    _measure_engine(loaded, corpus_ids, settings, row)
    del loaded
    gc.collect()
    return row, scores, corpus_ids


@torch.inference_mode()
def score_corpus(model: torch.nn.Module, corpus_ids: list[int], settings: ComparisonSettings) -> CorpusScores:
    """Score every corpus token after the first with a sliding window.

    Each window of `window_tokens` scores only the targets no earlier window scored, so
    every target has at least `window_tokens - stride_tokens` tokens of context (all
    earlier tokens near the start of the corpus)."""
    ids = torch.tensor(corpus_ids, dtype=torch.long)
    logprob_parts: list[torch.Tensor] = []
    argmax_parts: list[torch.Tensor] = []
    scored_end = 1  # corpus index of the first target not scored yet (token 0 has no context)
    for start in range(0, len(ids) - 1, settings.stride_tokens):
        end = min(start + settings.window_tokens, len(ids))
        window = ids[start:end].unsqueeze(0)  # [1, window]
        logits = model(input_ids=window).logits[0, :-1].float()  # [window - 1, vocab], predicts start+1..end-1
        first = scored_end - (start + 1)
        logprobs = torch.log_softmax(logits[first:], dim=-1)
        targets = window[0, 1:][first:]
        logprob_parts.append(logprobs.gather(1, targets[:, None]).squeeze(1))
        argmax_parts.append(logits[first:].argmax(dim=-1))
        scored_end = end
        if end == len(ids):
            break
    return CorpusScores(torch.cat(logprob_parts), torch.cat(argmax_parts))


def _measure_engine(loaded: LoadedModel, corpus_ids: list[int], settings: ComparisonSettings, row: PrecisionRow) -> None:
    max_model_len = settings.prompt_tokens + settings.new_tokens + 1
    config = EngineConfig(
        model=loaded.model_id,
        dtype=str(loaded.dtype).removeprefix("torch."),
        max_model_len=max_model_len,
        cache=CacheConfig(kv_cache_memory_mib=64, enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            max_num_seqs=max(settings.batch_size, 1),
            max_num_batched_tokens=max(settings.batch_size * settings.prompt_tokens, max_model_len),
        ),
    )
    engine = LLMEngine(config, loaded)
    params = SamplingParams(max_tokens=settings.new_tokens, temperature=0.0, ignore_eos=True)
    prompts = [_prompt(corpus_ids, settings.prompt_tokens, offset) for offset in range(settings.batch_size)]

    _run_batch(engine, prompts[:1], params, "warm-up")
    first_times, end_time, start = _run_batch(engine, prompts[:1], params, "single")
    row.ttft_ms = (first_times[0] - start) * 1000
    row.single_stream_tokens_per_s = (settings.new_tokens - 1) / (end_time - first_times[0])

    first_times, end_time, _ = _run_batch(engine, prompts, params, "batched")
    decode_start = max(first_times)
    num_decode_tokens = len(prompts) * (settings.new_tokens - 1)
    # Requests that got their first token earlier decode a few tokens before
    # decode_start; counting all tokens slightly flatters the batched figure.
    row.batched_tokens_per_s = num_decode_tokens / (end_time - decode_start)


def _run_batch(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, label: str
) -> tuple[list[float], float, float]:
    """Run `prompts` together; return each one's first-token time, the end time and the start time."""
    start = time.perf_counter()
    request_ids = [f"{label}-{index}" for index in range(len(prompts))]
    for request_id, prompt in zip(request_ids, prompts):
        engine.add_request(request_id, prompt, params)
    first_times: dict[str, float] = {}
    max_steps = len(prompts) * (params.max_tokens + 2) + 16
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        events = engine.step()
        now = time.perf_counter()
        for event in events:
            first_times.setdefault(event.request_id, now)
    else:
        raise RuntimeError(f"the {label} run did not finish within {max_steps} engine steps")
    return [first_times[request_id] for request_id in request_ids], time.perf_counter(), start


def _prompt(corpus_ids: list[int], num_tokens: int, offset: int) -> list[int]:
    """Take `num_tokens` corpus tokens starting at a different place for each `offset`."""
    tokens = corpus_ids * (num_tokens // max(len(corpus_ids), 1) + 2)
    begin = (offset * 37) % max(len(corpus_ids), 1)
    return tokens[begin : begin + num_tokens]


def _fill_ratios(rows: list[PrecisionRow]) -> None:
    reference = next((row for row in rows if row.precision == "fp32" and row.error is None), None)
    if reference is None:
        return
    for row in rows:
        if row.error is not None:
            continue
        row.weight_fraction_of_fp32 = row.weight_bytes / reference.weight_bytes
        row.single_stream_speedup = row.single_stream_tokens_per_s / reference.single_stream_tokens_per_s
        row.perplexity_change_pct = (row.perplexity / reference.perplexity - 1) * 100


def _environment() -> dict:
    return {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_start": _load_average(),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def _format(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def main(argv: list[str] | None = None) -> None:
    """Run a comparison from the command line and write comparison.json, .md and .png."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m molten.quant.compare", description=main.__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model id without a precision suffix")
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4", help="comma-separated precisions")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="small workload, for a preview")
    parser.add_argument("--out", type=Path, required=True, help="directory for the result files")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base = ComparisonSettings.for_quick() if args.quick else ComparisonSettings()
    settings = ComparisonSettings(**{**asdict(base), "num_threads": args.threads})
    comparison = compare_precisions(
        args.model, args.precisions.split(","), settings=settings, progress=lambda line: logger.info("%s", line)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(comparison.to_dict(), indent=2))
    (args.out / "comparison.md").write_text(comparison.to_markdown())
    comparison.save_plot(args.out / "comparison.png")
    print(comparison.to_markdown())


if __name__ == "__main__":
    main()

"""Stage 6: speculative decoding's speedup against k and the acceptance rate.

A drafter proposes k tokens cheaply. The target model scores all of them in one step and
keeps the prefix it agrees with, plus one token of its own. A step then costs a little
more than a plain decode step (k more rows through the weights it reads anyway), and
emits 1 + (accepted drafts) tokens. Speculation pays when the extra tokens per step
outweigh the extra cost per step, so the speedup depends on the acceptance rate, which
depends on how predictable the text is for the drafter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from molten.config import SPECULATIVE_METHODS, SpeculativeConfig
from molten.experiments.measure import (
    Progress,
    RunResult,
    build_engine,
    kv_cache_mib_for,
    load_for_experiment,
    make_prompt,
    run_requests,
    warm_up,
)
from molten.experiments.plotting import two_panel_plot
from molten.experiments.stages.base import Stage, StageResult, StageSettingsError, check_positive

logger = logging.getLogger(__name__)


@dataclass
class SpeculativeSettings:
    model: str = "smollm2-135m-instruct"
    """Target model (catalog name, directory, .gguf file or hub id)."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    method: str = "ngram"
    """Drafter: `ngram` (prompt lookup) or `draft` (a draft model, or the target's first layers)."""
    k_values: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Draft tokens per step (k), one run each, beside a run without speculation."""
    prompt_tokens: int = 128
    """Prompt length in tokens. The prompt repeats one paragraph, which the n-gram drafter can copy from."""
    prompt_text: str = ""
    """Text to use as the whole prompt instead (prompt_tokens is then ignored), to see acceptance on other text."""
    max_tokens: int = 64
    """Tokens generated per run (greedy, EOS ignored)."""
    draft_model: str = ""
    """Draft model for `method=draft`; empty uses the target's own first `draft_num_layers` layers."""
    draft_num_layers: int = 4
    """Decoder layers of the target that the self-draft runs, when `draft_model` is empty."""
    time_limit_s: float = 900.0
    """Seconds after which one run is stopped with an error."""

    def validate(self) -> None:
        if self.method not in SPECULATIVE_METHODS or self.method == "none":
            raise StageSettingsError("method", f"method must be 'ngram' or 'draft', got {self.method!r}")
        check_positive("k_values", self.k_values)
        check_positive("prompt_tokens", self.prompt_tokens)
        check_positive("max_tokens", self.max_tokens)
        if self.max_tokens < 2:
            raise StageSettingsError("max_tokens", "max_tokens must be at least 2: speculation starts after the first token")


QUICK = {"model": "tiny-random-llama", "k_values": [1, 2, 4], "prompt_tokens": 48, "max_tokens": 16}

COLUMNS = [
    "k",
    "acceptance rate",
    "tokens per step",
    "decode step ms (mean)",
    "decode tokens/s",
    "speedup vs no speculation",
    "same tokens as no speculation",
]


def _decode_figures(result: RunResult) -> tuple[float, float, int]:
    """Return (mean decode step ms, decode tokens/s, decode steps) of a single-request run."""
    request = result.requests[0]
    decode_s = request.token_times[-1] - request.token_times[0]
    num_decode_steps = max(1, len(result.steps) - 1)
    num_decode_tokens = len(request.token_times) - 1
    return decode_s * 1000 / num_decode_steps, num_decode_tokens / decode_s if decode_s else 0.0, num_decode_steps


def run(settings: SpeculativeSettings, progress: Progress) -> StageResult:
    loaded = load_for_experiment(settings.model, settings.dtype, progress)
    if settings.prompt_text.strip():
        prompt = loaded.tokenizer.encode(settings.prompt_text, add_special_tokens=False)
    else:
        prompt = make_prompt(loaded.tokenizer, settings.prompt_tokens)
    max_model_len = len(prompt) + settings.max_tokens + max(settings.k_values) + 2

    def measure(speculative: SpeculativeConfig | None) -> tuple[RunResult, object]:
        engine = build_engine(
            loaded, dtype=settings.dtype, max_model_len=max_model_len, max_num_seqs=1,
            kv_cache_mib=kv_cache_mib_for(loaded, max_model_len + 64), speculative=speculative,
        )
        warm_up(engine, loaded.tokenizer)
        engine.spec_stats = type(engine.spec_stats)(engine.spec_stats.num_speculative_tokens)
        result = run_requests(engine, [prompt], settings.max_tokens, settings.time_limit_s)
        return result, engine.spec_stats

    progress("without speculation")
    baseline, _ = measure(None)
    base_step_ms, base_tokens_per_s, _ = _decode_figures(baseline)
    base_tokens = baseline.requests[0].token_ids
    rows = [[0, None, 1.0, round(base_step_ms, 2), round(base_tokens_per_s, 1), 1.0, True]]
    for k in sorted(settings.k_values):
        progress(f"{settings.method} drafter, k={k}")
        speculative = SpeculativeConfig(
            method=settings.method,
            num_speculative_tokens=k,
            draft_model=settings.draft_model or None,
            draft_num_layers=settings.draft_num_layers,
        )
        result, stats = measure(speculative)
        step_ms, tokens_per_s, num_steps = _decode_figures(result)
        rows.append([
            k,
            round(stats.acceptance_rate, 3),
            round((len(result.requests[0].token_times) - 1) / num_steps, 2),
            round(step_ms, 2),
            round(tokens_per_s, 1),
            round(tokens_per_s / base_tokens_per_s, 2) if base_tokens_per_s else None,
            result.requests[0].token_ids == base_tokens,
        ])
    best = max(rows[1:], key=lambda row: row[4])
    summary = {
        "method": settings.method,
        "baseline_decode_tokens_per_s": rows[0][4],
        "best_k": best[0],
        "best_speedup": best[5],
        "acceptance_rate_at_best_k": best[1],
        "all_outputs_equal_baseline": all(row[6] for row in rows),
    }
    ks = [row[0] for row in rows[1:]]
    plot = two_panel_plot(
        f"Speculative decoding ({settings.method}): {loaded.model_id}, {settings.dtype}",
        "k (draft tokens per step)",
        ks,
        ("speedup vs no speculation", {"speedup": [row[5] for row in rows[1:]],
                                        "tokens per step": [row[2] for row in rows[1:]]}),
        ("acceptance rate", {"acceptance rate": [row[1] for row in rows[1:]]}),
    )
    explanation = (
        "## What this measures\n\n"
        f"One greedy request ({len(prompt)}-token prompt, {settings.max_tokens} new tokens) through "
        f"`LLMEngine` in-process, without speculation and then with the `{settings.method}` drafter for each k. "
        "Acceptance rate is accepted drafts over drafts verified; tokens per step counts every token after "
        "the first over the decode steps. "
        + ("The prompt was the text given in `prompt_text`.\n\n" if settings.prompt_text.strip() else
           "The prompt repeats one paragraph, so a model that continues it gives the n-gram drafter an easy "
           "target: set `prompt_text` to see acceptance on other text.\n\n")
        + "## What to expect, and why\n\n"
        "A plain decode step reads all weights to emit one token. A verification step reads them once to "
        "score k drafts and emits 1 + a tokens, where a is the number accepted. With a per-draft acceptance "
        "probability p, the expected tokens per step is (1 - p^(k+1)) / (1 - p). Speculation beats plain "
        "decoding when that number exceeds the verification step's cost relative to a plain step (plus the "
        "drafting cost): the break-even acceptance. Larger k helps only while drafts keep being accepted; "
        "past that it adds verification work for tokens that are thrown away. Greedy output must not "
        "change at all, since the target decides every kept token: "
        f"{'it did not' if summary['all_outputs_equal_baseline'] else 'it DID change (a bug to investigate)'}."
    )
    return StageResult(summary, COLUMNS, rows, plot, explanation)


STAGE = Stage(
    number=6,
    name="speculative",
    title="Speculative decoding: speedup against k and acceptance",
    question="When do draft tokens make decoding faster, and how does that depend on k and the acceptance rate?",
    settings_class=SpeculativeSettings,
    quick_overrides=QUICK,
    run=run,
)

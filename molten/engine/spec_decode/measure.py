"""Measure speculative decoding against no speculation, side by side in one process.

    python -m molten.engine.spec_decode.measure [--model M] [--new-tokens N] [--repeats R]

It runs one input-grounded request through a fresh engine per setting, alternating the
settings `repeats` times. The request asks to fix the spelling of a given paragraph, so
the answer copies most of the prompt. It reports single-stream decode tokens/s, whether
the greedy tokens equal those without speculation, and the acceptance statistics. For a
draft model it also derives the break-even acceptance rate from the measured step times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from molten.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams

GROUNDED_TEXT = (
    "The lighthouse keeper climbed the stairs every evening at sunset. He lit the great lamp, "
    "wound the clockwork that turned the lens, and wrote the wether in a leather logbook. "
    "Ships pased the rocks safely for fourty years while he kept the light burning. When the "
    "harbour board replaced the lamp with an electric beacon, the keeper moved to the village "
    "and opened a small shop that sold maps, rope and tea to the fishermen."
)
GROUNDED_INSTRUCTION = "Rewrite the following text exactly, only fixing the spelling mistakes:\n\n"


@dataclass
class Run:
    label: str
    output_token_ids: list[int]
    decode_tokens_per_s: float
    step_ms: list[float] = field(default_factory=list)
    propose_ms: list[float] = field(default_factory=list)
    num_drafts: list[int] = field(default_factory=list)
    spec: dict | None = None


def grounded_prompt(tokenizer) -> list[int]:
    from molten.tokenization.chat import render_chat

    return render_chat(tokenizer, [{"role": "user", "content": GROUNDED_INSTRUCTION + GROUNDED_TEXT}])


def engine_config(speculative: SpeculativeConfig) -> EngineConfig:
    return EngineConfig(
        max_model_len=1024,
        cache=CacheConfig(num_kv_blocks=256),
        scheduler=SchedulerConfig(max_num_batched_tokens=512),
        speculative=speculative,
    )


def run_once(loaded, prompt: list[int], speculative: SpeculativeConfig, new_tokens: int, label: str) -> Run:
    """Generate one greedy stream and time its decode phase (first token to last)."""
    engine = LLMEngine(engine_config(speculative), loaded)
    engine.add_request("measure", prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    tokens: list[int] = []
    token_times: list[float] = []
    run = Run(label, tokens, 0.0)
    for _ in range(10 * new_tokens):
        if not engine.has_unfinished():
            break
        started = time.perf_counter()
        events = engine.step()
        now = time.perf_counter()
        if tokens:  # decode steps only: the prefill step is not part of decode speed
            run.step_ms.append((now - started) * 1000)
            if engine.last_spec_step is not None:
                run.propose_ms.append(engine.last_spec_step.propose_ms)
                run.num_drafts.append(engine.last_step.num_draft_tokens)
        for event in events:
            tokens.append(event.token_id)
            token_times.append(now)
            if event.finish_reason is not None and event.spec_stats is not None:
                run.spec = event.spec_stats.to_dict()
    if len(tokens) > 1:
        run.decode_tokens_per_s = (len(tokens) - 1) / (token_times[-1] - token_times[0])
    return run


def expected_tokens_per_step(acceptance_rate: float, num_drafts: int) -> float:
    """Expected tokens per verification when each draft is accepted independently with this rate.

    (1 - a^(k+1)) / (1 - a), from Leviathan, Kalman and Matias (2023), equation 1.
    """
    if acceptance_rate >= 1.0:
        return num_drafts + 1.0
    return (1 - acceptance_rate ** (num_drafts + 1)) / (1 - acceptance_rate)


def break_even_acceptance(step_ratio: float, num_drafts: int) -> float | None:
    """Acceptance rate at which speculation matches plain decoding.

    `step_ratio` is (k draft forwards + one verify forward) over one plain decode step.
    Returns None when even full acceptance cannot pay for the drafts.
    """
    if expected_tokens_per_step(1.0, num_drafts) < step_ratio:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        if expected_tokens_per_step(middle, num_drafts) < step_ratio:
            low = middle
        else:
            high = middle
    return high


def measure_sharing(loaded, prompt: list[int], width: int, new_tokens: int) -> dict[str, int]:
    """Peak KV bytes that block sharing saved for one `n = width` request and one beam search of `width` beams."""
    peaks = {}
    for label, params in (
        (f"n={width}", SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=0, n=width, ignore_eos=True)),
        (f"beam_width={width}", SamplingParams(max_tokens=new_tokens, temperature=0.0, beam_width=width, ignore_eos=True)),
    ):
        engine = LLMEngine(engine_config(SpeculativeConfig()), loaded)
        engine.add_request("sharing", prompt, params)
        peak = 0
        for _ in range(10 * new_tokens):
            if not engine.has_unfinished():
                break
            engine.step()
            peak = max(peak, engine.kv_state()["saved_kv_bytes"])
        peaks[label] = peak
    return peaks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="target model id")
    parser.add_argument("--new-tokens", type=int, default=128, help="max new tokens per request")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per setting")
    parser.add_argument("--k", type=int, default=4, help="draft tokens per step")
    parser.add_argument("--draft-layers", type=int, default=6, help="self-draft depth in decoder layers")
    parser.add_argument("--draft-model", default=None, help="also measure this draft model, e.g. smollm2-135m-instruct:int4")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--sharing-width", type=int, default=0, help="only measure KV sharing of n > 1 and beam search with this width"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from molten.models import load_model

    loaded = load_model(args.model)
    prompt = grounded_prompt(loaded.tokenizer)
    if args.sharing_width:
        bytes_per_token = LLMEngine(engine_config(SpeculativeConfig()), loaded).kv_cache.spec.bytes_per_token
        for label, saved in measure_sharing(loaded, prompt, args.sharing_width, args.new_tokens).items():
            print(f"{label}: peak KV saved by sharing {saved / 2**20:.1f} MiB "
                  f"(an independent copy of the {len(prompt)}-token prompt is {len(prompt) * bytes_per_token / 2**20:.1f} MiB)")
        return
    settings = {
        "off": SpeculativeConfig(),
        "ngram": SpeculativeConfig(method="ngram", num_speculative_tokens=args.k, ngram_min=1, ngram_max=4),
        "self-draft": SpeculativeConfig(method="draft", num_speculative_tokens=args.k, draft_num_layers=args.draft_layers),
    }
    if args.draft_model:
        settings["draft-model"] = SpeculativeConfig(method="draft", num_speculative_tokens=args.k, draft_model=args.draft_model)
    runs: dict[str, list[Run]] = {label: [] for label in settings}
    for _ in range(args.repeats):
        for label, speculative in settings.items():
            runs[label].append(run_once(loaded, prompt, speculative, args.new_tokens, label))

    print(f"model {args.model}, prompt {len(prompt)} tokens, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    reference = runs["off"][0].output_token_ids
    off_speed = statistics.median(r.decode_tokens_per_s for r in runs["off"])
    off_step_ms = statistics.median(ms for r in runs["off"] for ms in r.step_ms)
    for label, label_runs in runs.items():
        speed = statistics.median(r.decode_tokens_per_s for r in label_runs)
        identical = all(r.output_token_ids == reference for r in label_runs)
        print(f"{label:>10}: {speed:6.1f} decode tokens/s ({speed / off_speed:.2f}x off), "
              f"{len(label_runs[0].output_token_ids)} tokens, identical to off: {identical}")
        if label_runs[0].spec:
            print(f"{'':>12}acceptance {label_runs[0].spec}")
    for label in ("self-draft", "draft-model"):
        if label in runs:
            print(break_even_line(label, runs[label], off_step_ms, args.k))


def break_even_line(label: str, draft_runs: list[Run], off_step_ms: float, num_drafts: int) -> str:
    """Describe the measured draft and verify costs and the acceptance rate they need to pay off."""
    proposals = [(p, n) for r in draft_runs for p, n in zip(r.propose_ms, r.num_drafts) if n]
    if not proposals:
        return f"{label}: no drafts were verified"
    draft_ms_per_token = statistics.median(p / n for p, n in proposals)
    verify_ms = statistics.median(
        s - p for r in draft_runs for s, p, n in zip(r.step_ms, r.propose_ms, r.num_drafts) if n
    )
    ratio = (num_drafts * draft_ms_per_token + verify_ms) / off_step_ms
    even = break_even_acceptance(ratio, num_drafts)
    verdict = f"{even:.2f}" if even is not None else "none (k + 1 tokens per step cannot pay for the drafts)"
    return (
        f"{label}: plain step {off_step_ms:.1f} ms, draft {draft_ms_per_token:.1f} ms per token, "
        f"verify step {verify_ms:.1f} ms, cost ratio {ratio:.2f}, break-even acceptance {verdict}"
    )

if __name__ == "__main__":
    main()

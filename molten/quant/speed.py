"""Single-stream decode speed of several precisions, measured in alternating rounds.

On a shared machine the load changes from minute to minute, so precisions measured one
after the other (as `compare_precisions` does) can differ by the load alone. Here every
precision's engine is built first, then the rounds alternate between them, and each
precision's median round is reported beside fp32's from the same rounds.

Run: `python -m molten.quant.speed --threads 1 --rounds 5`
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from molten.config import CacheConfig, EngineConfig, SchedulerConfig
from molten.data import load_corpus_text
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams
from molten.models import load_model


def measure_interleaved(
    model: str, precisions: list[str], *, rounds: int, prompt_tokens: int, new_tokens: int
) -> dict[str, list[float]]:
    """Return each precision's single-stream decode tokens/s, one figure per round."""
    engines = {}
    prompt: list[int] = []
    for precision in precisions:
        loaded = load_model(f"{model}:{precision}")
        prompt = loaded.tokenizer(load_corpus_text())["input_ids"][:prompt_tokens]
        config = EngineConfig(
            model=loaded.model_id,
            dtype=str(loaded.dtype).removeprefix("torch."),
            max_model_len=prompt_tokens + new_tokens + 1,
            cache=CacheConfig(kv_cache_memory_mib=32, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=prompt_tokens + new_tokens + 1),
        )
        engines[precision] = LLMEngine(config, loaded)

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    speeds: dict[str, list[float]] = {precision: [] for precision in precisions}
    for round_index in range(rounds + 1):
        for precision, engine in engines.items():
            engine.add_request(f"round-{round_index}", prompt, params)
            first_token_time = None
            for _ in range(new_tokens + 2):
                if not engine.has_unfinished():
                    break
                events = engine.step()
                if events and first_token_time is None:
                    first_token_time = time.perf_counter()
            elapsed = time.perf_counter() - first_token_time
            if round_index > 0:  # round 0 warms up each engine
                speeds[precision].append((new_tokens - 1) / elapsed)
    return speeds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m molten.quant.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model id without a precision suffix")
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4", help="comma-separated precisions")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per precision")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per round")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    precisions = args.precisions.split(",")
    load_before = os.getloadavg()
    speeds = measure_interleaved(
        args.model, precisions, rounds=args.rounds, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens
    )
    reference = statistics.median(speeds[precisions[0]])
    print(f"threads {args.threads}, load average before {load_before}, after {os.getloadavg()}")
    print(f"| precision | median decode tok/s | vs {precisions[0]} | rounds |")
    print("| --- | --- | --- | --- |")
    for precision in precisions:
        median = statistics.median(speeds[precision])
        rounds_text = ", ".join(f"{speed:.1f}" for speed in speeds[precision])
        print(f"| {precision} | {median:.1f} | {median / reference:.2f}x | {rounds_text} |")


if __name__ == "__main__":
    main()

"""Sampling: greedy, the top-k / top-p / min-p filters, repetition penalty, seeds, extreme logits."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import random_prompts, run_to_completion

from molten.engine.sampler import apply_repetition_penalty, filter_logits, sample
from molten.engine.sampling_params import SamplingParams
from molten.engine.sequence import Sequence, make_generator

VOCAB = 50


def make_seq(params: SamplingParams, token_ids: list[int] | None = None) -> Sequence:
    token_ids = token_ids if token_ids is not None else [0]
    return Sequence(
        request_id="req",
        token_ids=list(token_ids),
        num_prompt_tokens=len(token_ids),
        sampling_params=params,
        generator=make_generator(params.seed),
    )


def sample_ids(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    return [token.token_id for token in sample(logits.clone(), seqs)]


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(16)
    seqs = [make_seq(SamplingParams(temperature=0.0)) for _ in range(16)]

    assert sample_ids(logits, seqs) == logits.argmax(dim=-1).tolist()


def test_top_k_one_equals_greedy():
    logits = random_logits(16, seed=1)
    seqs = [make_seq(SamplingParams(temperature=1.5, top_k=1, seed=row)) for row in range(16)]

    assert sample_ids(logits, seqs) == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_top_token():
    logits = random_logits(16, seed=2)
    seqs = [make_seq(SamplingParams(temperature=1.0, top_p=1e-6, seed=row)) for row in range(16)]

    assert sample_ids(logits, seqs) == logits.argmax(dim=-1).tolist()


def test_top_p_keeps_smallest_nucleus():
    # Probabilities 0.5, 0.3, 0.15, 0.05: with top_p 0.8 the first two reach the mass.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    no_limit = torch.tensor([0])

    filtered = filter_logits(logits, top_k=no_limit, top_p=torch.tensor([0.8]), min_p=torch.tensor([0.0]))

    assert torch.isfinite(filtered[0]).tolist() == [True, True, False, False]


def test_min_p_drops_unlikely_tokens():
    # With min_p 0.2 the threshold is 0.2 x 0.5 = 0.1, so only the 0.05 token goes.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    no_limit = torch.tensor([0])

    filtered = filter_logits(logits, top_k=no_limit, top_p=torch.tensor([1.0]), min_p=torch.tensor([0.2]))

    assert torch.isfinite(filtered[0]).tolist() == [True, True, True, False]


def test_min_p_sampling_never_draws_dropped_token():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    seq = make_seq(SamplingParams(temperature=1.0, min_p=0.2, seed=0))

    draws = {sample_ids(logits, [seq])[0] for _ in range(400)}

    assert 3 not in draws
    assert draws == {0, 1, 2}


def test_top_k_keeps_k_tokens():
    logits = random_logits(1, seed=3)
    filtered = filter_logits(logits, top_k=torch.tensor([5]), top_p=torch.tensor([1.0]), min_p=torch.tensor([0.0]))

    kept = torch.isfinite(filtered[0]).nonzero().flatten().tolist()

    assert sorted(kept) == sorted(logits[0].topk(5).indices.tolist())


def test_repetition_penalty_direction():
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 0.5]])
    seq = make_seq(SamplingParams(repetition_penalty=2.0), token_ids=[0, 1, 1])

    apply_repetition_penalty(logits, [seq])

    assert logits[0, 0].item() == pytest.approx(1.0)  # seen, positive: divided
    assert logits[0, 1].item() == pytest.approx(-2.0)  # seen, negative: multiplied
    assert logits[0, 2].item() == pytest.approx(3.0)  # unseen: unchanged
    assert logits[0, 3].item() == pytest.approx(-2.0)
    assert logits[0, 4].item() == pytest.approx(0.5)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    plain = make_seq(SamplingParams(temperature=0.0), token_ids=[0])
    penalised = make_seq(SamplingParams(temperature=0.0, repetition_penalty=2.0), token_ids=[0])

    assert sample_ids(logits, [plain]) == [0]
    assert sample_ids(logits, [penalised]) == [1]


def test_seeded_rows_ignore_batch_mates():
    logits = random_logits(4, seed=4)
    seeded = SamplingParams(temperature=0.8, seed=42)

    draws_alone = []
    generator_seq = make_seq(seeded)
    for _ in range(20):
        draws_alone += sample_ids(logits[:1], [generator_seq])
    draws_batched = []
    batched_seq = make_seq(seeded)
    for _ in range(20):
        mates = [make_seq(SamplingParams(temperature=1.0)) for _ in range(3)]
        draws_batched += sample_ids(logits, [batched_seq, *mates])[:1]

    assert draws_alone == draws_batched
    assert len(set(draws_alone)) > 1


def test_logprobs_are_of_raw_distribution():
    logits = random_logits(1, seed=5)
    seq = make_seq(SamplingParams(temperature=0.0, repetition_penalty=3.0, logprobs=True, top_logprobs=3), token_ids=[1, 2])

    token = sample(logits.clone(), [seq])[0]

    raw = torch.log_softmax(logits[0], dim=-1)
    assert token.logprob == pytest.approx(raw[token.token_id].item())
    assert [token_id for token_id, _ in token.top_logprobs] == raw.topk(3).indices.tolist()


EXTREME_LOGITS = {
    "huge-finite": [3e38, 1e38, -3e38, 0.0],
    "minus-inf": [float("-inf"), 5.0, float("-inf"), 4.0],
    "float16-max": [65504.0, 65504.0, -65504.0, 0.0],
    "large-gap": [1e4, -1e4, 0.0, 1.0],
    "model-scale": [10.0, 5.0, -3.0, 0.0],
    "plus-inf": [float("inf"), 5.0, 0.0, 4.0],
}
EXTREME_PARAMS = {
    "default": {"temperature": 1.0},
    "tiny-temperature": {"temperature": 1e-4},
    "subnormal-temperature": {"temperature": 1e-40},
    "float32-zero-temperature": {"temperature": 1e-50},
    "filters": {"temperature": 0.7, "top_k": 2, "top_p": 0.5, "min_p": 0.1},
    "penalty": {"temperature": 2.0, "repetition_penalty": 1.5},
}


@pytest.mark.parametrize("params_name", EXTREME_PARAMS)
@pytest.mark.parametrize("logits_name", EXTREME_LOGITS)
def test_extreme_logits_sample_valid_token(logits_name, params_name):
    logits = torch.tensor([EXTREME_LOGITS[logits_name]])
    seq = make_seq(SamplingParams(seed=0, **EXTREME_PARAMS[params_name]), token_ids=[3])

    token_ids = sample_ids(logits, [seq])

    assert 0 <= token_ids[0] < logits.shape[1]
    assert logits[0, token_ids[0]].item() != float("-inf")


@pytest.mark.parametrize("logits_name", EXTREME_LOGITS)
def test_extreme_logits_give_finite_greedy_logprob(logits_name):
    logits = torch.tensor([EXTREME_LOGITS[logits_name]])
    seq = make_seq(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2))

    token = sample(logits.clone(), [seq])[0]

    assert token.token_id == logits.argmax().item()
    assert not math.isnan(token.logprob)


def test_seeded_request_independent_of_batch_mates(tiny_llama, make_engine):
    """A seeded request samples the same tokens alone and beside different unseeded requests."""
    prompt = random_prompts(seed=20, count=1, min_len=30, max_len=30)[0]
    seeded = SamplingParams(max_tokens=16, temperature=0.8, seed=42, ignore_eos=True)
    engine = make_engine(tiny_llama)

    alone = run_to_completion(engine, [prompt], seeded, prefix="alone").outputs()[0]
    batched = []
    for run_index in range(4):
        mates = random_prompts(seed=100 + run_index, count=run_index + 1, max_len=40)
        mate_params = SamplingParams(max_tokens=4 + 2 * run_index, temperature=1.0, ignore_eos=True)
        run = run_to_completion(engine, [prompt, *mates], [seeded] + [mate_params] * len(mates), prefix=f"batch-{run_index}")
        batched.append(run.outputs()[0])
    other_seed = SamplingParams(max_tokens=16, temperature=0.8, seed=43, ignore_eos=True)
    different = run_to_completion(engine, [prompt], other_seed, prefix="other-seed").outputs()[0]

    assert len(alone) == 16
    for run_index, output in enumerate(batched):
        assert output == alone, f"run {run_index} with {run_index + 1} batch mates differs"
    assert different != alone

"""Request lists of the benchmark workloads: sizes, seeds and arrival times."""

from __future__ import annotations

from molten.bench.workloads import (
    FIRST_PROMPT_TOKEN_ID,
    WorkloadSizes,
    concurrent_requests,
    context_lengths,
    interference_requests,
    shared_prefix_requests,
    single_requests,
)

VOCAB_SIZE = 49_152


def test_concurrent_prompts_within_range_and_seeded():
    sizes = WorkloadSizes.full()
    requests = concurrent_requests(sizes, VOCAB_SIZE, seed=3, poisson=False)
    low, high = sizes.concurrent_prompt_lens

    assert len(requests) == sizes.concurrent_requests
    assert all(low <= len(r.prompt_token_ids) <= high for r in requests)
    assert all(r.max_tokens == sizes.concurrent_new_tokens for r in requests)
    assert all(r.arrival_s == 0.0 for r in requests)
    assert all(FIRST_PROMPT_TOKEN_ID <= t < VOCAB_SIZE for r in requests for t in r.prompt_token_ids)
    assert requests == concurrent_requests(sizes, VOCAB_SIZE, seed=3, poisson=False)
    assert requests != concurrent_requests(sizes, VOCAB_SIZE, seed=4, poisson=False)


def test_poisson_variant_has_same_prompts_and_rising_arrivals():
    sizes = WorkloadSizes.full()
    together = concurrent_requests(sizes, VOCAB_SIZE, seed=0, poisson=False)
    poisson = concurrent_requests(sizes, VOCAB_SIZE, seed=0, poisson=True)
    arrivals = [r.arrival_s for r in poisson]

    assert [r.prompt_token_ids for r in poisson] == [r.prompt_token_ids for r in together]
    assert arrivals[0] == 0.0
    assert arrivals == sorted(arrivals)
    assert arrivals[-1] > 0.0


def test_shared_prefix_requests_share_system_prompt_only():
    sizes = WorkloadSizes.quick()
    requests = shared_prefix_requests(sizes, VOCAB_SIZE, seed=0)
    prefix = requests[0].prompt_token_ids[: sizes.shared_prefix_len]

    assert len(requests) == sizes.shared_prefix_requests
    for request in requests:
        assert len(request.prompt_token_ids) == sizes.shared_prefix_len + sizes.shared_suffix_len
        assert request.prompt_token_ids[: sizes.shared_prefix_len] == prefix
    suffixes = {tuple(r.prompt_token_ids[sizes.shared_prefix_len :]) for r in requests}
    assert len(suffixes) == len(requests)


def test_context_lengths_double_up_to_window():
    sizes = WorkloadSizes.full()
    assert context_lengths(sizes, 8192) == [256, 512, 1024, 2048, 4096, 8192 - sizes.long_context_new_tokens - 1]
    assert context_lengths(WorkloadSizes.quick(), 8192) == [256, 512, 1024]
    assert context_lengths(sizes, 300) == [256, 300 - sizes.long_context_new_tokens - 1]


def test_interference_requests_tagged_and_timed():
    sizes = WorkloadSizes.quick()
    requests = interference_requests(sizes, VOCAB_SIZE, seed=0, max_model_len=8192)
    decode = [r for r in requests if r.tag == "decode"]
    long = [r for r in requests if r.tag == "long"]

    assert len(decode) == sizes.interference_streams
    assert all(r.arrival_s == 0.0 for r in decode)
    assert len(long) == sizes.interference_long_prompts
    assert [r.arrival_s for r in long] == [
        sizes.interference_first_arrival_s + i * sizes.interference_arrival_gap_s for i in range(len(long))
    ]
    assert all(len(r.prompt_token_ids) == sizes.interference_long_len for r in long)


def test_interference_long_prompts_fit_small_window():
    sizes = WorkloadSizes.full()
    requests = interference_requests(sizes, VOCAB_SIZE, seed=0, max_model_len=1024)
    assert max(len(r.prompt_token_ids) for r in requests) == 1022


def test_salt_changes_tokens_not_lengths_or_arrivals():
    sizes = WorkloadSizes.full()
    plain = concurrent_requests(sizes, VOCAB_SIZE, seed=0, poisson=True)
    salted = concurrent_requests(sizes, VOCAB_SIZE, seed=0, poisson=True, salt="http")

    assert [len(r.prompt_token_ids) for r in salted] == [len(r.prompt_token_ids) for r in plain]
    assert [r.arrival_s for r in salted] == [r.arrival_s for r in plain]
    assert all(s.prompt_token_ids != p.prompt_token_ids for s, p in zip(salted, plain))
    assert salted == concurrent_requests(sizes, VOCAB_SIZE, seed=0, poisson=True, salt="http")
    assert salted != concurrent_requests(sizes, VOCAB_SIZE, seed=0, poisson=True, salt="handle")


def test_single_requests_salted_per_system():
    sizes = WorkloadSizes.quick()
    handle = single_requests(sizes, VOCAB_SIZE, seed=1, salt="handle")
    http = single_requests(sizes, VOCAB_SIZE, seed=1, salt="http")
    assert len(handle[0].prompt_token_ids) == len(http[0].prompt_token_ids) == sizes.single_prompt_len
    assert handle[0].prompt_token_ids != http[0].prompt_token_ids

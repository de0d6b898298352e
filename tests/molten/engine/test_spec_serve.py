"""Speculative decoding and n > 1 sampling over HTTP, on one co-located application.

The application runs the bundled model with n-gram speculation in the session's Serve
instance. A greedy stream must give the tokens of the in-process engine without
speculation, and its last chunk must carry acceptance statistics that agree with the
tokens' origins. A seeded request with n = 2 must run as one engine request whose
sequences share the prompt's KV blocks, and keep seed + i per choice.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import httpx
import pytest
from engine_helpers import make_engine_config, run_to_completion

from molten.config import SpeculativeConfig
from molten.engine.llm_engine import LLMEngine
from molten.engine.sampling_params import SamplingParams
from molten.engine.spec_decode.measure import grounded_prompt

pytestmark = pytest.mark.slow

BUNDLED_MODEL = "smollm2-135m-instruct"
APP_NAME = "molten-spec"
NEW_TOKENS = 24
SHARED_NEW_TOKENS = 32
NUM_SPECULATIVE_TOKENS = 4
HEALTH_TIMEOUT_S = 300.0


def use_transformers_attention(model) -> None:
    """Undo the engine's attention switch, so other tests can run the shared model in transformers."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "sdpa"


def wait_healthy(base_url: str) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    last_error = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/health", timeout=10)
            if response.status_code == 200:
                return
            last_error = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last_error = repr(exc)
        time.sleep(1)
    raise TimeoutError(f"{base_url} not healthy after {HEALTH_TIMEOUT_S}s: {last_error}")


@pytest.fixture(scope="module")
def spec_url(serve_session):
    from molten.deployments.app import manager_handle, model_app_names, run_app
    from ray import serve

    settings = replace(
        serve_session,
        model=BUNDLED_MODEL,
        max_model_len=2048,
        mode="colocated",
        app_name=APP_NAME,
        route_prefix="/spec",
        speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=NUM_SPECULATIVE_TOKENS),
    )
    run_app(settings)
    url = f"http://127.0.0.1:{settings.http_port}/spec"
    wait_healthy(url)
    yield url
    manager_handle(settings).unload_all.remote().result()
    for name in model_app_names(APP_NAME) + [APP_NAME]:
        serve.delete(name)


def streamed_tokens(base_url: str, prompt: list[int]) -> list[dict]:
    body = {"model": BUNDLED_MODEL, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True}
    timings = []
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read().decode(errors="replace")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("choices") and "molten" in chunk:
                timings.append(chunk["molten"])
    return timings


def test_http_greedy_tokens_equal_spec_off(spec_url, bundled_model):
    prompt = grounded_prompt(bundled_model.tokenizer)
    engine = LLMEngine(make_engine_config(max_model_len=2048), bundled_model)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    try:
        expected = run_to_completion(engine, [prompt], params).outputs()[0]
    finally:
        use_transformers_attention(bundled_model.model)

    timings = streamed_tokens(spec_url, prompt)

    assert [timing["token_id"] for timing in timings] == expected
    origins = [timing["origin"] for timing in timings]
    assert "draft-accepted" in origins

    assert all("spec_stats" not in timing for timing in timings[:-1])
    stats = timings[-1]["spec_stats"]
    assert stats["num_speculative_tokens"] == NUM_SPECULATIVE_TOKENS
    assert len(stats["accepted_length_histogram"]) == NUM_SPECULATIVE_TOKENS + 1
    assert sum(stats["accepted_length_histogram"]) == stats["num_verifications"]
    assert stats["num_accepted_tokens"] == sum(
        accepted * count for accepted, count in enumerate(stats["accepted_length_histogram"])
    )
    assert stats["acceptance_rate"] == round(stats["num_accepted_tokens"] / stats["num_draft_tokens"], 4)
    # Emitted tokens past max_tokens are dropped, so the stream holds at most what verifications emitted.
    assert origins.count("draft-accepted") <= stats["num_accepted_tokens"]
    assert origins.count("recovered") + origins.count("bonus") <= stats["num_verifications"]
    assert origins.count("draft-accepted") + origins.count("recovered") + origins.count("bonus") >= (
        stats["num_emitted_tokens"] - NUM_SPECULATIVE_TOKENS
    )


def stream_choices(base_url: str, body: dict, on_first_chunk) -> dict[int, list[int]]:
    """Stream a completion with n > 1 and return each choice's token ids; call `on_first_chunk` once."""
    token_ids: dict[int, list[int]] = {}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body | {"stream": True}, timeout=300) as response:
        assert response.status_code == 200, response.read().decode(errors="replace")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if not chunk.get("choices"):
                continue
            if not token_ids:
                on_first_chunk()
            assert chunk["choices"][0]["index"] == chunk["molten"]["choice"]
            token_ids.setdefault(chunk["choices"][0]["index"], []).append(chunk["molten"]["token_id"])
    return token_ids


def test_http_n2_shares_prompt_blocks_and_keeps_seeds(spec_url, bundled_model):
    prompt = grounded_prompt(bundled_model.tokenizer)
    body = {
        "model": BUNDLED_MODEL, "prompt": prompt, "max_tokens": SHARED_NEW_TOKENS, "temperature": 0.8,
        "seed": 11, "n": 2, "ignore_eos": True,
    }
    kv_during: list[dict] = []

    def read_kv() -> None:
        response = httpx.get(f"{spec_url}/v1/molten/kv", timeout=60)
        assert response.status_code == 200, response.text
        kv_during.append(response.json()["workers"][0])

    streamed = stream_choices(spec_url, body, read_kv)
    assert sorted(streamed) == [0, 1]
    assert all(len(token_ids) == SHARED_NEW_TOKENS for token_ids in streamed.values())

    # Both sequences were live while the first chunk streamed, holding the prompt's full blocks once.
    kv = kv_during[0]
    full_prompt_blocks = (len(prompt) - 1) // kv["kv_block_size"]
    assert kv["num_shared_blocks"] >= full_prompt_blocks > 0
    assert kv["saved_kv_bytes"] > 0

    response = httpx.post(f"{spec_url}/v1/completions", json=body, timeout=300)
    assert response.status_code == 200, response.text
    replay = response.json()
    assert [choice["index"] for choice in replay["choices"]] == [0, 1]
    replayed = {index: [t["token_id"] for t in replay["molten"]["tokens"] if t["choice"] == index] for index in (0, 1)}
    assert replayed == streamed, "the same seeded request must give the same tokens"

    second_alone = httpx.post(f"{spec_url}/v1/completions", json=body | {"n": 1, "seed": 12}, timeout=300).json()
    assert [t["token_id"] for t in second_alone["molten"]["tokens"]] == streamed[1], "choice i uses seed + i"

"""The same greedy request over HTTP with speculative decoding on gives the tokens it gives off.

One co-located application with n-gram speculation is deployed into the session's Serve
instance. Its streamed tokens are compared with the in-process engine without
speculation, on the same bundled model and prompt.
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
    from ray import serve

    from molten.deployments.app import manager_handle, model_app_names, run_app

    settings = replace(
        serve_session,
        model=BUNDLED_MODEL,
        max_model_len=2048,
        mode="colocated",
        app_name=APP_NAME,
        route_prefix="/spec",
        speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=4),
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
    origins = {timing["origin"] for timing in timings}
    assert "draft-accepted" in origins

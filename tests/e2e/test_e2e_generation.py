"""End-to-end generation through HTTP -> ingress -> prefill worker -> KV handoff -> decode worker."""

from __future__ import annotations

import openai
import pytest
import torch

from tests.e2e.conftest import BUNDLED_MODEL
from tests.e2e.sse import stream_sse, streamed_text

pytestmark = pytest.mark.slow

PROMPTS = [
    "Hi",
    "What is the capital of France? Answer in one sentence.",
    "Write a short story about a robot who learns to paint. " * 6,
]
NEW_TOKENS = 32


def reference_tokens(bundled_hf, prompt_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = bundled_hf.model.generate(
            ids,
            # SmolLM2's pad id equals its EOS id: without an explicit mask, generate()
            # would mask every <|im_end|> in the prompt.
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
        )
    return out[0, len(prompt_ids) :].tolist()


def chat_prompt_ids(bundled_hf, text: str) -> list[int]:
    from molten.tokenization.chat import render_chat

    return render_chat(bundled_hf.tokenizer, [{"role": "user", "content": text}])


def molten_tokens(client, prompt_ids: list[int]) -> tuple[list[int], dict]:
    body = {
        "model": BUNDLED_MODEL,
        "prompt": prompt_ids,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    events, _ = stream_sse(client, "/v1/completions", body)
    tokens = [e["molten"]["token_id"] for e in events if e.get("choices")]
    return tokens, events


@pytest.fixture(scope="module")
def references(bundled_hf):
    prompts = [chat_prompt_ids(bundled_hf, text) for text in PROMPTS]
    return [(p, reference_tokens(bundled_hf, p)) for p in prompts]


def test_greedy_matches_transformers_disaggregated(client, references):
    for prompt_ids, expected in references:
        tokens, events = molten_tokens(client, prompt_ids)
        assert tokens == expected
        handoffs = [e["molten"]["handoff"] for e in events if e.get("molten", {}).get("handoff")]
        assert len(handoffs) == 1
        assert handoffs[0]["bytes"] > 0
        assert handoffs[0]["total_ms"] >= 0


def test_greedy_matches_transformers_colocated(colocated_url, references):
    import httpx

    with httpx.Client(base_url=colocated_url, timeout=120) as colocated:
        for prompt_ids, expected in references:
            tokens, events = molten_tokens(colocated, prompt_ids)
            assert tokens == expected
            assert not any(e.get("molten", {}).get("handoff") for e in events)


def test_non_streaming_reports_handoff_and_timings(client):
    body = {"model": BUNDLED_MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    summary = response.json()["molten"]
    assert summary["ttft_ms"] > 0
    assert summary["handoff"]["bytes"] > 0
    assert summary["handoff"]["blocks"] >= 1
    assert len(summary["tokens"]) == response.json()["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    "content, stop",
    [
        ("Tell me about the sea in two sentences.", None),
        ("List the days of the week, separated by commas.", ["Wednesday"]),
        ("Reply with three emoji and a sentence in Chinese.", None),
    ],
)
def test_stream_equals_non_stream(client, content, stop):
    body = {
        "model": BUNDLED_MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 40,
        "temperature": 0,
    }
    if stop:
        body["stop"] = stop
    events, _ = stream_sse(client, "/v1/chat/completions", body | {"stream": True})
    whole = client.post("/v1/chat/completions", json=body).json()
    text = whole["choices"][0]["message"]["content"]
    assert streamed_text(events) == text
    if stop:
        assert stop[0] not in text


def test_openai_client_chat_and_stream(disagg_url):
    api = openai.OpenAI(base_url=f"{disagg_url}/v1", api_key="unused")
    models = api.models.list()
    assert [m.id for m in models.data] == [BUNDLED_MODEL]

    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    completion = api.chat.completions.create(model=BUNDLED_MODEL, messages=messages, max_tokens=12, temperature=0)
    text = completion.choices[0].message.content
    assert text
    assert completion.usage.completion_tokens >= 1

    chunks = list(
        api.chat.completions.create(
            model=BUNDLED_MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens


def test_openai_client_completions_logprobs_and_n(disagg_url):
    api = openai.OpenAI(base_url=f"{disagg_url}/v1", api_key="unused")
    completion = api.completions.create(
        model=BUNDLED_MODEL, prompt="The sky is", max_tokens=6, temperature=0.9, n=3, seed=7, logprobs=2
    )
    assert len(completion.choices) == 3
    for choice in completion.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    again = api.completions.create(model=BUNDLED_MODEL, prompt="The sky is", max_tokens=6, temperature=0.9, n=3, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in completion.choices]


def test_openai_client_bad_request_is_400(disagg_url):
    api = openai.OpenAI(base_url=f"{disagg_url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=BUNDLED_MODEL, messages=[], max_tokens=4)
    assert "messages" in str(info.value)

"""Request cases every server must survive, against the real server and the bundled model.

Each case is followed by a normal request that must still succeed.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.e2e.conftest import BUNDLED_MODEL
from tests.e2e.sse import stream_sse, streamed_text

pytestmark = pytest.mark.slow

M = BUNDLED_MODEL


def assert_still_serving(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"model": M, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


def assert_error(response: httpx.Response, status: int, param: str | None, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error


def test_c01_empty_prompt(client):
    for prompt, param in (("", "prompt"), ([""], "prompt[0]")):
        response = client.post("/v1/completions", json={"model": M, "prompt": prompt, "max_tokens": 20})
        assert_error(response, 400, param, "must not be empty")
    assert_still_serving(client)


def test_c02_null_max_tokens(client):
    response = client.post("/v1/completions", json={"model": M, "prompt": "test", "max_tokens": None})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1
    assert_still_serving(client)


@pytest.mark.parametrize("value", [0, -5, "ten", 1e9])
def test_c03_invalid_max_tokens(client, value):
    response = client.post("/v1/completions", json={"model": M, "prompt": "test", "max_tokens": value})
    assert_error(response, 400, "max_tokens", "max_tokens")
    assert_still_serving(client)


def test_c03_max_tokens_past_window_clamped(client):
    # A huge integer is clamped to the window (its float form 1e9 is rejected above).
    # ignore_eos makes the clamp visible: generation runs until the window is full.
    window = client.get("/health").json()["max_model_len"]
    prompt = [28] * (window - 3)
    body = {"model": M, "prompt": prompt, "max_tokens": 10**9, "temperature": 0, "ignore_eos": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert_still_serving(client)


@pytest.mark.parametrize(
    "patch, param, expected",
    [
        ({"stream": "false"}, "stream", "boolean"),
        ({"messages": "hello"}, "messages", "messages"),
        ({"temperature": "hot"}, "temperature", "number"),
    ],
)
def test_c04_wrong_types(client, patch, param, expected):
    body = {"model": M, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4} | patch
    assert_error(client.post("/v1/chat/completions", json=body), 400, param, expected)
    assert_still_serving(client)


def test_c05_not_json_and_empty_body(client):
    for content in (b"{not json", b""):
        response = client.post(
            "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"]
    assert_still_serving(client)


def test_c05_huge_body_is_413(client):
    body = b'{"model": "x", "prompt": "' + b"a" * (50 * 1024 * 1024) + b'"}'
    response = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    assert_still_serving(client)


@pytest.mark.parametrize(
    "patch, param",
    [
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"top_k": -3}, "top_k"),
        ({"n": 0}, "n"),
    ],
)
def test_c06_out_of_range(client, patch, param):
    body = {"model": M, "prompt": "hello", "max_tokens": 4} | patch
    assert_error(client.post("/v1/completions", json=body), 400, param)
    assert_still_serving(client)


def test_c06_tiny_top_p_keeps_top_token(client):
    body = {"model": M, "prompt": "The capital of France is", "max_tokens": 8, "top_p": 1e-9, "temperature": 1.0}
    sampled = client.post("/v1/completions", json=body)
    greedy = client.post("/v1/completions", json=body | {"temperature": 0, "top_p": 1.0})
    assert sampled.status_code == 200, sampled.text
    assert sampled.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_c07_context_window_edges(client):
    window = client.get("/health").json()["max_model_len"]
    # Token ids bypass the tokenizer, so the prompt length is exact.
    for length, ok in ((window - 1, True), (window, False), (window + 1, False)):
        response = client.post(
            "/v1/completions", json={"model": M, "prompt": [28] * length, "max_tokens": 16, "temperature": 0}
        )
        if ok:
            assert response.status_code == 200, response.text[:300]
            body = response.json()
            assert body["usage"]["completion_tokens"] <= 1
            assert body["choices"][0]["finish_reason"] == "length"
        else:
            assert_error(response, 400, "prompt", f"prompt is {length} tokens", f"context window is {window}")
    assert_still_serving(client)


def test_c08_stop_string_never_streamed(client):
    body = {
        "model": M,
        "prompt": "Here is the English alphabet: ABC",
        "temperature": 0,
        "stop": ["DEFGHIJ"],
        "stream": True,
        "max_tokens": 20,
    }
    events, _ = stream_sse(client, "/v1/completions", body)
    chunks = [c.get("text") or "" for e in events for c in e.get("choices", [])]
    stop = "DEFGHIJ"
    parts = {stop[i:j] for i in range(len(stop)) for j in range(i + 2, len(stop) + 1)}
    for chunk in chunks:
        assert not any(part in chunk for part in parts), chunks
    non_streamed = client.post("/v1/completions", json=body | {"stream": False}).json()
    assert "".join(chunks) == non_streamed["choices"][0]["text"]
    assert_still_serving(client)


def test_c09_emoji_and_cjk_stream_whole_characters(client):
    body = {
        "model": M,
        "messages": [{"role": "user", "content": "Reply with three emoji and then one sentence in Chinese: 你好，世界 🌍🔥😀"}],
        "temperature": 0,
        "max_tokens": 48,
        "stream": True,
    }
    events, raw = stream_sse(client, "/v1/chat/completions", body)
    for payload in raw:
        payload.decode("utf-8")  # raises on a split character
        assert "\ufffd" not in payload.decode("utf-8")
    non_streamed = client.post("/v1/chat/completions", json=body | {"stream": False}).json()
    assert streamed_text(events) == non_streamed["choices"][0]["message"]["content"]
    assert any(ord(ch) > 0x2E80 for ch in streamed_text(events)), streamed_text(events)
    assert_still_serving(client)


def test_c10_disconnect_frees_blocks(client, disagg_url):
    def free_blocks() -> list[int]:
        state = client.get("/v1/molten/kv").json()
        return [worker["num_free_blocks"] for worker in state["workers"]]

    before = free_blocks()
    body = {"model": M, "prompt": "Count from one to a thousand:", "max_tokens": 512, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=disagg_url, timeout=60) as other:
        with other.stream("POST", "/v1/completions", json=body) as response:
            for _ in response.iter_bytes():
                break  # close after the first chunk
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and free_blocks() != before:
        time.sleep(0.2)
    assert free_blocks() == before
    started = time.monotonic()
    assert_still_serving(client)
    assert time.monotonic() - started < 30


def test_c11_bad_messages(client):
    cases = [
        ([], "messages"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
    ]
    for messages, param in cases:
        response = client.post("/v1/chat/completions", json={"model": M, "messages": messages, "max_tokens": 4})
        assert_error(response, 400, param)
    assert_still_serving(client)


def test_c12_unknown_model(client):
    response = client.post("/v1/completions", json={"model": "no-such-model", "prompt": "hi"})
    error = assert_error(response, 404, "model", M)
    assert "no-such-model" in error["message"]
    assert_still_serving(client)


def test_c13_seeded_request_reproducible_under_load(client, disagg_url):
    seeded = {"model": M, "prompt": "Once upon a time", "seed": 42, "temperature": 0.8, "max_tokens": 16}
    others = [
        {"model": M, "prompt": f"Story number {i}: a dragon", "temperature": 1.0, "max_tokens": 24} for i in range(4)
    ]
    texts = []
    with httpx.Client(base_url=disagg_url, timeout=120) as other_client:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            for other in others:
                mate = pool.submit(other_client.post, "/v1/completions", json=other)
                response = client.post("/v1/completions", json=seeded)
                assert response.status_code == 200, response.text
                texts.append(response.json()["choices"][0]["text"])
                assert mate.result().status_code == 200
    assert len(set(texts)) == 1, texts
    assert_still_serving(client)


def test_unknown_route_and_method_use_openai_errors(client):
    missing = client.post("/chat/completions", json={"model": M})
    assert_error(missing, 404, None, "/v1")
    wrong_method = client.get("/v1/chat/completions")
    assert_error(wrong_method, 405, None, "GET")
    assert_still_serving(client)

"""`molten chat`: stream one reply from a running `molten serve` over HTTP/SSE, then print its timings.

The reply text goes to standard output as it streams. The figures (TTFT, token rates,
token counts, KV handoff) go to standard error. They come from the `molten` object that
Molten adds to every stream chunk and to the final usage chunk.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

CONNECT_TIMEOUT_S = 5.0


class ChatError(Exception):
    """A failed request. The message names the cause and the next step."""


@dataclass
class StreamFigures:
    """Figures collected from the `molten` objects of one streamed reply (choice 0)."""

    token_times_ms: list[float] = field(default_factory=list)
    num_prompt_tokens: int | None = None
    num_cached_prompt_tokens: int | None = None
    handoff: dict | None = None
    finish_reason: str | None = None
    summary: dict | None = None
    """The usage chunk's `molten` request summary, when the server sent it."""
    usage: dict | None = None

    def add_token(self, timing: dict) -> None:
        self.token_times_ms.append(float(timing["time_since_arrival_ms"]))
        if "num_prompt_tokens" in timing:
            self.num_prompt_tokens = timing["num_prompt_tokens"]
            self.num_cached_prompt_tokens = timing.get("num_cached_prompt_tokens")
        if timing.get("handoff") is not None:
            self.handoff = timing["handoff"]

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, divided by the time from the first token to the last."""
        times = self.token_times_ms
        if len(times) < 2 or times[-1] <= times[0]:
            return None
        return (len(times) - 1) / ((times[-1] - times[0]) / 1000.0)


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_client(base_url: str, timeout_s: float) -> httpx.Client:
    """Create the HTTP client. Proxy variables are ignored for a loopback server, which no proxy can reach."""
    timeout = httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=timeout_s, write=30.0, pool=CONNECT_TIMEOUT_S)
    return httpx.Client(base_url=base_url, timeout=timeout, trust_env=not is_loopback_url(base_url))


def describe_http_error(exc: httpx.HTTPError, base_url: str, timeout_s: float) -> str:
    """Turn a transport failure into a message that names the URL and the next step."""
    if isinstance(exc, httpx.ConnectError):
        return (
            f"no Molten server is listening at {base_url} ({exc}). Start one with `molten serve`, "
            f"or pass the URL of a running one with --url."
        )
    if isinstance(exc, httpx.ConnectTimeout):
        return f"connecting to {base_url} timed out after {CONNECT_TIMEOUT_S:.0f} s. Check --url."
    if isinstance(exc, httpx.ReadTimeout):
        return f"the server at {base_url} sent nothing for {timeout_s:.0f} s. Raise --timeout, or check the server's logs."
    return f"the request to {base_url} failed: {type(exc).__name__}: {exc}"


def error_message_from_body(body: Any, status: int | None = None) -> str:
    """Format an OpenAI-style error body as `message (type, field)`."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return f"the server answered HTTP {status}: {body!r}"
    details = [str(error.get("type") or "error")]
    if error.get("param"):
        details.append(f"field {error['param']}")
    if status is not None:
        details.append(f"HTTP {status}")
    return f"{error.get('message')} ({', '.join(details)})"


def first_model_id(client: httpx.Client) -> str:
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise ChatError(f"GET /v1/models failed: {error_message_from_body(_json_or_text(response), response.status_code)}")
    models = response.json().get("data") or []
    if not models:
        raise ChatError("the server lists no models: pass one with --model")
    return models[0]["id"]


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def build_body(args: argparse.Namespace, model: str, prompt: str) -> dict[str, Any]:
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    optional = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    return body


def iter_sse_payloads(lines: Iterator[str]) -> Iterator[dict]:
    """Yield the JSON payload of each `data:` event until `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError:
            raise ChatError(f"the server sent a stream event that is not JSON: {data[:200]!r}") from None


def stream_reply(client: httpx.Client, body: dict, write) -> StreamFigures:
    """POST the chat request, write the text deltas of choice 0 as they arrive, and collect the figures."""
    figures = StreamFigures()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise ChatError(error_message_from_body(_json_or_text(response), response.status_code))
        for payload in iter_sse_payloads(response.iter_lines()):
            if "error" in payload:
                raise ChatError(f"the server failed mid-stream: {error_message_from_body(payload)}")
            if payload.get("usage"):
                figures.usage = payload["usage"]
            choices = payload.get("choices") or []
            if not choices:
                figures.summary = payload.get("molten")
                continue
            choice = choices[0]
            if choice.get("index", 0) != 0:
                continue
            write((choice.get("delta") or {}).get("content") or "")
            if payload.get("molten"):
                figures.add_token(payload["molten"])
            if choice.get("finish_reason"):
                figures.finish_reason = choice["finish_reason"]
    return figures


def _format_ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def _format_rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} tokens/s"


def format_handoff(handoff: dict | None) -> str:
    if handoff is None:
        return "none (co-located worker, or the reply ended at its first token)"
    reused = f", {handoff['reused_blocks']} reused" if handoff.get("reused_blocks") else ""
    return (
        f"{handoff['bytes']:,} bytes in {handoff['blocks']} KV blocks{reused}, {handoff['total_ms']:.1f} ms "
        f"(export {handoff['export_ms']:.1f} + transfer {handoff['transfer_ms']:.1f} + import {handoff['import_ms']:.1f})"
    )


def format_figures(figures: StreamFigures) -> list[str]:
    """Render the figures as lines: the server's request summary where present, the per-token records otherwise."""
    summary = figures.summary or {}
    times = figures.token_times_ms
    ttft_ms = summary.get("ttft_ms", times[0] if times else None)
    overall = summary.get("tokens_per_s")
    if overall is None and times and times[-1] > 0:
        overall = len(times) / (times[-1] / 1000.0)
    num_prompt = summary.get("num_prompt_tokens", figures.num_prompt_tokens)
    num_cached = summary.get("num_cached_prompt_tokens", figures.num_cached_prompt_tokens)
    num_output = figures.usage["completion_tokens"] if figures.usage else len(times)
    handoff = summary.get("handoff", figures.handoff)
    return [
        f"TTFT {_format_ms(ttft_ms)} | decode {_format_rate(figures.decode_tokens_per_s)} | "
        f"overall {_format_rate(overall)} (TTFT included) | mean ITL {_format_ms(summary.get('mean_itl_ms'))}",
        f"tokens: prompt {num_prompt if num_prompt is not None else '–'} "
        f"(cached {num_cached if num_cached is not None else '–'}), output {num_output} | "
        f"finish: {figures.finish_reason or '–'}",
        f"KV handoff: {format_handoff(handoff)}",
    ]


def read_prompt(args: argparse.Namespace) -> str:
    prompt = args.prompt
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is None or not prompt.strip():
        raise ChatError('the prompt is empty: pass it as an argument, e.g. `molten chat "Hello"`, or pipe it in')
    return prompt


def chat(args: argparse.Namespace) -> int:
    """Run `molten chat` and return its exit code: 0 on success, 1 when the request failed, 130 after Ctrl+C."""
    base_url = args.url.rstrip("/").removesuffix("/v1")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        prompt = read_prompt(args)
        with make_client(base_url, args.timeout) as client:
            model = args.model or first_model_id(client)
            figures = stream_reply(client, build_body(args, model, prompt), write)
    except ChatError as exc:
        print(f"molten chat: error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"molten chat: error: {describe_http_error(exc, base_url, args.timeout)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nmolten chat: interrupted", file=sys.stderr)
        return 130
    write("\n")
    print("\n".join(["--", *format_figures(figures)]), file=sys.stderr)
    return 0

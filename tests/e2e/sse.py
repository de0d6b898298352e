"""Small client helpers shared by the end-to-end tests."""

from __future__ import annotations

import json

import httpx


def stream_sse(client: httpx.Client, path: str, body: dict) -> tuple[list[dict], list[bytes]]:
    """POST a streaming request; return the parsed data events and the raw event payloads.

    Raw payloads let tests check that every event is valid UTF-8 on its own.
    """
    events: list[dict] = []
    raw_events: list[bytes] = []
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200, response.read().decode(errors="replace")
        buffer = b""
        for chunk in response.iter_bytes():
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                if not block.startswith(b"data: "):
                    continue
                payload = block[len(b"data: ") :]
                raw_events.append(payload)
                if payload == b"[DONE]":
                    continue
                events.append(json.loads(payload.decode("utf-8")))
    return events, raw_events


def streamed_text(events: list[dict], kind: str = "chat", choice: int = 0) -> str:
    parts = []
    for event in events:
        for c in event.get("choices", []):
            if c["index"] != choice:
                continue
            if kind == "chat":
                parts.append(c["delta"].get("content") or "")
            else:
                parts.append(c.get("text") or "")
    return "".join(parts)

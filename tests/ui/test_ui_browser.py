"""The playground in a real browser: Debian's Chromium, driven by Playwright, against a real Serve deployment (slow).

The test serves the playground on 127.0.0.1 against the tiny model's Serve application and
sends a prompt. It checks that the reply streams in several pieces, that the token timeline
and the KV view fill in, and that the live telemetry plot redraws with new samples. It keeps
a full-page screenshot under test-artifacts/ui/ (git-ignored, and MOLTEN_TEST_ARTIFACTS
moves it), also when a check fails, so a failure can be looked at.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from molten.ui.app import build_playground, launch_playground

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACT_DIR = Path(os.environ.get("MOLTEN_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts")) / "ui"
SCREENSHOT_PATH = ARTIFACT_DIR / "playground.png"
SETUP_HINT = "run `./setup.sh --test --browser`, which installs Debian's chromium and the Playwright package"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""Flags that keep the headless browser local: no sandbox (tests may run as root), and no
background traffic (updates, sync, QUIC probes) toward any other host."""

PAGE_LOAD_TIMEOUT_MS = 60_000
MAX_TOKENS = 96
"""Reply length set in the page: enough tokens to see the reply stream in several pieces."""
REPLY_TIMEOUT_S = 120.0
"""Maximum wait for the whole reply. The tiny model's 96 tokens take a few seconds, but the
machine may be shared with other work."""
LIVE_VIEW_TIMEOUT_S = 30.0
"""Maximum wait for the live views to show new data. The timer polls every second."""
POLL_EVERY_S = 0.25

MESSAGE_PLACEHOLDER = "Type a message and press Enter"

RECORD_REPLY_LENGTHS_JS = """
() => {
  window.moltenReplyLengths = [];
  const record = () => {
    const replies = document.querySelectorAll("[data-testid='bot']");
    if (replies.length === 0) return;
    const length = replies[replies.length - 1].textContent.trim().length;
    const lengths = window.moltenReplyLengths;
    if (lengths.length === 0 || lengths[lengths.length - 1] !== length) lengths.push(length);
  };
  new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
}
"""
"""Record the length of the last reply's text after every DOM change, to see it grow piece by piece."""

LINE_PATHS_JS = """
(selector) => Array.from(document.querySelectorAll(selector + " g.mark-line path")).map((path) => path.getAttribute("d"))
"""

SVG_TEXTS_JS = """
(selector) => Array.from(document.querySelectorAll(selector + " svg text")).map((text) => text.textContent)
"""
"""Read every text of a plot's SVG: titles, axis labels and legend entries."""


def find_chromium() -> str:
    """Return the Chromium executable to drive, or fail with the setup command that installs it."""
    configured = os.environ.get("MOLTEN_CHROMIUM")
    candidates = [configured] if configured else [shutil.which("chromium"), "/usr/bin/chromium"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"Chromium not found (looked for {configured or 'chromium on PATH and /usr/bin/chromium'}): {SETUP_HINT}")


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, timeout_s: float, description: str):
    """Call `condition` every POLL_EVERY_S until it returns a truthy value and return that value.

    The test fails once `timeout_s` has passed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {description}")
        time.sleep(POLL_EVERY_S)


def newest_sample_time(page) -> str | None:
    """Read the newest telemetry sample's time from the live status line, or None before the first sample.

    The sample count is no signal of progress: it stops growing once the 120 s window is full.
    """
    match = re.search(r"newest at (\d\d:\d\d:\d\d\.\d{3})", page.locator("#molten-live-status").inner_text())
    return match.group(1) if match else None


@pytest.fixture(scope="module")
def playground_url(serve_app):
    settings, handle = serve_app
    info = {
        "model": settings.model,
        "mode": settings.mode,
        "api_base": f"http://127.0.0.1:{settings.http_port}{settings.route_prefix}/v1",
        "ray_dashboard": f"http://127.0.0.1:{settings.dashboard_port}",
    }
    blocks = build_playground(lambda: handle, info)
    url = launch_playground(blocks, unused_port())
    assert url.startswith("http://127.0.0.1:")
    yield url
    blocks.close()


@pytest.fixture
def page():
    executable = find_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the Playwright package is not installed: {SETUP_HINT}")

    with tempfile.TemporaryDirectory(prefix="molten-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def test_browser_streams_reply_and_telemetry(page, playground_url):
    SCREENSHOT_PATH.unlink(missing_ok=True)
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    try:
        page.goto(playground_url, timeout=PAGE_LOAD_TIMEOUT_MS)
        message_box = page.get_by_placeholder(MESSAGE_PLACEHOLDER)
        message_box.wait_for(timeout=PAGE_LOAD_TIMEOUT_MS)
        page.evaluate(RECORD_REPLY_LENGTHS_JS)

        wait_until(lambda: newest_sample_time(page) is not None, LIVE_VIEW_TIMEOUT_S,
                   "the first poll of the live views")
        newest_before = newest_sample_time(page)
        lines_before = page.evaluate(LINE_PATHS_JS, "#molten-telemetry-utilization")

        max_tokens_box = page.get_by_label("number input for max_tokens")
        max_tokens_box.fill(str(MAX_TOKENS))
        max_tokens_box.press("Enter")
        message_box.fill("Explain what a KV cache is.")
        page.get_by_role("button", name="Send", exact=True).click()
        stats = page.locator("#molten-reply-stats")
        wait_until(lambda: re.search(r"Finish reason\s+(length|stop)", stats.inner_text()), REPLY_TIMEOUT_S,
                   "the reply to finish (its finish reason in the figures table)")

        num_output_tokens = int(re.search(r"Output tokens\s+(\d+)", stats.inner_text()).group(1))
        assert 3 <= num_output_tokens <= MAX_TOKENS, "the max_tokens control reaches the server"

        lengths = page.evaluate("window.moltenReplyLengths")
        assert lengths[-1] > 0, "the reply has text"
        assert len(lengths) >= 3, f"the reply should grow in several pieces while it streams, saw lengths {lengths}"
        assert lengths == sorted(lengths), f"streamed text only grows, saw lengths {lengths}"

        timeline_marks = page.locator("#molten-token-timeline g.mark-symbol path")
        assert timeline_marks.count() >= 3, "the token timeline shows one mark per token"

        wait_until(lambda: "decode worker" in page.locator("#molten-kv").inner_text(), LIVE_VIEW_TIMEOUT_S,
                   "the KV cache view to show the decode worker's pool")

        newest_after = wait_until(
            lambda: (newest := newest_sample_time(page)) is not None and newest != newest_before and newest,
            LIVE_VIEW_TIMEOUT_S, "new telemetry samples after the reply",
        )
        lines_after = wait_until(
            lambda: (lines := page.evaluate(LINE_PATHS_JS, "#molten-telemetry-utilization")) != lines_before and lines,
            LIVE_VIEW_TIMEOUT_S, "the utilization plot to redraw",
        )
        assert newest_after != newest_before
        assert any(path for path in lines_after), "the utilization plot draws at least one line"

        process_lines = wait_until(
            lambda: [path for path in page.evaluate(LINE_PATHS_JS, "#molten-telemetry-process-memory") if path],
            LIVE_VIEW_TIMEOUT_S, "the per-process memory plot to draw its lines",
        )
        assert len(process_lines) >= 2, "one line per Molten process (ingress, workers, telemetry)"
        page.locator("#molten-telemetry-process-memory").screenshot(path=str(ARTIFACT_DIR / "process-memory.png"))
        labels = page.evaluate(SVG_TEXTS_JS, "#molten-telemetry-process-memory")
        assert "decode:tiny-random-llama" in labels, f"the legend names each worker as role:model, saw {labels}"
    finally:
        page.screenshot(path=str(SCREENSHOT_PATH), full_page=True)
    assert SCREENSHOT_PATH.stat().st_size > 10_000, "the screenshot shows the page"

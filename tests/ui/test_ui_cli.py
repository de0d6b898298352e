"""`molten serve` and `molten chat` argument handling and failures that need no running server."""

from __future__ import annotations

import socket

import pytest

from molten import cli_chat, cli_serve
from molten.cli import build_parser, main


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_arguments_build_settings():
    args = build_parser().parse_args(
        ["serve", "--model", "tiny-random-llama", "--mode", "colocated", "--port", "8100", "--ui-port", "0",
         "--dashboard-port", "8300", "--threads", "1", "--kv-cache-mib", "64", "--max-model-len", "512"]
    )
    settings = cli_serve.settings_from_args(args)
    assert settings.model == "tiny-random-llama"
    assert settings.mode == "colocated"
    assert settings.host == "127.0.0.1"
    assert settings.http_port == 8100
    assert settings.ui_port == 0
    assert settings.dashboard_port == 8300
    assert settings.num_threads == 1
    assert settings.cache.kv_cache_memory_mib == 64
    assert settings.max_model_len == 512
    assert settings.address is None


def test_serve_defaults_bind_loopback():
    settings = cli_serve.settings_from_args(build_parser().parse_args(["serve"]))
    assert settings.host == "127.0.0.1"
    assert (settings.http_port, settings.ui_port, settings.dashboard_port) == (8000, 7860, 8265)


def test_serve_invalid_port_names_flag(capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_serve_unknown_mode_rejected():
    with pytest.raises(SystemExit) as exc_info:
        main(["serve", "--mode", "split"])
    assert exc_info.value.code == 2


def test_port_in_use_names_flag():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(cli_serve.StartupError, match="--port"):
            cli_serve.check_port_free("127.0.0.1", port, "--port")


def test_dashboard_lines_token_file(monkeypatch):
    monkeypatch.setattr(cli_serve, "is_ray_token_auth_enabled", lambda: True)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    text = " ".join(cli_serve.dashboard_access_lines())
    assert "~/.ray/auth_token" in text
    assert "get-auth-token" in text
    assert "RAY_AUTH_MODE=disabled" in text


def test_dashboard_lines_token_env_never_printed(monkeypatch):
    monkeypatch.setattr(cli_serve, "is_ray_token_auth_enabled", lambda: True)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-value-123")
    text = " ".join(cli_serve.dashboard_access_lines())
    assert "RAY_AUTH_TOKEN environment variable" in text
    assert "secret-value-123" not in text


def test_dashboard_lines_auth_off(monkeypatch):
    monkeypatch.setattr(cli_serve, "is_ray_token_auth_enabled", lambda: False)
    assert cli_serve.dashboard_access_lines() == ["Token authentication is off: the dashboard opens without a token."]


def test_url_host_for_wildcard_binds():
    assert cli_serve.url_host("0.0.0.0") == "127.0.0.1"
    assert cli_serve.url_host("127.0.0.1") == "127.0.0.1"
    assert cli_serve.url_host("::1") == "[::1]"


def test_chat_without_server_names_url(capsys):
    url = f"http://127.0.0.1:{unused_port()}"
    assert main(["chat", "Hello", "--url", url]) == 1
    err = capsys.readouterr().err
    assert f"no Molten server is listening at {url}" in err
    assert "molten serve" in err


def test_chat_body_sends_only_set_flags():
    args = build_parser().parse_args(["chat", "Hi", "--max-tokens", "5", "--seed", "3", "--stop", "a", "--stop", "b"])
    body = cli_chat.build_body(args, "m", "Hi")
    assert body["max_tokens"] == 5
    assert body["seed"] == 3
    assert body["stop"] == ["a", "b"]
    assert body["stream_options"] == {"include_usage": True}
    assert "temperature" not in body


def test_sse_payloads_stop_at_done():
    lines = iter(['data: {"a":1}', "", ": comment", 'data: {"b":2}', "data: [DONE]", 'data: {"c":3}'])
    assert list(cli_chat.iter_sse_payloads(lines)) == [{"a": 1}, {"b": 2}]


def test_sse_invalid_json_is_chat_error():
    with pytest.raises(cli_chat.ChatError, match="not JSON"):
        list(cli_chat.iter_sse_payloads(iter(["data: {oops"])))

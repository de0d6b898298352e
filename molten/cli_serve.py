"""`molten serve`: start Ray, the Serve application and the playground, then run until Ctrl+C.

Ray, Serve and Gradio are imported inside the functions that use them, because `molten`
must import without Ray.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from molten.config import CacheConfig, ConfigError, SpeculativeConfig

if TYPE_CHECKING:
    from molten.deployments.settings import ServeSettings

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 15.0
"""How often a long start-up step reports that it is still running."""

SETTING_FLAGS = {
    "model": "--model",
    "mode": "--mode",
    "dtype": "--dtype",
    "http_port": "--port",
    "ui_port": "--ui-port",
    "dashboard_port": "--dashboard-port",
    "num_threads": "--threads",
    "kv_cache_memory_mib": "--kv-cache-mib",
    "max_model_len": "--max-model-len",
    "memory_budget_mib": "--memory-budget-mib",
    "drain_timeout_s": "--drain-timeout",
    "load_wait_timeout_s": "--load-wait-timeout",
}
"""Command-line flag of each setting a ConfigError can name."""

WORKER_FACTS_TIMEOUT_S = 10.0

RAY_TOKEN_FILE = Path("~/.ray/auth_token")
"""Token file that `ray.init` (Ray 2.60) creates for a new local cluster."""


class StartupError(Exception):
    """A failed start-up step. The message names the cause and the next step."""


def show(message: str) -> None:
    print(f"[molten] {message}", file=sys.stderr, flush=True)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Build validated ServeSettings from `molten serve` arguments. Raises ConfigError."""
    from molten.deployments.settings import ManagerSettings, ServeSettings

    cache = CacheConfig(kv_cache_memory_mib=args.kv_cache_mib)
    manager = ManagerSettings(
        memory_budget_mib=args.memory_budget_mib,
        drain_timeout_s=args.drain_timeout,
        load_wait_timeout_s=args.load_wait_timeout,
    )
    settings = ServeSettings(
        model=args.model,
        dtype=args.dtype,
        mode=args.mode,
        host=args.host,
        http_port=args.port,
        dashboard_port=args.dashboard_port,
        ui_port=args.ui_port,
        address=args.address,
        worker_num_threads=args.threads,
        worker_num_cpus=args.worker_cpus,
        max_model_len=args.max_model_len,
        cache=cache,
        manager=manager,
        speculative=SpeculativeConfig(method=args.speculative, num_speculative_tokens=args.num_speculative_tokens),
    )
    settings.validate()
    return settings


def url_host(host: str) -> str:
    """Return the host to put in a URL: loopback for a wildcard bind address, brackets for IPv6."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raise StartupError when `port` on `host` is already taken, naming the flag that changes it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"port {port} on {host} is not available ({exc.strerror}). Another `molten serve` or "
                f"another program may be using it: stop it, or choose a free port with {flag}."
            ) from None


def check_ports(settings: ServeSettings) -> None:
    if settings.ui_port:
        check_port_free("127.0.0.1", settings.ui_port, "--ui-port (0 disables the playground)")
    if settings.address:
        # A joined cluster already has its dashboard, and may already run Serve's HTTP proxy.
        return
    check_port_free(settings.host, settings.http_port, "--port")
    check_port_free(settings.host, settings.dashboard_port, "--dashboard-port")


def prepare_model(settings: ServeSettings) -> None:
    """Resolve the model and make its files ready (the bundled GGUF is converted once, about a minute).

    The workers then load from the local cache. Raises StartupError for a model that
    cannot be found or read.
    """
    from molten.models import ModelError, load_tokenizer, resolve_model

    try:
        source = resolve_model(settings.model)
        show(f"Model: {source.model_id} ({source.description})")
        load_tokenizer(source, progress=show)
    except ModelError as exc:
        raise StartupError(str(exc)) from None


@contextmanager
def report_while_running(step: str) -> Iterator[None]:
    """Print that `step` is still running every PROGRESS_INTERVAL_S seconds until the block exits."""
    started = time.monotonic()
    finished = threading.Event()

    def report() -> None:
        while not finished.wait(PROGRESS_INTERVAL_S):
            show(f"{step}: still running after {time.monotonic() - started:.0f} s")

    reporter = threading.Thread(target=report, name="molten-startup-progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        finished.set()
        reporter.join()


def start_ray(settings: ServeSettings) -> None:
    from molten.deployments.app import start_ray as start_ray_node

    if settings.address:
        show(f"Joining the Ray cluster at {settings.address}")
    else:
        show(f"Starting a local Ray instance on {settings.host}")
    try:
        start_ray_node(settings)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"join the Ray cluster at {settings.address}" if settings.address else "start Ray"
        raise StartupError(f"could not {where}: {exc}") from None


def deploy(settings: ServeSettings) -> None:
    """Start Serve and deploy the application. Returns when every replica has loaded the model."""
    from molten.deployments.app import load_default_model, run_app

    workers = "one co-located worker" if settings.mode == "colocated" else "a prefill and a decode worker"
    show(f"Deploying the HTTP ingress on {settings.host}:{settings.http_port} and the model manager")
    try:
        with report_while_running("Deploying the ingress and the model manager"):
            run_app(settings, load_model=False)
        show(f"Loading {settings.model} into {workers} with {settings.num_threads} torch thread(s) per worker")
        with report_while_running(f"Starting the worker processes and loading {settings.model}"):
            load_default_model(settings)
    except Exception as exc:
        logger.debug("deploying the Serve application failed", exc_info=True)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StartupError(
            f"deploying the Serve application failed: {first_line}. The workers' logs are under "
            f"/tmp/ray/session_latest/logs/serve (rerun with -v for the full traceback)."
        ) from None


def dashboard_url(settings: ServeSettings) -> str:
    """Return the Ray dashboard's URL: ours for a local instance, the cluster's when joining one."""
    if settings.address:
        try:
            from ray._private.worker import get_dashboard_url  # Ray 2.60; private, so guarded

            url = get_dashboard_url()
            if url:
                return url if "://" in url else f"http://{url}"
        except (ImportError, AttributeError, RuntimeError):
            logger.debug("could not read the dashboard URL of the joined cluster", exc_info=True)
    return f"http://{url_host(settings.host)}:{settings.dashboard_port}"


def is_ray_token_auth_enabled() -> bool:
    """Report whether the connected Ray cluster uses token authentication (checked against Ray 2.60)."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        return get_authentication_mode() == AuthenticationMode.TOKEN
    except (ImportError, AttributeError):
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def ray_command() -> str:
    """Return how to run the `ray` CLI: its name when it is on PATH, else its path beside this Python."""
    if shutil.which("ray"):
        return "ray"
    candidate = Path(sys.executable).with_name("ray")
    return shlex.quote(str(candidate)) if candidate.exists() else "ray"


def dashboard_access_lines() -> list[str]:
    """Explain how to open the dashboard, following how Ray 2.60 finds the token.

    Ray reads the token from $RAY_AUTH_TOKEN, else from the file named by
    $RAY_AUTH_TOKEN_PATH, else from ~/.ray/auth_token, which `ray.init` creates for a new
    local cluster. The token is a secret, so it is never printed here.
    """
    if not is_ray_token_auth_enabled():
        return ["Token authentication is off: the dashboard opens without a token."]
    if os.environ.get("RAY_AUTH_TOKEN"):
        where = "in the RAY_AUTH_TOKEN environment variable"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        where = f"in {os.environ['RAY_AUTH_TOKEN_PATH']} (RAY_AUTH_TOKEN_PATH)"
    else:
        where = f"in {RAY_TOKEN_FILE}"
    return [
        f"Token authentication is on, so the dashboard asks for a token. The token is stored {where}.",
        f"Print it with `{ray_command()} get-auth-token` and paste it into the dashboard's dialog;",
        "the dashboard then keeps it in a cookie. Set RAY_AUTH_MODE=disabled before `molten serve`",
        "to start without token authentication (only on a machine you trust).",
    ]


def curl_example(api_base: str, model_id: str) -> str:
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "What is a KV cache?"}],
        "max_tokens": 64,
        "stream": True,
    }
    return (
        f"curl -N {api_base}/chat/completions -H 'Content-Type: application/json' \\\n"
        f"      -d {shlex.quote(json.dumps(body))}"
    )


def settings_info(settings: ServeSettings, api_base: str, dashboard: str) -> dict[str, Any]:
    """Describe the running server for the playground's Server tab."""
    from molten.deployments.settings import served_model_id

    return {
        "model": served_model_id(settings.model),
        "model_spec": settings.model,
        "mode": settings.mode,
        "dtype": settings.dtype,
        "api_base": api_base,
        "ray_dashboard": dashboard,
        "ray_address": settings.address or "local instance",
        "torch_threads_per_worker": settings.num_threads,
        "ray_cpus_per_worker": settings.worker_num_cpus,
        "kv_cache_memory_mib": settings.cache.kv_cache_memory_mib,
        "kv_block_size": settings.cache.kv_block_size,
        "max_model_len": settings.max_model_len or "model default",
        "default_max_tokens": settings.default_max_tokens or "endpoint default (chat 512, completions 16)",
        "memory_budget_mib": settings.manager.memory_budget_mib or "no budget",
        "drain_timeout_s": settings.manager.drain_timeout_s,
        "load_wait_timeout_s": settings.manager.load_wait_timeout_s,
    }


def fetch_worker_facts(api_base: str) -> list[dict] | None:
    """Return each engine worker's facts (context window, KV blocks, load time) from GET /v1/molten/info.

    Returns None when the request fails, because the facts only decorate the playground's Server tab.
    """
    import httpx

    url = f"{api_base}/molten/info"
    try:
        response = httpx.get(url, timeout=WORKER_FACTS_TIMEOUT_S, trust_env=False)
        response.raise_for_status()
        return response.json().get("workers")
    except (httpx.HTTPError, ValueError) as exc:
        logger.warning("could not read the workers' facts from %s: %s", url, exc)
        return None


def start_playground(settings: ServeSettings, info: dict[str, Any]):
    """Build and launch the Gradio playground on 127.0.0.1, and return (blocks, url)."""
    show(f"Starting the playground on 127.0.0.1:{settings.ui_port}")
    from molten.deployments.app import ingress_handle
    from molten.ui.app import build_playground, launch_playground

    blocks = build_playground(lambda: ingress_handle(settings), info)
    try:
        url = launch_playground(blocks, settings.ui_port)
    except OSError as exc:
        raise StartupError(f"could not start the playground on port {settings.ui_port}: {exc}") from None
    return blocks, url


def print_summary(settings: ServeSettings, info: dict[str, Any], playground_url: str | None) -> None:
    api_base = info["api_base"]
    lines = [
        "",
        f"Molten is serving {info['model']} in {settings.mode} mode.",
        f"  OpenAI API base URL: {api_base}",
        f"  Playground:          {playground_url or 'off (--ui-port 0)'}",
        f"  Ray dashboard:       {info['ray_dashboard']}",
    ]
    lines += [f"    {line}" for line in dashboard_access_lines()]
    lines += [
        "",
        "Try it:",
        f"  {curl_example(api_base, info['model'])}",
        f"  {Path(sys.executable).parent / 'molten'} chat \"What is a KV cache?\" --url {api_base.removesuffix('/v1')}",
        "",
    ]
    if settings.address:
        lines.append("Press Ctrl+C to stop: this deletes the Molten application and leaves the joined cluster running.")
    else:
        lines.append(f"Press Ctrl+C (or send SIGTERM to pid {os.getpid()}) to stop: this shuts down Serve and Ray.")
    print("\n".join(lines), flush=True)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def wait_for_interrupt() -> None:
    """Block until Ctrl+C or SIGTERM."""
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    stop = threading.Event()
    while not stop.wait(1.0):
        pass


def stop_everything(settings: ServeSettings, blocks) -> None:
    """Close the playground, then remove the application (joined cluster) or shut down Serve and Ray."""
    import ray
    from ray import serve

    from molten.deployments.app import shutdown

    if blocks is not None:
        blocks.close()
    if not ray.is_initialized():
        return
    if settings.address:
        from molten.deployments.app import model_app_names

        try:
            # The manager's per-model applications are separate from Molten's own: delete them too.
            for app_name in [settings.app_name, *model_app_names(settings.app_name)]:
                serve.delete(app_name)
        finally:
            ray.shutdown()
    else:
        shutdown()


def serve(args: argparse.Namespace) -> int:
    """Run `molten serve` and return its exit code: 0 after Ctrl+C, 1 when start-up failed, 2 for invalid flags."""
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"molten serve: error: {SETTING_FLAGS.get(exc.field, exc.field)}: {exc}", file=sys.stderr)
        return 2

    if settings.address:
        from molten.deployments.settings import enable_ray_token_auth_for_join

        enable_ray_token_auth_for_join()
    blocks = None
    started = time.monotonic()
    try:
        check_ports(settings)
        prepare_model(settings)
        start_ray(settings)
        deploy(settings)
        api_base = f"http://{url_host(settings.host)}:{settings.http_port}/v1"
        info = settings_info(settings, api_base, dashboard_url(settings))
        info["workers"] = fetch_worker_facts(api_base)
        playground_url = None
        if settings.ui_port:
            blocks, playground_url = start_playground(settings, info)
        show(f"Ready in {time.monotonic() - started:.0f} s")
        print_summary(settings, info, playground_url)
        wait_for_interrupt()
    except StartupError as exc:
        print(f"molten serve: error: {exc}", file=sys.stderr)
        stop_everything(settings, blocks)
        return 1
    except KeyboardInterrupt:
        pass
    show("Stopping: closing the playground, then shutting down Serve and Ray")
    stop_everything(settings, blocks)
    show("Stopped")
    return 0

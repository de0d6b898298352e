"""Serving settings: topology, ports and CPU budgets, validated once by `molten serve`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from molten.config import CacheConfig, ConfigError, EngineConfig, SchedulerConfig

MODES = ("disaggregated", "colocated")


def default_num_threads(mode: str) -> int:
    """Torch threads per engine worker: split the cores between prefill and decode when both run."""
    cores = os.cpu_count() or 1
    return max(1, cores // 2) if mode == "disaggregated" else cores


@dataclass
class ServeSettings:
    model: str = "smollm2-135m-instruct"
    """Catalog name, Hugging Face id, local directory or .gguf path of the served model."""
    dtype: str = "float32"
    mode: str = "disaggregated"
    """`disaggregated` (a prefill worker hands KV blocks to a decode worker) or `colocated` (one worker does both)."""
    host: str = "127.0.0.1"
    http_port: int = 8000
    """Ray Serve HTTP port (the OpenAI-compatible API)."""
    dashboard_port: int = 8265
    ui_port: int = 7860
    """Gradio playground port; 0 disables the playground."""
    address: str | None = None
    """Ray cluster to join (`auto` or `ray://...`); None starts a local one."""
    worker_num_threads: int | None = None
    """Torch threads per engine worker; None splits the machine's cores between the workers."""
    worker_num_cpus: float = 0.5
    """Ray logical CPUs reserved per engine worker actor."""
    ingress_num_cpus: float = 0.25
    """Ray logical CPUs reserved for the HTTP ingress actor."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest accepted request body; larger ones get HTTP 413."""
    max_model_len: int | None = None
    default_max_tokens: int | None = None
    """max_tokens for requests that do not set it; None keeps the endpoint defaults (chat 512, completions 16)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    app_name: str = "molten"
    """Serve application name; several apps (say, both modes) can share one Serve instance."""
    route_prefix: str = "/"
    """URL prefix of this application's routes on the Serve HTTP port."""

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("mode", f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("http_port", "dashboard_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise ConfigError(name, f"{name} must be in 1..65535, got {port}")
        if not 0 <= self.ui_port <= 65535:
            raise ConfigError("ui_port", f"ui_port must be in 0..65535 (0 disables the UI), got {self.ui_port}")
        if self.worker_num_cpus <= 0 or self.ingress_num_cpus <= 0:
            raise ConfigError("worker_num_cpus", "Ray CPU shares must be > 0")
        self.engine_config().validate()

    @property
    def num_threads(self) -> int:
        return self.worker_num_threads or default_num_threads(self.mode)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            num_threads=self.num_threads,
            cache=self.cache,
            scheduler=self.scheduler,
        )

    def deployment_name(self, role: str) -> str:
        """Name shown in the Ray dashboard, e.g. `molten:prefill:smollm2-135m-instruct`."""
        return f"molten:{role}:{served_model_id(self.model)}"


def enable_ray_token_auth_for_join() -> None:
    """Make this process send the Ray auth token when it joins an existing cluster.

    Ray 2.60 clusters started by `ray.init()` require a token by default, but a joining
    process sends the token (from ~/.ray/auth_token or RAY_AUTH_TOKEN) only when
    RAY_AUTH_MODE is "token". Ray reads that variable when it is imported, so call this
    before the first `import ray`.
    """
    has_token = "RAY_AUTH_TOKEN" in os.environ or os.path.exists(os.path.expanduser("~/.ray/auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and has_token:
        os.environ["RAY_AUTH_MODE"] = "token"


def served_model_id(model: str) -> str:
    """The id clients send in `model`: the catalog name, or a path's last component."""
    return os.path.basename(os.path.normpath(model)) if os.sep in model else model

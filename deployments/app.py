"""Builds the Molten Serve application and starts Ray and Serve on the loopback interface.

The application contains the HTTP ingress and the model manager (`molten:model-manager`).
Models are not part of it: the manager deploys each model's workers as their own Serve
applications, and `run_app` asks it to load the settings' model.
"""

from __future__ import annotations

import logging
import os

import ray
from ray import serve
from ray.serve import Application

from molten.deployments.ingress import MoltenIngress
from molten.deployments.manager import MANAGER_NAME, ModelManager
from molten.deployments.settings import ServeSettings, served_model_id
from molten.deployments.telemetry import start_telemetry_actor

logger = logging.getLogger(__name__)

INGRESS_NAME = "molten:ingress"


MANAGER_NUM_CPUS = 0.01
"""The manager only does bookkeeping and Serve calls, so it reserves almost no CPU."""


class ModelLoadFailed(RuntimeError):
    """The model that `run_app` asked the manager to load failed; the message is the manager's error."""


def build_app(settings: ServeSettings) -> Application:
    """Bind the model manager and the ingress into a Serve application (no model is loaded yet)."""
    settings.validate()
    # Workers and the ingress each need the model's files; tell Ray workers where the cache is.
    env = {"MOLTEN_HOME": os.environ["MOLTEN_HOME"]} if "MOLTEN_HOME" in os.environ else {}
    manager_options: dict = {"num_cpus": MANAGER_NUM_CPUS}
    ingress_options: dict = {"num_cpus": settings.ingress_num_cpus}
    if env:
        manager_options["runtime_env"] = {"env_vars": env}
        ingress_options["runtime_env"] = {"env_vars": env}
    manager = ModelManager.options(name=MANAGER_NAME, ray_actor_options=manager_options).bind(settings)
    return MoltenIngress.options(name=INGRESS_NAME, ray_actor_options=ingress_options).bind(
        manager=manager,
        default_model_id=served_model_id(settings.model),
        max_body_bytes=settings.max_body_bytes,
        default_max_tokens=settings.default_max_tokens,
    )


def start_ray(settings: ServeSettings) -> None:
    """Start a local Ray instance bound to loopback, or join `settings.address`."""
    if ray.is_initialized():
        return
    if settings.address:
        ray.init(address=settings.address, log_to_driver=False)
        logger.info("joined Ray cluster at %s", settings.address)
        return
    ray.init(
        num_cpus=max(2, os.cpu_count() or 2),
        include_dashboard=True,
        dashboard_host=settings.host,
        dashboard_port=settings.dashboard_port,
        log_to_driver=False,
        configure_logging=True,
        logging_level=logging.WARNING,
    )


def start_serve(settings: ServeSettings) -> None:
    """Start Ray (if needed) and Serve's HTTP proxy on settings.host:http_port.

    Serve keeps the HTTP options of its first start, so later calls in the same Ray
    instance (another application) do not move the proxy.
    """
    start_ray(settings)
    serve.start(http_options={"host": settings.host, "port": settings.http_port})
    # One telemetry actor per cluster; later calls find the running one.
    start_telemetry_actor(getattr(settings, "telemetry", None))


def run_app(settings: ServeSettings, load_model: bool = True) -> None:
    """Start Ray and Serve if needed, deploy the application under settings.app_name, and load settings.model.

    Raises ModelLoadFailed when the manager could not load the model.
    """
    start_serve(settings)
    serve.run(build_app(settings), name=settings.app_name, route_prefix=settings.route_prefix)
    if load_model:
        load_default_model(settings)


def load_default_model(settings: ServeSettings) -> None:
    """Load settings.model through the running application's manager and wait until it is ready.

    Raises ModelLoadFailed when the manager could not load the model.
    """
    record = manager_handle(settings).load.remote(settings.model, mode=settings.mode, wait=True).result()
    if isinstance(record.get("error"), dict):
        raise ModelLoadFailed(record["error"]["message"])
    if record["state"] != "ready":
        raise ModelLoadFailed(f"model {record['model_id']} failed to load: {record['error']}")


def ingress_handle(settings: ServeSettings):
    return serve.get_deployment_handle(INGRESS_NAME, app_name=settings.app_name)


def manager_handle(settings: ServeSettings):
    """Handle of the application's model manager (`molten:model-manager`)."""
    return serve.get_deployment_handle(MANAGER_NAME, app_name=settings.app_name)


def model_app_names(app_name: str) -> list[str]:
    """Names of the per-model worker applications that the manager of `app_name` deployed."""
    return [name for name in serve.status().applications if name.startswith(f"{app_name}:")]


def shutdown() -> None:
    """Shut down Serve (every application, including the per-model ones) and Ray."""
    try:
        serve.shutdown()
    finally:
        ray.shutdown()

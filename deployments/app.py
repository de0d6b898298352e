"""Builds the Molten Serve application and starts Ray and Serve on the loopback interface."""

from __future__ import annotations

import logging
import os

import ray
from ray import serve
from ray.serve import Application

from molten.deployments.ingress import MoltenIngress
from molten.deployments.settings import ServeSettings, served_model_id
from molten.deployments.workers import ColocatedWorker, DecodeWorker, PrefillWorker

logger = logging.getLogger(__name__)

INGRESS_NAME = "molten:ingress"


def build_app(settings: ServeSettings) -> Application:
    """Bind the worker deployments and the ingress for one model into a Serve application."""
    settings.validate()
    engine_config = settings.engine_config()
    worker_options = {"num_cpus": settings.worker_num_cpus}
    # Workers and the ingress each need the model's files; tell Ray workers where the cache is.
    env = {"MOLTEN_HOME": os.environ["MOLTEN_HOME"]} if "MOLTEN_HOME" in os.environ else {}
    if env:
        worker_options["runtime_env"] = {"env_vars": env}

    handles: dict = {}
    if settings.mode == "colocated":
        handles["colocated"] = ColocatedWorker.options(
            name=settings.deployment_name("colocated"), ray_actor_options=worker_options
        ).bind(engine_config)
    else:
        handles["prefill"] = PrefillWorker.options(
            name=settings.deployment_name("prefill"), ray_actor_options=worker_options
        ).bind(engine_config)
        handles["decode"] = DecodeWorker.options(
            name=settings.deployment_name("decode"), ray_actor_options=worker_options
        ).bind(engine_config)

    ingress_options = {"num_cpus": settings.ingress_num_cpus}
    if env:
        ingress_options["runtime_env"] = {"env_vars": env}
    return MoltenIngress.options(name=INGRESS_NAME, ray_actor_options=ingress_options).bind(
        model_id=served_model_id(settings.model),
        model_spec=settings.model,
        max_body_bytes=settings.max_body_bytes,
        default_max_tokens=settings.default_max_tokens,
        **handles,
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


def run_app(settings: ServeSettings, blocking: bool = False) -> None:
    """Start Ray and Serve if needed, then deploy the application under settings.app_name."""
    start_serve(settings)
    serve.run(build_app(settings), name=settings.app_name, route_prefix=settings.route_prefix, blocking=blocking)


def ingress_handle(settings: ServeSettings):
    return serve.get_deployment_handle(INGRESS_NAME, app_name=settings.app_name)


def shutdown() -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()

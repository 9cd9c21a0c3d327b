"""Connecting to Ray: an embedded local instance, or an existing cluster."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_HOST = "127.0.0.1"


def dashboard_host() -> str:
    """Where the dashboard (and with it the Jobs API) listens: loopback unless RAYBIG_DASHBOARD_HOST
    says otherwise (e.g. 0.0.0.0 on a head node other machines submit to; token auth still applies)."""
    return os.environ.get("RAYBIG_DASHBOARD_HOST") or DEFAULT_HOST


def init_kwargs(num_cpus: int, num_gpus: int | None, dashboard: bool, use_gpu: bool) -> dict[str, Any]:
    """ray.init arguments for an embedded local Ray (a function so tests can check the defaults)."""
    return dict(
        address="local",  # never attach to some other cluster already running on this machine
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=dashboard,
        dashboard_host=dashboard_host(),
        dashboard_port=free_port() if dashboard else None,
        runtime_env={"env_vars": worker_env(use_gpu)},
        _metrics_export_port=free_port(),
    )


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Env vars every Train worker needs."""
    env = {"PYTHONUNBUFFERED": "1"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # deterministic accelerator choice; lets a GPU box train on CPU
    for var in ("TORCH_EXTENSIONS_DIR", "RAYBIG_PEAK_FLOPS"):  # the latter: MFU's peak (raybig.metrics)
        if os.environ.get(var):
            env[var] = os.environ[var]
    return env


def cluster_address(address: str | None) -> str | None:
    """The cluster to attach to: --address, else RAY_ADDRESS (set inside a submitted job), else none."""
    return address or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(address: str | None = None, num_cpus: float | None = None, num_gpus: int | None = None,
               dashboard: bool = False, use_gpu: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Attach to a cluster, or start an embedded local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return {"embedded": False, "address": None}
    addr = cluster_address(address)
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if addr:
        ray.init(address=addr, runtime_env={"env_vars": worker_env(use_gpu)}, **quiet)
        return {"embedded": False, "address": addr}
    cpus = max(float(os.cpu_count() or 1), float(num_cpus or 0))
    # Serve's proxy (a Ray worker: it inherits this env) then answers overload and dead replicas
    # with OpenAI-shaped JSON 503s; see raybig.serve.proxy_errors.
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "raybig.serve.proxy_errors:middlewares")
    ctx = ray.init(**init_kwargs(int(cpus + 0.999), num_gpus, dashboard, use_gpu), **quiet)
    return {"embedded": True, "address": getattr(ctx, "address_info", {}).get("address"),
            "dashboard_url": getattr(ctx, "dashboard_url", None)}

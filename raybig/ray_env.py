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
    ctx = ray.init(
        address="local",
        num_cpus=int(cpus + 0.999),
        num_gpus=num_gpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port() if dashboard else None,
        runtime_env={"env_vars": worker_env(use_gpu)},
        _metrics_export_port=free_port(),
        **quiet,
    )
    return {"embedded": True, "address": getattr(ctx, "address_info", {}).get("address"),
            "dashboard_url": getattr(ctx, "dashboard_url", None)}

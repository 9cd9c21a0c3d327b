"""`raybig run serve.yaml`: serve on an embedded Ray (or --address) until Ctrl-C."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from raybig.cluster.connect import clear_serve_state, normalize, resolve_address, save_serve_state
from raybig.serve.deploy import delete_app, deploy, wait_running
from raybig.spec.serve import ServeSpec


def _connected_dashboard() -> str | None:
    """The dashboard of the Ray this process is already connected to, if it knows it."""
    try:
        import ray

        return ray._private.worker.global_worker.node.address_info.get("webui_url") or None
    except Exception:  # not connected, or a client without a node: fall back to the defaults
        return None


def start_serve(spec: ServeSpec, address: str | None = None) -> dict[str, Any]:
    """Start Ray (embedded unless address/RAY_ADDRESS), Serve's proxy on spec.host:port, then the app.

    Returns:
        `{"name", "url" (the OpenAI base URL, .../v1), "dashboard", "embedded", "api_key_env"}`.

    Raises:
        ServeError: no export at the checkpoint, the key env var unset, or the app failed to start.
        ClusterError: the dashboard cannot be reached.
    """
    from ray import serve

    from raybig.cluster.ray_env import ensure_ray
    from raybig.serve.deploy import app_args

    app_args(spec)  # a missing export or an unset key env var fails here, before Ray starts
    need = spec.resources.num_cpus * max(1, spec.autoscaling.min_replicas, spec.autoscaling.initial_replicas or 0)
    info = ensure_ray(address, num_cpus=need + 1, dashboard=True)
    known = info.get("dashboard_url") or _connected_dashboard()
    dash = normalize(known) if known else resolve_address(address)
    if info.get("embedded"):
        serve.start(http_options={"host": spec.host, "port": spec.port})
    deploy(spec, dash)
    st = wait_running(spec.name, dash, timeout_s=180)
    if info.get("embedded"):  # lets `raybig serve status` in another shell find this server
        save_serve_state(dash, spec.name)
    return {"name": spec.name, "url": st["url"], "dashboard": dash, "embedded": info.get("embedded"),
            "api_key_env": spec.api_key_env}


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def run_serve(spec: ServeSpec, address: str | None = None,
              on_ready: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Serve `spec` until Ctrl-C or SIGTERM, then remove it (embedded Ray: stop Serve as a whole).

    Args:
        spec: the app to serve.
        address: Ray cluster to attach to; None: RAY_ADDRESS, else an embedded local Ray.
        on_ready: called once with `start_serve`'s result when the app is RUNNING (the CLI prints it).

    Returns:
        `start_serve`'s result, after the server was stopped.
    """
    res = start_serve(spec, address)
    # SIGTERM (kill, a supervisor) cleans up like Ctrl-C: remove the app, stop embedded Ray.
    # Set after ray.init, which installs its own handler.
    signal.signal(signal.SIGTERM, _interrupt)
    if on_ready:
        on_ready(res)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        try:
            if res.get("embedded"):  # our own Ray: stop Serve as a whole
                from ray import serve

                serve.shutdown()
            else:  # a shared cluster: remove only this app
                delete_app(spec.name, res["dashboard"])
        finally:
            if res.get("embedded"):
                clear_serve_state()
        return res

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


def app_present(name: str) -> bool | None:
    """Is Serve application `name` deployed on the Ray this process is connected to? None: cannot tell."""
    try:
        from ray import serve

        return name in serve.status().applications
    except Exception:  # noqa: BLE001 - the controller restarting, Ray going away: ask again later
        return None


def run_serve(spec: ServeSpec, address: str | None = None,
              on_ready: Callable[[dict[str, Any]], None] | None = None,
              on_note: Callable[[str], None] | None = None, poll_s: float = 2.0) -> dict[str, Any]:
    """Serve `spec` until Ctrl-C, SIGTERM, or the app is removed elsewhere; then clean up.

    Cleaning up removes the app (embedded Ray: stops Serve as a whole). `raybig serve down NAME` in
    another shell removes the app; this process notices within `poll_s` seconds (or after three
    failed looks, when Serve itself went away) and ends as well.

    Args:
        spec: the app to serve.
        address: Ray cluster to attach to; None: RAY_ADDRESS, else an embedded local Ray.
        on_ready: called once with `start_serve`'s result when the app is RUNNING (the CLI prints it).
        on_note: called with one line when the app was removed elsewhere.
        poll_s: seconds between looks at the app.

    Returns:
        `start_serve`'s result, after the server was stopped; `removed: True` when it was removed elsewhere.
    """
    res = start_serve(spec, address)
    # SIGTERM (kill, a supervisor) cleans up like Ctrl-C: remove the app, stop embedded Ray.
    # Set after ray.init, which installs its own handler.
    signal.signal(signal.SIGTERM, _interrupt)
    if on_ready:
        on_ready(res)
    try:
        unknown = 0
        while True:
            time.sleep(poll_s)
            present = app_present(spec.name)
            unknown = unknown + 1 if present is None else 0
            if present is False or unknown >= 3:
                res["removed"] = True
                if on_note:
                    on_note(f"app {spec.name!r} was removed (raybig serve down?); stopping this server")
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        try:
            if res.get("embedded"):  # our own Ray: stop Serve as a whole
                from ray import serve

                serve.shutdown()
            elif not res.get("removed"):  # a shared cluster: remove only this app (unless already gone)
                delete_app(spec.name, res["dashboard"])
        finally:
            if res.get("embedded"):
                clear_serve_state()
        return res

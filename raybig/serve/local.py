"""`raybig run serve.yaml`: serve on an embedded Ray (or --address) until Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from rich.console import Console

from raybig.serve.deploy import STATE_FILE, dashboard_address, delete_app, deploy, wait_running
from raybig.spec.serve import ServeSpec

console = Console(stderr=True, highlight=False)


def _connected_dashboard() -> str | None:
    """The dashboard of the Ray this process is already connected to, if it knows it."""
    try:
        import ray

        return ray._private.worker.global_worker.node.address_info.get("webui_url") or None
    except Exception:  # not connected, or a client without a node: fall back to the defaults
        return None


def start_serve(spec: ServeSpec, address: str | None = None) -> dict[str, Any]:
    """Ray (embedded unless address/RAY_ADDRESS), Serve's proxy on spec.host:port, then the app."""
    from ray import serve

    from raybig.cluster.ray_env import ensure_ray
    from raybig.serve.deploy import app_args

    app_args(spec)  # a missing export or an unset key env var fails here, before Ray starts
    need = spec.resources.num_cpus * max(1, spec.autoscaling.min_replicas, spec.autoscaling.initial_replicas or 0)
    info = ensure_ray(address, num_cpus=need + 1, dashboard=True)
    dash = dashboard_address(info.get("dashboard_url") or _connected_dashboard())
    if info.get("embedded"):
        serve.start(http_options={"host": spec.host, "port": spec.port})
    deploy(spec, dash)
    st = wait_running(spec.name, dash, timeout_s=180)
    if info.get("embedded"):  # lets `raybig serve status` in another shell find this server
        os.makedirs(os.path.dirname(STATE_FILE), exist_ok=True)
        with open(STATE_FILE, "w") as f:
            json.dump({"dashboard": dash, "pid": os.getpid(), "app": spec.name}, f)
    return {"name": spec.name, "url": st["url"], "dashboard": dash, "embedded": info.get("embedded")}


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def run_serve(spec: ServeSpec, address: str | None = None, as_json: bool = False) -> dict[str, Any]:
    res = start_serve(spec, address)
    # SIGTERM (kill, a supervisor) cleans up like Ctrl-C: remove the app, stop embedded Ray.
    # Set after ray.init, which installs its own handler.
    signal.signal(signal.SIGTERM, _interrupt)
    if as_json:
        print(json.dumps(res), flush=True)
    else:
        console.print(f"[green]serving[/green] {spec.name!r} at {res['url']} "
                      f"(OpenAI-compatible: POST /completions, GET /models); Ctrl-C stops it")
        if spec.api_key_env:
            console.print(f"  API key: the value of ${spec.api_key_env}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print(f"stopping {spec.name!r}")
        try:
            if res.get("embedded"):  # our own Ray: stop Serve as a whole
                from ray import serve

                serve.shutdown()
            else:  # a shared cluster: remove only this app
                delete_app(spec.name, res["dashboard"])
        finally:
            if res.get("embedded") and os.path.exists(STATE_FILE):
                os.remove(STATE_FILE)
        return res


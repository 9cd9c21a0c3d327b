"""Connecting to Ray: an embedded local instance, or an existing cluster."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_HOST = "127.0.0.1"


def dashboard_host() -> str:
    """Where the dashboard (and with it the Jobs API) listens.

    Loopback unless RAYBIG_DASHBOARD_HOST says otherwise (e.g. 0.0.0.0 on a head node other machines
    submit to; token auth still applies).
    """
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
    # Explicit either way: a DS_ACCELERATOR=cpu inherited from the driver (Makefile, tests) must not reach GPU runs.
    env["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
    for var in ("TORCH_EXTENSIONS_DIR", "RAYBIG_PEAK_FLOPS"):  # the latter: MFU's peak (raybig.metrics)
        if os.environ.get(var):
            env[var] = os.environ[var]
    return env


def cluster_address(address: str | None) -> str | None:
    """The cluster to attach to: --address, else RAY_ADDRESS (set inside a submitted job), else none."""
    return address or os.environ.get("RAY_ADDRESS") or None


def ensure_ray(address: str | None = None, num_cpus: float | None = None, num_gpus: int | None = None,
               dashboard: bool = False, use_gpu: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Attach to a cluster, or start an embedded local Ray bound to 127.0.0.1.

    An embedded Ray also gets its Prometheus discovery file and prints its scrape targets
    (`publish_metrics_targets`); an attached cluster's head writes its own when its dashboard runs.
    """
    import ray

    if ray.is_initialized():
        return {"embedded": False, "address": None}
    addr = cluster_address(address)
    quiet: dict[str, Any] = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if addr:
        ray.init(address=addr, runtime_env={"env_vars": worker_env(use_gpu)}, **quiet)
        return {"embedded": False, "address": addr}
    cpus = max(float(os.cpu_count() or 1), float(num_cpus or 0))
    # Serve's proxy (a Ray worker: it inherits this env) then answers overload and dead replicas
    # with OpenAI-shaped JSON 503s; see raybig.serve.proxy_errors.
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "raybig.serve.proxy_errors:middlewares")
    # Ray turns token auth on for a new local Ray and logs that it did on every run: drop that one line.
    _quiet_token_notice()
    ctx = ray.init(**init_kwargs(int(cpus + 0.999), num_gpus, dashboard, use_gpu), **quiet)
    return {"embedded": True, "address": getattr(ctx, "address_info", {}).get("address"),
            "dashboard_url": getattr(ctx, "dashboard_url", None), **publish_metrics_targets()}


class _DropTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


def _quiet_token_notice() -> None:
    """Hide Ray's "Token authentication is enabled..." notice (auth stays as Ray sets it up)."""
    lg = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenNotice) for f in lg.filters):
        lg.addFilter(_DropTokenNotice())


# Ray's file name (ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE); dashboards/prometheus.yml reads it.
PROM_SD_FILE = "prom_metrics_service_discovery.json"


def metrics_targets() -> list[str]:
    """`host:port` of every metrics endpoint in the connected Ray.

    As Ray's own discovery file lists them: each alive node's metrics export port, then the
    autoscaler's and the dashboard's.
    """
    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    def addr(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    targets = [addr(n["NodeManagerAddress"], n["MetricsExportPort"]) for n in ray.nodes() if n.get("Alive")]
    for key in (b"AutoscalerMetricsAddress", b"DashboardMetricsAddress"):
        v = _internal_kv_get(key)  # registered by those processes, started before the raylet
        if v:
            targets.append(v.decode())
    return targets


def write_prometheus_sd(session_dir: str, temp_dir: str, targets: list[str]) -> tuple[str, str]:
    """Write Ray's Prometheus discovery file for `targets`; returns (session file, well-known path).

    The file goes into `session_dir` and `<temp_dir>/prom_metrics_service_discovery.json` becomes a
    link to it: the layout Ray's dashboard writes, so one prometheus.yml works either way. Each Ray has
    its own session file; the well-known link follows the Ray started last on the machine (like
    `<temp_dir>/session_latest`). A Ray running its dashboard re-points the link to itself every 5 s,
    so with several Rays on one host, scrape a given one through its session file.
    """
    path = os.path.join(session_dir, PROM_SD_FILE)
    tmp = f"{path}.raybig-{os.getpid()}"  # not Ray's temp name: its dashboard may write concurrently
    with open(tmp, "w") as f:
        json.dump([{"labels": {"job": "ray"}, "targets": targets}], f)
    os.replace(tmp, path)  # atomic: Prometheus never reads half a file
    return path, link_prometheus_sd(path, temp_dir)


def link_prometheus_sd(sd_file: str, temp_dir: str | None = None) -> str:
    """Make `<temp_dir>/prom_metrics_service_discovery.json` a link to `sd_file`; returns the link.

    `temp_dir` defaults to Ray's default temp dir (`/tmp/ray`, or under RAY_TMPDIR / TMPDIR), the
    path dashboards/prometheus.yml reads: a cluster started with its own `--temp-dir` links its
    `<temp-dir>/prom_metrics_service_discovery.json` there to be found the same way.
    """
    if temp_dir is None:
        from ray._common.utils import get_default_ray_temp_dir

        temp_dir = get_default_ray_temp_dir()
    link = os.path.join(temp_dir, PROM_SD_FILE)
    if os.path.realpath(link) != os.path.realpath(sd_file):
        os.makedirs(temp_dir, exist_ok=True)
        tmp_link = f"{link}.raybig-{os.getpid()}"
        try:
            os.symlink(sd_file, tmp_link)
            os.replace(tmp_link, link)  # replaces a link from an earlier session in one step
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp_link)
            raise
    return link


def publish_metrics_targets() -> dict[str, Any]:
    """Make the embedded Ray scrapeable as the README says.

    Writes its discovery file and prints the scrape targets on stderr. Best effort: a failure is
    reported, never raised.
    """
    import ray

    # Without its dashboard (the default: it costs ~3 s of start-up and ~1 GB of RAM in 10 processes)
    # Ray writes no discovery file, and its metrics port is random. One node whose ports are fixed for
    # the session, so one write at start-up is enough; with the dashboard, Ray's own writer takes over.
    try:
        node: Any = ray._private.worker._global_node
        targets = metrics_targets()
        path, link = write_prometheus_sd(node.get_session_dir_path(), node.get_temp_dir_path(), targets)
    except Exception as e:  # metrics discovery must never fail a run
        print(f"raybig: could not write the Prometheus discovery file: {e}", file=sys.stderr, flush=True)
        return {}
    print(f"raybig: Prometheus scrape targets {' '.join(targets)} (file_sd: {link} -> {path})",
          file=sys.stderr, flush=True)
    return {"metrics_targets": targets, "prometheus_sd_file": path}


def _fmt_res(res: dict[str, float]) -> str:
    """`{CPU: 1, GPU: 1, memory: 4.0 GiB}`: a bundle as a person reads it."""
    def one(k: str, v: float) -> str:
        if k in ("memory", "object_store_memory"):
            return f"{k}: {v / 2**30:.1f} GiB"
        return f"{k}: {v:g}"

    return "{" + ", ".join(one(k, v) for k, v in res.items()) + "}"


def gang_shortfall(bundle: dict[str, float], workers: int, nodes: list[dict[str, float]]) -> str | None:
    """What keeps `workers` copies of `bundle` from ever fitting on `nodes`, or None if they fit.

    A bundle cannot span nodes, so each node holds `min(node[r] // bundle[r])` of them; the gang
    fits when those add up to `workers` (exact for identical bundles). Totals, not what is free now:
    a busy cluster is a reason to wait, not to refuse.

    Args:
        bundle: one worker's resources (`{"CPU": 1, "GPU": 1}`); zero amounts are ignored.
        workers: how many such bundles the gang needs at once.
        nodes: each alive node's total resources.

    Returns:
        One line for the user ("needs 2 workers × {GPU: 1}; this Ray has GPU: 0 on every node"), or None.
    """
    want = {k: float(v) for k, v in bundle.items() if v and float(v) > 0}
    need = f"needs {workers} worker{'s' if workers != 1 else ''} × {_fmt_res(want)}"
    if not nodes:
        return f"{need}; this Ray has no alive node"
    for k, v in want.items():
        most = max(float(n.get(k, 0)) for n in nodes)
        if most < v:
            amount = _fmt_res({k: most})[1:-1]
            where = "on every node" if len(nodes) > 1 else "(1 node)"
            if most == 0:
                return f"{need}; this Ray has {amount} {where}"
            return f"{need}; no node has {_fmt_res({k: v})[1:-1]} (the most on one node is {amount.split(': ')[1]})"
    per_node = [int(min(float(n.get(k, 0)) // v for k, v in want.items())) if want else workers for n in nodes]
    if sum(per_node) >= workers:
        return None
    short = [k for k, v in want.items() if sum(float(n.get(k, 0)) for n in nodes) < v * workers]
    total = _fmt_res({k: sum(float(n.get(k, 0)) for n in nodes) for k in (short or want)})[1:-1]
    return f"{need}; at most {sum(per_node)} fit at once on this Ray's {len(nodes)} node(s) (in all {total})"


def check_gang_fits(bundle: dict[str, float], workers: int, what: str = "this run") -> None:
    """Refuse at once a gang the connected Ray can never place (instead of Ray's silent wait).

    Call it after `ensure_ray`, before `TorchTrainer.fit` / `Tuner.fit`. An autoscaling cluster
    that will add the missing nodes can skip it with RAYBIG_NO_FIT_CHECK=1.

    Args:
        bundle: one worker's resources (`spec.worker_bundle()`).
        workers: the gang size (`spec.resources.workers`).
        what: names the job in the message.

    Raises:
        UsageError: the gang cannot fit on the alive nodes' total resources (exit 2; one line).
    """
    import ray

    from raybig.errors import UsageError

    if os.environ.get("RAYBIG_NO_FIT_CHECK") == "1":
        return
    nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    why = gang_shortfall(bundle, workers, nodes)
    if why:
        raise UsageError(f"{what} {why}: lower resources.workers / the per-worker resources, or add nodes "
                         "that have them (an autoscaling cluster: RAYBIG_NO_FIT_CHECK=1)")

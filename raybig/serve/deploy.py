"""Serve's declarative config from a `kind: serve` spec, and deploying it through the dashboard.

`serve_config(spec)` -> the config dict `serve deploy` takes. `deploy(spec, dashboard)` merges the
app into what the cluster already runs and PUTs it: redeploying the same spec is a no-op, and a
new checkpoint changes the app's args, so Serve rolls replicas over (new ones up before old go).
"""

from __future__ import annotations

import time
from typing import Any

from raybig.cluster.connect import auth_headers, resolve_address, translate
from raybig.errors import ServeError
from raybig.serve.app import DEPLOYMENT
from raybig.serve.http import api_key_digest
from raybig.spec.serve import ServeSpec
from raybig.train.export import resolve_export

IMPORT_PATH = "raybig.serve.app:build_app"


def deployment_options(spec: ServeSpec) -> dict[str, Any]:
    """Serve deployment options (concurrency, queue, autoscaling, actor resources) from the spec."""
    r = spec.resources
    actor: dict[str, Any] = {"num_cpus": r.num_cpus}
    if r.num_gpus:
        actor["num_gpus"] = r.num_gpus
    if r.memory:
        actor["memory"] = r.memory
    return {"max_ongoing_requests": spec.batching.ongoing,
            "max_queued_requests": spec.batching.max_queued_requests,
            "autoscaling_config": spec.autoscaling.to_serve(),
            "ray_actor_options": actor}


VLLM_IMPORT_PATH = "ray.serve.llm:build_openai_app"
"""Ray Serve LLM's OpenAI app builder (needs the `vllm` package on the replicas' nodes)."""


def _export_dir(spec: ServeSpec, checkpoint: str | None) -> str:
    try:
        return resolve_export(checkpoint or spec.checkpoint)
    except FileNotFoundError as e:
        raise ServeError(f"checkpoint: {e}") from None


def vllm_args(spec: ServeSpec, checkpoint: str | None = None) -> dict[str, Any]:
    """`build_openai_app` args (`{"llm_configs": [LLMConfig as a dict]}`) for `engine: vllm`.

    The export must be a Hugging Face folder (every raybig export is: GPT-2 layout for raybig's GPT).
    A local folder is the model source as is; an `s3://` or `gs://` export is mirrored by Ray Serve
    LLM (`bucket_uri`). The model id is the app name (as with engine: raybig); `batching.batch_size`
    becomes vLLM's `max_num_seqs` and `resources.num_gpus` its tensor-parallel size.
    Source: Ray Serve LLM's `LLMConfig` / `LLMServingArgs` (docs.ray.io, serve/llm).

    Raises:
        ServeError: no export at the checkpoint, not a Hugging Face layout, or a storage scheme
            vLLM cannot read.
    """
    from raybig import storage
    from raybig.train.export import export_format, read_config

    ex = _export_dir(spec, checkpoint)
    if export_format(read_config(ex)) != "hf":
        raise ServeError(f"checkpoint: {ex} is not a Hugging Face layout (config.json with architectures); "
                         "re-export it with `raybig export`")
    scheme = "file" if storage.is_local(ex) else ex.split("://", 1)[0]
    source: Any
    if scheme == "file":
        source = storage.normalize(ex)
    elif scheme in ("s3", "gs"):
        source = {"bucket_uri": ex}
    else:
        raise ServeError(f"checkpoint: engine: vllm reads local folders, s3:// or gs://, not {scheme}://")
    r, a = spec.resources, spec.autoscaling
    autoscaling = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                   "target_ongoing_requests": a.target_ongoing_requests,
                   "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    if a.initial_replicas is not None:
        autoscaling["initial_replicas"] = a.initial_replicas
    return {"llm_configs": [{
        "model_loading_config": {"model_id": spec.name, "model_source": source},
        "deployment_config": {"autoscaling_config": autoscaling,
                              "max_ongoing_requests": spec.batching.ongoing},
        "engine_kwargs": {"max_num_seqs": spec.batching.batch_size,
                          "tensor_parallel_size": int(r.num_gpus),
                          "max_model_len": spec.generation.max_prompt_tokens + spec.generation.max_new_tokens},
    }]}


def app_args(spec: ServeSpec, checkpoint: str | None = None) -> dict[str, Any]:
    """Builder args. Raises ServeError if the checkpoint has no export or the key env var is unset."""
    if spec.engine == "vllm":
        return vllm_args(spec, checkpoint)
    ckpt = _export_dir(spec, checkpoint)
    try:
        digest = api_key_digest(spec.api_key_env)
    except KeyError:
        raise ServeError(f"api_key_env: environment variable {spec.api_key_env} is not set") from None
    threads = spec.resources.torch_threads or max(1, int(spec.resources.num_cpus))
    return {"task": export_task(ckpt), "checkpoint": ckpt, "model_name": spec.name, "quantize": spec.quantize,
            "generation": spec.generation.model_dump(), "max_num_seqs": spec.batching.batch_size,
            "batching_mode": spec.batching.mode, "max_prefill_tokens": spec.batching.max_prefill_tokens,
            "batch_wait_timeout_s": spec.batching.batch_wait_timeout_s if spec.batching.enabled else 0.0,
            "torch_threads": threads, "api_key_sha256": digest, "deployment": deployment_options(spec),
            "max_inputs": spec.max_inputs}


def export_task(export_dir: str) -> str:
    """`classification` for a classifier export (served at /v1/predict), else `causal_lm`.

    Raises:
        ServeError: the export's config.json cannot be read.
    """
    from raybig.serve.predict import classifier_info
    from raybig.train.export import ExportError, read_config

    try:
        cfg = read_config(export_dir)
    except (ExportError, OSError, ValueError) as e:
        raise ServeError(f"checkpoint: {export_dir}: {e}") from None
    return "classification" if classifier_info(cfg) is not None else "causal_lm"


def deployment_name(args: dict[str, Any]) -> str:
    """The Serve deployment `build_app` makes for these args (the classifier's or the completions one)."""
    from raybig.serve.classify import CLASSIFIER_DEPLOYMENT

    return CLASSIFIER_DEPLOYMENT if args.get("task") == "classification" else DEPLOYMENT


def app_config(spec: ServeSpec, checkpoint: str | None = None) -> dict[str, Any]:
    """One entry of the config's `applications` list."""
    args = app_args(spec, checkpoint)
    if spec.engine == "vllm":  # Ray Serve LLM names and sizes its own deployments from llm_configs
        return {"name": spec.name, "route_prefix": spec.route_prefix, "import_path": VLLM_IMPORT_PATH,
                "args": args}
    return {"name": spec.name, "route_prefix": spec.route_prefix, "import_path": IMPORT_PATH,
            "args": args, "deployments": [{"name": deployment_name(args), **deployment_options(spec)}]}


def serve_config(spec: ServeSpec, checkpoint: str | None = None) -> dict[str, Any]:
    """The full declarative config (as `serve build` writes it) for this one app."""
    return {"proxy_location": "EveryNode", "http_options": {"host": spec.host, "port": spec.port},
            "applications": [app_config(spec, checkpoint)]}


def _client(address: str | None) -> Any:
    """Serve's REST client for the cluster `raybig.cluster.connect` resolves; ClusterError if unreachable."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    addr = resolve_address(address)
    # The dashboard wants Ray's token when the cluster has auth on; send it ourselves, since the SDK
    # only adds it when this process was started in token mode.
    try:
        return _Translated(ServeSubmissionClient(addr, headers=auth_headers() or None), addr)
    except Exception as e:  # noqa: BLE001 - connection refused, auth, version: one line for the user
        raise translate(e, addr) from None


class _Translated:
    """Wraps Serve's client so a failed call (unreachable, refused token) is one ClusterError line."""

    def __init__(self, client: Any, url: str):
        self._client, self.url = client, url

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._client, name)
        if not callable(fn):
            return fn

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise translate(e, self.url) from None
        return call


def _current(client: Any) -> dict[str, Any]:
    details = client.get_serve_details()
    apps = []
    for name, app in (details.get("applications") or {}).items():
        cfg = app.get("deployed_app_config")
        if cfg and app.get("status") != "DELETING":
            apps.append({**cfg, "name": name})
    return {"http_options": details.get("http_options"), "applications": apps}


def deploy_config(app: dict[str, Any], address: str | None = None,
                  http_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add or replace one app in the cluster's declarative Serve config, keeping the others."""
    client = _client(address)
    cur = _current(client)
    apps = [a for a in cur["applications"] if a["name"] != app["name"]]
    clash = [a["name"] for a in apps if a.get("route_prefix") == app["route_prefix"]]
    if clash:
        raise ServeError(f"route_prefix {app['route_prefix']!r} is already used by app {clash[0]!r}")
    http = {k: v for k, v in (cur.get("http_options") or http_options or {}).items()
            if k in ("host", "port")}
    config = {"http_options": http, "applications": [*apps, app]}
    client.deploy_applications(config)
    return config


def deploy(spec: ServeSpec, address: str | None = None, checkpoint: str | None = None) -> dict[str, Any]:
    """Deploy `spec` on the cluster behind the dashboard `address` (library entry for `raybig submit`)."""
    return deploy_config(app_config(spec, checkpoint), address, {"host": spec.host, "port": spec.port})


def delete_app(name: str | None, address: str | None = None) -> list[str]:
    """Remove one app (or all when name is None); returns the names removed."""
    client = _client(address)
    cur = _current(client)
    names = [a["name"] for a in cur["applications"]]
    if name is None:
        client.delete_applications()
        return names
    if name not in names:
        raise ServeError(f"no Serve application named {name!r} (running: {', '.join(names) or 'none'})")
    keep = [a for a in cur["applications"] if a["name"] != name]
    if keep:
        http = {k: v for k, v in (cur.get("http_options") or {}).items() if k in ("host", "port")}
        client.deploy_applications({"http_options": http, "applications": keep})
    else:
        client.delete_applications()
    return [name]


def status(address: str | None = None) -> dict[str, Any]:
    """Applications, their replicas by state, and autoscaling targets, as plain JSON."""
    details = _client(address).get_serve_details()
    http = details.get("http_options") or {}
    apps = {}
    for name, app in (details.get("applications") or {}).items():
        deps = {}
        for dname, d in (app.get("deployments") or {}).items():
            states: dict[str, int] = {}
            for r in d.get("replicas") or []:
                states[r["state"]] = states.get(r["state"], 0) + 1
            cfg = d.get("deployment_config") or {}
            auto = cfg.get("autoscaling_config") or {}
            deps[dname] = {"status": d.get("status"), "replicas": states,
                           "running": states.get("RUNNING", 0), "starting": states.get("STARTING", 0),
                           "target_replicas": d.get("target_num_replicas"),
                           "min_replicas": auto.get("min_replicas"), "max_replicas": auto.get("max_replicas"),
                           "target_ongoing_requests": auto.get("target_ongoing_requests"),
                           "max_ongoing_requests": cfg.get("max_ongoing_requests")}
        url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{app.get('route_prefix') or ''}"
        apps[name] = {"status": app.get("status"), "message": app.get("message") or "",
                      "route_prefix": app.get("route_prefix"), "url": url.rstrip("/") + "/v1",
                      "deployments": deps}
    return {"applications": apps}


def wait_running(name: str, address: str | None = None, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll until the app is RUNNING; raises ServeError on DEPLOY_FAILED or timeout."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = status(address)["applications"].get(name, {})
        st = last.get("status")
        if st == "RUNNING":
            return last
        if st in ("DEPLOY_FAILED", "UNHEALTHY"):
            msg = (last.get("message") or "").strip().splitlines()
            raise ServeError(f"app {name!r} {st}: {msg[-1] if msg else 'see the Serve logs'}")
        time.sleep(0.5)
    raise ServeError(f"app {name!r} not RUNNING after {timeout_s:.0f}s (last status {last.get('status')})")

"""Fault injection on serving: a Serve replica SIGKILLed under steady load.

What must hold: no request hangs (every one answers within the client timeout); every answer is a
200 or a 503 with an OpenAI-shaped JSON body (never a bare 500); and the deployment is back to its
2 RUNNING replicas within a bounded time, after which every request succeeds again.

The 503 shapes come from `raybig.serve.proxy_errors` (a middleware in Serve's HTTP proxy); its unit
tests here drive it with fake ASGI apps, no Ray needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from raybig.serve.proxy_errors import OpenAIErrorMiddleware

APP = "fault-kill"
CLIENT_TIMEOUT_S = 30.0
RECOVERY_LIMIT_S = 60.0


# --- the middleware, without Ray -------------------------------------------------------------------

def _drive(app: Any, path: str = "/x/v1/completions") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    asyncio.run(OpenAIErrorMiddleware(app)({"type": "http", "path": path}, receive, send))
    return sent


def _serve_backpressure(status: int = 503):
    """Mimics the proxy's own answer to BackPressureError (plain text, Retry-After)."""
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"2")]})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure "
                    b"(num_queued_requests=1, max_queued_requests=1)."})
    return app


async def _silent(scope, receive, send):  # the proxy after RayActorError: no response at all
    return None


@pytest.mark.unit
def test_middleware_rewrites_serve_503_and_fills_missing_response():
    start, body = _drive(_serve_backpressure())
    assert start["status"] == 503 and (b"retry-after", b"2") in start["headers"]
    assert (b"content-type", b"application/json") in start["headers"]
    err = json.loads(body["body"])["error"]
    assert err["code"] == "overloaded" and "backpressure" in err["message"] and err["type"]
    start, body = _drive(_silent)
    err = json.loads(body["body"])["error"]
    assert start["status"] == 503 and err["code"] == "replica_unavailable" and "Retry" in err["message"]
    assert (b"retry-after", b"1") in start["headers"]


@pytest.mark.unit
def test_middleware_ends_a_torn_event_stream_with_an_error_event():
    async def torn(scope, receive, send):  # the replica died after the first SSE chunk
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    msgs = _drive(torn)
    assert msgs[0]["status"] == 200 and not msgs[-1].get("more_body")
    assert msgs[-1]["body"].startswith(b"data: ") and msgs[-1]["body"].endswith(b"\n\n")
    assert json.loads(msgs[-1]["body"][6:])["error"]["code"] == "replica_unavailable"

    async def whole(scope, receive, send):  # a finished stream is left alone
        await torn(scope, receive, send)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    assert _drive(whole)[-1]["body"] == b"data: [DONE]\n\n"


@pytest.mark.unit
def test_middleware_passes_other_responses_and_health_routes():
    ok = _drive(_serve_backpressure(200))
    assert ok[0]["status"] == 200 and ok[1]["body"].startswith(b"Request dropped")
    health = _drive(_serve_backpressure(), path="/-/healthz")  # Serve's own routes: untouched
    assert health[0]["status"] == 503 and health[1]["body"].startswith(b"Request dropped")

    async def json503(scope, receive, send):  # our app's own JSON 503s pass through unchanged
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "m"}}'})
    assert _drive(json503)[1]["body"] == b'{"error": {"message": "m"}}'


# --- the fault drill on a real Serve -----------------------------------------------------------------

TOKENS = 96  # per request: long enough that the killed replica surely has requests in flight


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> str:
    """A random-weight gpt-debug export: serving needs weights, not a trained model (no Train run)."""
    import torch

    from raybig.model import GPT, GPTConfig
    from raybig.spec.models import PRESETS
    from raybig.train.export import write_export

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**{**PRESETS["gpt-debug"], "block_size": 256}))
    run = tmp_path_factory.mktemp("fault_export") / "run"
    return write_export(str(run), gpt.state_dict(), gpt.config.to_dict(), tied=GPT.tied_keys)


@pytest.fixture(scope="module")
def fault_app(ray_local, tiny_export):
    """2 fixed replicas of one app; yields (OpenAI base URL, dashboard address); removes the app."""
    import ray
    from ray import serve

    from raybig.cluster.ray_env import free_port
    from raybig.serve.deploy import delete_app, deploy, wait_running
    from raybig.spec import load_spec_text

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # no-op if Serve runs already
    url = ray_local.get("dashboard_url") or ray._private.worker.global_worker.node.address_info["webui_url"]
    dash = f"http://{url}"
    spec = load_spec_text(
        f"kind: serve\nname: {APP}\ncheckpoint: {tiny_export}\nroute_prefix: /{APP}\n"
        "resources: {num_cpus: 0.25}\nautoscaling: {min_replicas: 2, max_replicas: 2}\n"
        # Room for exactly the 4 load threads (2 x 2 ongoing) plus a queue of 4: no overload in
        # steady state nor with one replica down, and a burst of 24 overflows it (overload 503s).
        "batching: {max_batch_size: 2, max_ongoing_requests: 2, max_queued_requests: 4}\n"
        f"generation: {{max_tokens: {TOKENS}, max_new_tokens: {TOKENS}, max_prompt_tokens: 16}}\n")
    deploy(spec, dash)
    yield wait_running(APP, dash, timeout_s=180)["url"], dash
    delete_app(APP, dash)


def _replicas(dash: str) -> dict[str, str]:
    """replica_id -> state, from the same Serve details `raybig serve status` reads."""
    from raybig.serve.deploy import _client

    d = _client(dash).get_serve_details()["applications"][APP]["deployments"]["Completions"]
    return {r["replica_id"]: r["state"] for r in d["replicas"]}


def _replica_pids(dash: str) -> dict[str, int]:
    """Live replica actors of this app -> their worker PIDs (Ray's State API via the dashboard)."""
    from ray.util.state import list_actors

    actors = list_actors(address=dash, filters=[("state", "=", "ALIVE")], detail=True, limit=1000,
                         raise_on_missing_output=False)
    return {a.name: a.pid for a in actors if "ServeReplica" in a.class_name and APP in a.class_name}


Outcome = tuple[float, float, Any, str]  # (sent at, latency s, 200 | 503 | "sse_error" | failure, body)


def _one(s: requests.Session, url: str, stream: bool) -> tuple[Any, str]:
    body = {"prompt": "def ", "max_tokens": TOKENS, "temperature": 0, "stream": stream}
    try:
        r = s.post(url, json=body, timeout=CLIENT_TIMEOUT_S, stream=stream)
        text = r.text  # for a stream: reads it to the end (the read timeout still applies)
    except requests.RequestException as e:  # a timeout is a hung request; a torn stream lands here too
        return type(e).__name__, str(e)[:300]
    if r.status_code != 200:
        return r.status_code, text
    if not stream:
        return 200, ""
    last = [ln for ln in text.splitlines() if ln.startswith("data: ")][-1]
    if last == "data: [DONE]":
        return 200, ""
    return ("sse_error", last[6:]) if '"error"' in last else ("torn_stream", last[-300:])


class Load:
    """Steady closed-loop load: `n` threads posting back to back (the last one streams)."""

    def __init__(self, url: str, n: int = 4) -> None:
        self.url, self.n = f"{url}/completions", n
        self.stop = threading.Event()
        self.log: list[Outcome] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(n)

    def _client(self, stream: bool) -> None:
        s = requests.Session()
        while not self.stop.is_set():
            t0 = time.monotonic()
            code, body = _one(s, self.url, stream)
            with self._lock:
                self.log.append((t0, time.monotonic() - t0, code, body))

    def __enter__(self) -> Load:
        for i in range(self.n):
            self._pool.submit(self._client, i == self.n - 1)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._pool.shutdown(wait=True)


def _wait_recovered(dash: str, before: dict[str, str], t_kill: float) -> float | None:
    """Seconds from the kill until 2 replicas are RUNNING again and the victim is not among them."""
    while time.monotonic() - t_kill < RECOVERY_LIMIT_S + 30:
        running = {r for r, s in _replicas(dash).items() if s == "RUNNING"}
        if len(running) == 2 and running != set(before):
            return time.monotonic() - t_kill
        time.sleep(0.25)
    return None


def _figures(log: list[Outcome], t_kill: float, recovery_s: float) -> dict[str, Any]:
    codes = [e[2] for e in log]
    lat = [e[1] for e in log]
    return {"requests": len(log), "ok_200": codes.count(200), "unavailable_503": codes.count(503),
            "stream_error_events": codes.count("sse_error"),
            "other": len([c for c in codes if c not in (200, 503, "sse_error")]),
            "max_latency_s": round(max(lat), 2), "median_latency_s": round(statistics.median(lat), 3),
            "recovery_s": round(recovery_s, 1), "load_s": round(log[-1][0] - log[0][0], 1),
            "after_kill": len([e for e in log if e[0] >= t_kill])}


@pytest.mark.ray
@pytest.mark.slow
def test_replica_sigkill_under_load_no_hang_only_200_or_503_and_recovers(fault_app):
    url, dash = fault_app
    before = _replicas(dash)
    assert sorted(before.values()) == ["RUNNING", "RUNNING"], before
    pids = _replica_pids(dash)
    assert len(pids) == 2, pids
    with Load(url) as load:
        time.sleep(6)  # steady state first
        t_kill = time.monotonic()
        os.kill(sorted(pids.values())[0], signal.SIGKILL)
        recovery_s = _wait_recovered(dash, before, t_kill)
        assert recovery_s is not None, f"not back to 2 RUNNING replicas: {_replicas(dash)}"
        time.sleep(8)  # keep the load on: full strength again
    log, recovered_at = load.log, t_kill + recovery_s
    figures = _figures(log, t_kill, recovery_s)
    print(f"\n[fault-serve] {json.dumps(figures)}")
    bad = [e for e in log if e[2] not in (200, 503, "sse_error")]
    assert not bad, f"hung, torn or non-200/503 answers: {bad[:5]}; {figures}"
    died = 0
    for _, _, code, body in log:
        if code != 200:  # a clear, OpenAI-shaped reason, never Serve's bare text
            err = json.loads(body)["error"]
            assert err["message"] and err["type"] == "service_unavailable_error" and err["code"], body
            died += err["code"] == "replica_unavailable"
    assert died >= 1, f"the kill hit no request in flight: {figures}"  # else the drill proved little
    assert max(e[1] for e in log) < CLIENT_TIMEOUT_S
    assert all(e[2] == 200 for e in log if e[0] + e[1] < t_kill), "errors before the kill"
    assert any(e[2] == 200 for e in log if t_kill <= e[0] < recovered_at), "nothing served while down"
    tail = [e for e in log if e[0] >= recovered_at + 1.0]
    assert len(tail) >= 10 and all(e[2] == 200 for e in tail), tail[:5]
    assert recovery_s < RECOVERY_LIMIT_S, figures
    _check_overload_503s(url)
    _check_cli_status(dash)


def _check_overload_503s(url: str) -> None:
    """Overload on the recovered app: Serve's backpressure 503s come back as OpenAI JSON too."""
    def one(_: int) -> tuple[Any, str]:
        return _one(requests.Session(), f"{url}/completions", False)

    with ThreadPoolExecutor(24) as pool:
        burst = list(pool.map(one, range(24)))
    print(f"[fault-serve] burst of 24: {[c for c, _ in burst].count(503)} x 503")
    assert {c for c, _ in burst} <= {200, 503} and any(c == 503 for c, _ in burst), burst
    assert all(json.loads(b)["error"]["code"] == "overloaded" for c, b in burst if c == 503), burst


def _check_cli_status(dash: str) -> None:
    from click.testing import CliRunner

    from raybig.cli import main

    res = CliRunner().invoke(main, ["serve", "status", "--address", dash, "--json"])
    assert res.exit_code == 0, res.output
    dep = json.loads(res.output)["applications"][APP]["deployments"]["Completions"]
    assert dep["running"] == 2 and dep["status"] == "HEALTHY", dep

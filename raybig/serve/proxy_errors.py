"""OpenAI-shaped 503s from Serve's HTTP proxy (overload and dead replicas).

Why this lives in the proxy: two failures never reach our FastAPI ingress, so `app.py` cannot
shape them.
- Overload: Serve's router refuses a request past `max_queued_requests` and the proxy answers
  503 with a plain-text body ("Request dropped due to backpressure ...").
- A replica killed with a request in flight: the proxy gets `RayActorError` and sends *no* response,
  so uvicorn falls back to a bare "500 Internal Server Error". The request was fine; the replica
  was not, and Serve restarts it: that is a 503 (retry), not a 500. A stream already under way
  (status 200 sent) was simply cut ("Response ended prematurely"); it now ends with an OpenAI
  `data: {"error": ...}` event, which the `openai` client raises as an APIError.

Serve loads proxy middlewares from the import path in `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`,
read by the proxy process, to `raybig.serve.proxy_errors:middlewares` for the clusters raybig starts
itself (`raybig.cluster.ray_env.ensure_ray`, `raybig.cluster.local`). On other clusters put it in the
environment of `ray start`. Health routes (`/-/...`) and every other response pass through as is.
"""

from __future__ import annotations

import json
from typing import Any

RETRY_AFTER_S = 1

Message = dict[str, Any]


def error_body(message: str, code: str) -> bytes:
    """An OpenAI error body (JSON bytes) of type `service_unavailable_error` with `code`.

    Same shape as `raybig.serve.schema.ApiError.body()`, not imported: the proxy needs no torch/pydantic.
    """
    return json.dumps({"error": {"message": message, "type": "service_unavailable_error",
                                 "param": None, "code": code}}).encode()


def _start(status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> Message:
    hs = [(k, v) for k, v in (headers or []) if k.lower() not in (b"content-type", b"content-length")]
    if not any(k.lower() == b"retry-after" for k, _ in hs):
        hs.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    hs += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {"type": "http.response.start", "status": status, "headers": hs}


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(k.lower() == b"content-type" and b"json" in v.lower() for k, v in headers)


DIED = ("The model replica handling this request stopped before answering (Serve restarts it). "
        "Retry the request.")


class OpenAIErrorMiddleware:
    """Pure ASGI middleware that gives the proxy's own failures OpenAI-shaped bodies.

    It rewrites Serve's plain-text 503s, turns "no response at all" into a 503, and ends an event
    stream cut off by a dead replica with an OpenAI `error` event (not a torn stream).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """ASGI entry point: pass the request to the app, reshaping its response as above."""
        if scope.get("type") != "http" or str(scope.get("path", "")).startswith("/-/"):
            await self.app(scope, receive, send)
            return
        st: dict[str, Any] = {"started": False, "sse": False, "open": False, "held": None, "chunks": []}

        async def wrapped(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                hs = list(msg.get("headers") or [])
                st.update(started=True, open=True, sse=any(
                    k.lower() == b"content-type" and b"text/event-stream" in v.lower() for k, v in hs))
                if msg.get("status") == 503 and not _is_json(hs):
                    st["held"] = msg  # Serve's plain-text 503: held until its body is read
                    return
            elif msg["type"] == "http.response.body":
                st["open"] = bool(msg.get("more_body"))
                if st["held"] is not None:
                    await self._rewrite_503(st, msg, send)
                    return
            await send(msg)

        await self.app(scope, receive, wrapped)
        if st["held"] is not None:  # a 503 start whose body never came
            await wrapped({"type": "http.response.body", "body": b""})
        if not st["started"]:  # the proxy gave up without answering (RayActorError: the replica died)
            body = error_body(DIED, "replica_unavailable")
            await send(_start(503, body))
            await send({"type": "http.response.body", "body": body})
        elif st["sse"] and st["open"]:  # a stream torn mid-way: say why, then end it cleanly
            event = b"data: " + error_body(DIED, "replica_unavailable") + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": False})

    @staticmethod
    async def _rewrite_503(st: dict[str, Any], msg: Message, send: Any) -> None:
        st["chunks"].append(msg.get("body", b""))
        if msg.get("more_body"):
            return
        text = b"".join(st["chunks"]).decode(errors="replace").strip() or "Service unavailable."
        code = "overloaded" if "backpressure" in text else "service_unavailable"
        body = error_body(f"{text} Retry after a short wait.", code)
        start, st["held"] = st["held"], None
        await send(_start(503, body, list(start.get("headers") or [])))
        await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Any]:
    """Serve's HTTP proxy callback: the middlewares to wrap the proxy app in."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrorMiddleware)]

"""The client side of cluster submission: address resolution, token auth and one-line errors.

Everything here talks to the cluster only through the Ray Jobs HTTP API (`JobSubmissionClient`),
so a laptop needs no Ray processes of its own. Errors a user can act on become `ClusterError`
(one line, non-zero exit) instead of Ray's multi-line tracebacks.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

EXIT_CLUSTER = 3  # cluster unreachable / auth failed / unknown job


class ClusterError(Exception):
    """A cluster-side problem the user can act on; printed as one line."""

    def __init__(self, message: str, code: int = EXIT_CLUSTER):
        super().__init__(message)
        self.code = code


def default_file() -> pathlib.Path:
    return pathlib.Path(os.environ.get("RAYBIG_HOME", str(pathlib.Path.home() / ".raybig"))) / "address"


def save_default_address(address: str) -> None:
    """Remembered by `raybig cluster up` so later commands need no --address."""
    f = default_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(address.strip() + "\n")


def resolve_address(address: str | None) -> str:
    """--address, then RAY_ADDRESS, then the saved default; as an http:// dashboard URL."""
    addr = address or os.environ.get("RAY_ADDRESS")
    if not addr and default_file().exists():
        addr = default_file().read_text().strip()
    if not addr:
        raise ClusterError("no cluster address: pass --address http://HOST:8265, set RAY_ADDRESS, "
                           "or start one with `raybig cluster up`")
    if addr in ("auto", "local") or addr.startswith("ray://"):
        raise ClusterError(f"address {addr!r} is not a Jobs API URL; use the dashboard URL, "
                           "e.g. http://127.0.0.1:8265")
    if "://" not in addr:
        addr = "http://" + addr
    return addr.rstrip("/")


def read_token() -> str | None:
    """The token Ray's own CLI would use: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    p = pathlib.Path(path).expanduser() if path else pathlib.Path.home() / ".ray" / "auth_token"
    try:
        tok = p.read_text().strip()
    except OSError:
        return None
    return tok or None


def auth_headers() -> dict[str, str]:
    tok = read_token()
    return {"Authorization": f"Bearer {tok}"} if tok else {}


def translate(err: BaseException, address: str) -> ClusterError:
    """Map Ray/HTTP failures to one actionable line (never the raw multi-line text)."""
    text = str(err)
    low = text.lower()
    if "missing authentication token" in low or "401" in text and "unauthorized" in low:
        return ClusterError(f"{address} requires a Ray auth token and none was found: set RAY_AUTH_TOKEN "
                            "or RAY_AUTH_TOKEN_PATH, or copy the head's ~/.ray/auth_token")
    if "invalid authentication token" in low or "403" in text and "forbidden" in low:
        return ClusterError(f"{address} rejected the Ray auth token (wrong token); check RAY_AUTH_TOKEN / "
                            "RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token")
    if "request entity too large" in low or "413" in text:
        return ClusterError("the working directory is too large to upload; add excludes (.gitignore) or "
                            "move data to storage (s3://, gs://)")
    if any(s in low for s in ("failed to connect", "connection refused", "cannot connect", "max retries",
                              "name or service not known", "timed out", "connecterror")):
        return ClusterError(f"cannot reach a Ray cluster at {address}: is it running? "
                            "(raybig cluster status, --address, RAY_ADDRESS)")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return ClusterError(f"{address}: {first[:300]}")


def connect(address: str | None = None) -> tuple[Any, str]:
    """A JobSubmissionClient for the resolved address, with the token header when one exists."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given;
    # --address must win, so hide them while the client resolves its URL.
    hidden = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        return JobSubmissionClient(url, headers=auth_headers()), url
    except Exception as e:  # noqa: BLE001 - any failure to attach is one line for the user
        raise translate(e, url) from None
    finally:
        os.environ.update(hidden)


def call(url: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one client call, translating errors; an unknown job id becomes its own message."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        low = str(e).lower()
        if "does not exist" in low or "not found" in low and "job" in low:
            job = args[0] if args else kwargs.get("job_id", "?")
            raise ClusterError(f"no job {job!r} on {url} (see `raybig list --all`)") from None
        raise translate(e, url) from None

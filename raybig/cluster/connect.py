"""How every raybig command finds the cluster: one address order, one token reader, one `RAYBIG_HOME`.

Address order (the same for `submit`, `status`, `logs`, `stop`, `list`, `queue`, `serve status|down`):
  1. `--address URL`
  2. `RAY_ADDRESS`
  3. the address `raybig cluster up` saved (`$RAYBIG_HOME/address`)
  4. the dashboard of a `raybig run serve.yaml` still running on this machine (`$RAYBIG_HOME/serve_local.json`)
The result is the Ray dashboard URL (`http://HOST:8265`), which serves both the Jobs API and Serve's
REST API.

Token order (what Ray's own CLI reads): `RAY_AUTH_TOKEN`, then the file `RAY_AUTH_TOKEN_PATH`, then
`~/.ray/auth_token`.

Every file raybig keeps between commands lives under `RAYBIG_HOME` (default `~/.raybig`): the saved
address, the local cluster's state folder, and the local serve server's state file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib

from raybig.errors import ClusterError, first_line

NO_ADDRESS = ("no cluster address: pass --address http://HOST:8265, set RAY_ADDRESS, "
              "or start one with `raybig cluster up`")


def raybig_home() -> pathlib.Path:
    """The folder for raybig's saved state: `$RAYBIG_HOME`, default `~/.raybig` (not created here)."""
    return pathlib.Path(os.environ.get("RAYBIG_HOME") or pathlib.Path.home() / ".raybig").expanduser()


def address_file() -> pathlib.Path:
    """Where `raybig cluster up` saves its dashboard URL."""
    return raybig_home() / "address"


def local_cluster_dir() -> pathlib.Path:
    """State and logs of the cluster `raybig cluster up` starts (`cluster.json`, `*.log`)."""
    return raybig_home() / "cluster"


def serve_state_file() -> pathlib.Path:
    """Written by an embedded `raybig run serve.yaml`: its dashboard URL and PID."""
    return raybig_home() / "serve_local.json"


def save_address(address: str) -> None:
    """Remember `address` (a dashboard URL) so later commands need no --address."""
    f = address_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(address.strip() + "\n")


def saved_address() -> str | None:
    """The address `raybig cluster up` saved, or None."""
    try:
        return address_file().read_text().strip() or None
    except OSError:
        return None


def save_serve_state(dashboard: str, app: str) -> None:
    """Record the dashboard of this process's embedded Serve (removed by `clear_serve_state`)."""
    f = serve_state_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"dashboard": normalize(dashboard), "pid": os.getpid(), "app": app}))


def clear_serve_state() -> None:
    """Forget the embedded Serve state if this process wrote it."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if json.loads(serve_state_file().read_text()).get("pid") == os.getpid():
            serve_state_file().unlink()


def local_serve_address() -> str | None:
    """The dashboard of a `raybig run serve.yaml` still running here (its PID alive), or None."""
    try:
        st = json.loads(serve_state_file().read_text())
        os.kill(int(st["pid"]), 0)
        return str(st["dashboard"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def normalize(address: str) -> str:
    """`HOST:PORT` -> `http://HOST:PORT`, without a trailing slash."""
    address = address.strip()
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def resolve_address(address: str | None = None) -> str:
    """The dashboard URL to talk to, by the order in this module's docstring.

    Args:
        address: `--address` as given (`http://HOST:PORT` or `HOST:PORT`), or None.

    Returns:
        `http://HOST:PORT` (no trailing slash).

    Raises:
        ClusterError: nothing found, or an address that is not a dashboard URL (`auto`, `ray://...`).
    """
    addr = address or os.environ.get("RAY_ADDRESS") or saved_address() or local_serve_address()
    if not addr:
        raise ClusterError(NO_ADDRESS)
    if addr in ("auto", "local") or addr.startswith("ray://"):
        raise ClusterError(f"address {addr!r} is not a Jobs API URL; use the dashboard URL, "
                           "e.g. http://127.0.0.1:8265")
    return normalize(addr)


def token_path() -> pathlib.Path:
    """The token file Ray reads: `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return pathlib.Path(path).expanduser() if path else pathlib.Path.home() / ".ray" / "auth_token"


def read_token() -> str | None:
    """Ray's auth token: `RAY_AUTH_TOKEN`, else the file at `token_path()`; None when there is none."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok
    try:
        return token_path().read_text().strip() or None
    except OSError:
        return None


def auth_headers() -> dict[str, str]:
    """`{"Authorization": "Bearer <token>"}` when a token exists, else `{}`."""
    tok = read_token()
    return {"Authorization": f"Bearer {tok}"} if tok else {}


def translate(err: BaseException, address: str) -> ClusterError:
    """Map a Ray/HTTP failure talking to `address` to one actionable line (exit 3)."""
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
    return ClusterError(f"{address}: {first_line(err)[:300]}")


"""The Ray Jobs API client, found through `raybig.cluster.connect`, with one-line errors.

Everything here talks to the cluster only through the Ray Jobs HTTP API (`JobSubmissionClient`),
so a laptop needs no Ray processes of its own. Errors a user can act on become
`raybig.errors.ClusterError` (one line, exit 3) instead of Ray's multi-line tracebacks.
"""

from __future__ import annotations

import os
from typing import Any

from raybig.cluster.connect import auth_headers, resolve_address, translate
from raybig.errors import ClusterError


def connect(address: str | None = None) -> tuple[Any, str]:
    """A JobSubmissionClient for the resolved address, with the token header when one exists.

    Args:
        address: `--address`, or None for the order in `raybig.cluster.connect`.

    Returns:
        (client, dashboard URL).

    Raises:
        ClusterError: no address, unreachable, or the token is missing/refused.
    """
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
    """Run one client call, translating errors; an unknown job id becomes its own message.

    Raises:
        ClusterError: any failure, as one line.
    """
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        low = str(e).lower()
        if "does not exist" in low or "not found" in low and "job" in low:
            job = args[0] if args else kwargs.get("job_id", "?")
            raise ClusterError(f"no job {job!r} on {url} (see `raybig list --all`)") from None
        raise translate(e, url) from None

"""Scheduler settings set and read from the command line, not only from the environment.

Per-user quotas (`raybig queue quota`) and preemption (`raybig queue preemption`).

The scheduler caps each user's admitted demand by `RAYBIG_QUOTAS` from the head's environment,
overridden per user by the quotas stored in the cluster's GCS key-value store
(`raybig.scheduler.service.QUOTA_KEY`), which it reads every tick. `set_quota` changes the stored
ones through the Jobs API alone, as every other cluster command does: it runs this module as a
short plain Ray job (not a raybig job: the scheduler does not queue it) that writes the key, and
waits for it. Reading needs no job: the scheduler's board carries the quotas in force and each
user's admitted usage. Preemption settings (`raybig.scheduler.service.env_preemption`: on/off, the
minimum priority gap, the grace a victim has to checkpoint) go the same way, under
`raybig.scheduler.service.PREEMPT_KEY`, each key overriding the head's environment.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from typing import Any

from raybig.errors import ClusterError, UsageError

ENV = "RAYBIG_QUOTA_UPDATE"  # the update the job applies: {"user": ..., "caps": {...} | null}
PREEMPT_ENV = "RAYBIG_PREEMPTION_UPDATE"  # or this one: {"enabled"?: bool, "min_gap"?: int, "grace_s"?: float}


def parse_preemption(enabled: bool | None, min_gap: str | None, grace_s: str | None) -> dict[str, Any]:
    """The preemption settings to store, from the CLI's options (only those given).

    Raises:
        UsageError: a gap that is not an integer >= 1, a grace that is not a finite number > 0, or
            nothing to set (exit 2).
    """
    update: dict[str, Any] = {}
    if enabled is not None:
        update["enabled"] = enabled
    if min_gap is not None:
        try:
            gap = int(min_gap)
        except ValueError:
            raise UsageError(f"--min-gap {min_gap!r}: expected a whole number of priority levels >= 1") from None
        if gap < 1:
            raise UsageError(f"--min-gap {min_gap!r}: must be >= 1 (a job never preempts its own priority)")
        update["min_gap"] = gap
    if grace_s is not None:
        try:
            g = float(grace_s)
        except ValueError:
            raise UsageError(f"--grace-s {grace_s!r}: expected seconds, e.g. 120") from None
        if not math.isfinite(g) or g <= 0:
            raise UsageError(f"--grace-s {grace_s!r}: must be a finite number of seconds > 0")
        update["grace_s"] = g
    if not update:
        raise UsageError("give --on/--off, --min-gap or --grace-s (or no option to read the settings)")
    return update


def set_preemption(update: dict[str, Any], address: str | None = None, timeout_s: float = 120) -> None:
    """Store preemption settings on the cluster (merged key by key); returns once the cluster has them.

    Raises:
        ClusterError: unreachable cluster, or the update job did not succeed (exit 3).
    """
    _run_update({PREEMPT_ENV: json.dumps(update)}, address, timeout_s, what="preemption update")


def read_preemption(address: str | None = None) -> dict[str, Any] | None:
    """`{"settings": {...}, "preemptions": N}` in force, from the scheduler's board, or None."""
    from raybig.cluster.jobs import connect
    from raybig.scheduler.client import fetch_board

    client, url = connect(address)
    board = fetch_board(client, url)
    if board is None:
        return None
    return {"settings": board.get("preemption") or {}, "preemptions": int(board.get("preemptions") or 0)}


def parse_caps(items: tuple[str, ...] | list[str]) -> dict[str, float]:
    """`("CPU=16", "GPU=4", "memory=64GiB")` -> caps; memory-like amounts may carry a unit.

    Raises:
        UsageError: a malformed item, an unknown unit, or a negative or non-finite amount (exit 2).
    """
    units = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
    caps: dict[str, float] = {}
    for item in items:
        name, eq, amount = item.partition("=")
        if not eq or not name.strip() or not amount.strip():
            raise UsageError(f"quota {item!r}: expected RESOURCE=AMOUNT, e.g. CPU=16 GPU=4 memory=64GiB")
        text = amount.strip()
        num = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
        unit = text[len(num):].lower()
        try:
            value = float(num) * units[unit]
        except (ValueError, KeyError):
            raise UsageError(f"quota {item!r}: {amount!r} is not an amount (a number, memory may end in "
                             "GiB/MiB/GB...)") from None
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"quota {item!r}: the amount must be a finite number >= 0")
        caps[name.strip()] = value
    if not caps:
        raise UsageError("give at least one RESOURCE=AMOUNT (or --clear)")
    return caps


def set_quota(user: str, caps: dict[str, float] | None, address: str | None = None,
              timeout_s: float = 120) -> None:
    """Store `user`'s quota on the cluster (None clears it); returns once the cluster has it.

    Raises:
        ClusterError: unreachable cluster, or the update job did not succeed (exit 3).
    """
    _run_update({ENV: json.dumps({"user": user, "caps": caps})}, address, timeout_s, what="quota update")


def _run_update(env: dict[str, str], address: str | None, timeout_s: float, what: str) -> None:
    """Run this module as a short plain Ray job with `env`, and wait for it to succeed."""
    from ray.job_submission import JobStatus

    from raybig.cluster.jobs import call, connect
    from raybig.scheduler.client import entrypoint

    client, url = connect(address)
    job_id = f"raybig-quota-{uuid.uuid4().hex[:8]}"
    call(url, client.submit_job, entrypoint=entrypoint(None).replace("raybig.entrypoint", "raybig.scheduler.quota"),
         submission_id=job_id, runtime_env={"env_vars": env}, entrypoint_num_cpus=0)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = JobStatus(call(url, client.get_job_status, job_id))
        if status.is_terminal():
            if status is JobStatus.SUCCEEDED:
                return
            tail = (call(url, client.get_job_logs, job_id) or "").strip().splitlines()[-1:]
            raise ClusterError(f"the {what} ({job_id}) ended {status.value}: {' '.join(tail) or 'no log'}")
        time.sleep(0.5)
    raise ClusterError(f"the {what} ({job_id}) did not finish within {timeout_s:.0f} s")


def read_quotas(address: str | None = None) -> dict[str, Any] | None:
    """`{"quotas": {user: caps}, "usage": {user: admitted totals}}` from the scheduler's board, or None."""
    from raybig.cluster.jobs import connect
    from raybig.scheduler.client import fetch_board

    client, url = connect(address)
    board = fetch_board(client, url)
    if board is None:
        return None
    return {"quotas": board.get("quotas") or {}, "usage": board.get("usage") or {}}


def main() -> int:
    """The update job: apply `RAYBIG_QUOTA_UPDATE` (or `RAYBIG_PREEMPTION_UPDATE`) on the cluster."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_put

    from raybig.scheduler.meta import NAMESPACE
    from raybig.scheduler.service import PREEMPT_KEY, QUOTA_KEY, stored_preemption, stored_quotas

    ray.init(log_to_driver=False)
    if PREEMPT_ENV in os.environ:
        settings = {**stored_preemption(), **json.loads(os.environ[PREEMPT_ENV])}
        _internal_kv_put(PREEMPT_KEY, json.dumps(settings), overwrite=True, namespace=NAMESPACE)
        print(f"[raybig] preemption settings: {settings}", flush=True)
        return 0
    update = json.loads(os.environ[ENV])
    quotas = stored_quotas()
    quotas[str(update["user"])] = update["caps"]
    _internal_kv_put(QUOTA_KEY, json.dumps(quotas), overwrite=True, namespace=NAMESPACE)
    print(f"[raybig] quota of {update['user']!r}: {update['caps'] if update['caps'] is not None else 'cleared'}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-user quotas set and read from the command line (`raybig queue quota`), not only from the environment.

The scheduler caps each user's admitted demand by `RAYBIG_QUOTAS` from the head's environment,
overridden per user by the quotas stored in the cluster's GCS key-value store
(`raybig.scheduler.service.QUOTA_KEY`), which it reads every tick. `set_quota` changes the stored
ones through the Jobs API alone, as every other cluster command does: it runs this module as a
short plain Ray job (not a raybig job: the scheduler does not queue it) that writes the key, and
waits for it. Reading needs no job: the scheduler's board carries the quotas in force and each
user's admitted usage.
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
    from ray.job_submission import JobStatus

    from raybig.cluster.jobs import call, connect
    from raybig.scheduler.client import entrypoint

    client, url = connect(address)
    job_id = f"raybig-quota-{uuid.uuid4().hex[:8]}"
    update = json.dumps({"user": user, "caps": caps})
    call(url, client.submit_job, entrypoint=entrypoint(None).replace("raybig.entrypoint", "raybig.scheduler.quota"),
         submission_id=job_id, runtime_env={"env_vars": {ENV: update}}, entrypoint_num_cpus=0)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = JobStatus(call(url, client.get_job_status, job_id))
        if status.is_terminal():
            if status is JobStatus.SUCCEEDED:
                return
            tail = (call(url, client.get_job_logs, job_id) or "").strip().splitlines()[-1:]
            raise ClusterError(f"the quota update ({job_id}) ended {status.value}: {' '.join(tail) or 'no log'}")
        time.sleep(0.5)
    raise ClusterError(f"the quota update ({job_id}) did not finish within {timeout_s:.0f} s")


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
    """The update job: apply `RAYBIG_QUOTA_UPDATE` to the stored quotas (on the cluster)."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_put

    from raybig.scheduler.meta import NAMESPACE
    from raybig.scheduler.service import QUOTA_KEY, stored_quotas

    update = json.loads(os.environ[ENV])
    ray.init(log_to_driver=False)
    quotas = stored_quotas()
    quotas[str(update["user"])] = update["caps"]
    _internal_kv_put(QUOTA_KEY, json.dumps(quotas), overwrite=True, namespace=NAMESPACE)
    print(f"[raybig] quota of {update['user']!r}: {update['caps'] if update['caps'] is not None else 'cleared'}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

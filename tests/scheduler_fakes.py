"""Fakes the scheduler's unit tests share: a holder's job metadata and a Jobs API list_jobs row."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from raybig.scheduler.policy import Demand


def job_metadata(i: int) -> dict[str, str]:
    """The metadata `raybig submit` puts on queued job `j{i}` (2 workers of 1 CPU, priority i % 3)."""
    return {"raybig": "1", "raybig_kind": "train", "raybig_name": f"j{i}", "raybig_priority": str(i % 3),
            "raybig_max_retries": "0", "raybig_user": "u", "raybig_submitted_at": f"{1000.0 + i:.6f}",
            "raybig_spec_hash": "abc", "raybig_demand": json.dumps(Demand.of(2, {"CPU": 1.0}, {"CPU": 0.5})
                                                                    .to_json(), separators=(",", ":"))}


class JobDetails:
    """What the Jobs API's list_jobs returns per job (the fields the client reads)."""

    def __init__(self, sid: str, status: str, md: dict[str, str] | None, message: str = ""):
        self.submission_id = self.job_id = sid
        self.status, self.metadata, self.message = status, md, message
        self.entrypoint, self.start_time = "python -m raybig.entrypoint", 0


@contextlib.contextmanager
def attached_local_cluster(d: pathlib.Path, env: dict[str, str]) -> Iterator[Any]:
    """A real `LocalCluster` (head only, 3 CPUs) under `d`, with this process's env pointing at it.

    `RAY_AUTH_TOKEN_PATH` and `RAYBIG_HOME` name the cluster's token and a home under `d` while it
    is up; the cluster goes down and the previous values come back after.
    """
    from raybig.cluster.local import LocalCluster

    c = LocalCluster(dir=str(d / "c"), workers=0, head_cpus=3, env=env)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN_PATH", "RAYBIG_HOME", "RAY_AUTH_TOKEN")}
    try:
        c.up()
        os.environ["RAY_AUTH_TOKEN_PATH"] = c.token_path
        os.environ["RAYBIG_HOME"] = str(d / "home")
        os.environ.pop("RAY_AUTH_TOKEN", None)
        c.tmp = d  # type: ignore[attr-defined]
        yield c
    finally:
        c.down()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

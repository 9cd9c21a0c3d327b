"""Fakes the scheduler's unit tests share: a holder's job metadata and a Jobs API list_jobs row."""

from __future__ import annotations

import json

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

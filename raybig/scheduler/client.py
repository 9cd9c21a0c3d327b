"""Client-side library behind `raybig submit/status/logs/stop/list/queue` (Jobs API only)."""

from __future__ import annotations

import base64
import fnmatch
import getpass
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from raybig.cluster.jobs import ClusterError, call, connect, translate
from raybig.scheduler.meta import is_raybig, last_state, metadata_for
from raybig.scheduler.policy import JobState

# Never ship these in a working_dir: VCS, envs, run outputs, weights and data.
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", "runs", "*.safetensors", "*.pt", "*.bin",
            "*.ckpt", "*.npy", "*.parquet", ".mypy_cache", ".pytest_cache", "node_modules", "wandb"]


def upload_limit() -> int:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return int(os.environ.get("RAYBIG_MAX_UPLOAD_BYTES", GCS_STORAGE_MAX_SIZE))


def _excluded(rel: str, excludes: list[str]) -> bool:
    parts = rel.split(os.sep)
    return any(fnmatch.fnmatch(p, pat) for p in parts for pat in excludes) or any(
        fnmatch.fnmatch(rel, pat) for pat in excludes)


def check_upload(workdir: str, excludes: list[str]) -> int:
    """Bytes that would be uploaded; a clear error past Ray's limit (not "Request Entity Too Large")."""
    total, biggest = 0, []
    for root, dirs, files in os.walk(workdir):
        dirs[:] = [d for d in dirs if not _excluded(os.path.relpath(os.path.join(root, d), workdir), excludes)]
        for f in files:
            p = os.path.join(root, f)
            rel = os.path.relpath(p, workdir)
            if _excluded(rel, excludes) or not os.path.isfile(p):
                continue
            n = os.path.getsize(p)
            total += n
            biggest.append((n, rel))
    limit = upload_limit()
    if total >= limit:
        top = ", ".join(f"{r} ({n / 2**20:.0f} MiB)" for n, r in sorted(biggest, reverse=True)[:3])
        raise ClusterError(f"working directory {workdir} is {total / 2**20:.0f} MiB, over Ray's upload limit of "
                           f"{limit / 2**20:.0f} MiB; largest: {top}. Move data/weights to storage or exclude them")
    return total


def entrypoint(python: str | None) -> str:
    """The job's command. By default it runs the Python environment of the Ray process that launches
    it (the job supervisor, $PPID): the environment root is found from where that process loaded
    `ray/_raylet.so` (venv, conda or system), so the head's PATH never picks the interpreter.
    (/proc/PID/exe would not do: a venv's python is a symlink to the base interpreter.)"""
    if python:
        return f"{python} -m raybig.entrypoint"
    return ("R=$(grep -m1 -o '/[^ ]*/ray/_raylet.so' /proc/$PPID/maps 2>/dev/null); "
            'PY="${R%/lib/python*}/bin/python"; [ -n "$R" ] && [ -x "$PY" ] || PY=$(command -v python3); '
            'exec "$PY" -m raybig.entrypoint')


def submit(spec: Any, spec_dir: str, address: str | None = None, python: str | None = None,
           user: str | None = None, retries: int = 8) -> tuple[str, str]:
    """Submit a validated spec; returns (job id, cluster URL)."""
    from raybig.spec import freeze, spec_hash

    client, url = connect(address)
    now = time.time()
    user = user or os.environ.get("RAYBIG_USER") or getpass.getuser()
    h = spec_hash(spec)
    job_id = f"raybig-{spec.name}-{uuid.uuid4().hex[:8]}"
    runtime_env: dict[str, Any] = {"env_vars": {
        "RAYBIG_JOB_ID": job_id,
        "RAYBIG_SPEC_B64": base64.b64encode(freeze(spec).encode()).decode(),
        "RAYBIG_SPEC_HASH": h,
        "RAYBIG_JOB_META": json.dumps({"submitted_at": now, "user": user}),
    }}
    if getattr(getattr(spec, "model", None), "target", None):
        # User plug-in modules travel with the job, minus large or irrelevant files.
        check_upload(spec_dir, EXCLUDES)
        runtime_env["working_dir"] = spec_dir
        runtime_env["excludes"] = EXCLUDES
    for attempt in range(retries):
        try:
            client.submit_job(entrypoint=entrypoint(python), submission_id=job_id, runtime_env=runtime_env,
                              metadata=metadata_for(spec, h, user, now), entrypoint_num_cpus=0)
            return job_id, url
        except Exception as e:  # noqa: BLE001
            # Right after `ray start` the job agent may not be up yet: retry that one with backoff.
            if "No available agent" in str(e) and attempt < retries - 1:
                time.sleep(min(0.5 * 2**attempt, 5))
                continue
            raise translate(e, url) from None
    raise ClusterError(f"{url}: no job agent became available")


@dataclass
class JobView:
    job_id: str
    name: str
    state: str
    priority: int
    submitted_at: float
    user: str = ""
    position: int | None = None
    reason: str = ""
    attempt: int | None = None
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    raybig: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _state_of(ray_status: str, holder: dict[str, Any] | None) -> str:
    if ray_status in ("SUCCEEDED", "FAILED", "STOPPED"):
        return ray_status
    if ray_status == "PENDING" or not holder:
        return JobState.PENDING.value
    s = holder.get("state", "QUEUED")
    return s if s in ("QUEUED", "RUNNING", "RETRYING") else JobState.RUNNING.value


def _view(client: Any, url: str, d: Any, with_logs: bool) -> JobView:
    md = d.metadata or {}
    status = str(getattr(d.status, "value", d.status))
    holder = None
    if with_logs:
        holder = last_state(call(url, client.get_job_logs, d.submission_id))
    v = JobView(job_id=d.submission_id or d.job_id, name=md.get("raybig_name", d.entrypoint[:40]),
                state=_state_of(status, holder), priority=int(md.get("raybig_priority", "0")),
                submitted_at=float(md.get("raybig_submitted_at", (d.start_time or 0) / 1000)),
                user=md.get("raybig_user", ""), raybig=is_raybig(md))
    if holder:
        v.reason = holder.get("reason", "") if v.state == "QUEUED" else ""
        v.attempt = holder.get("attempt")
        v.error = holder.get("error", "")
        v.metrics = holder.get("metrics", {})
    if status == "FAILED" and not v.error:
        v.error = (d.message or "").strip().splitlines()[0][:300] if d.message else ""
    return v


def list_views(address: str | None = None, include_all: bool = False) -> list[JobView]:
    client, url = connect(address)
    jobs = call(url, client.list_jobs)
    views = []
    for d in jobs:
        if not d.submission_id or (not include_all and not is_raybig(d.metadata)):
            continue
        status = str(getattr(d.status, "value", d.status))
        if not include_all and status in ("SUCCEEDED", "FAILED", "STOPPED"):
            continue
        views.append(_view(client, url, d, with_logs=is_raybig(d.metadata) and status == "RUNNING"))
    return _with_positions(views)


def _with_positions(views: list[JobView]) -> list[JobView]:
    """Queue positions computed from the job table's order (priority, then submission time)."""
    waiting = sorted((v for v in views if v.raybig and v.state in ("PENDING", "QUEUED")),
                     key=lambda v: (-v.priority, v.submitted_at, v.job_id))
    for i, v in enumerate(waiting):
        v.position = i + 1
    order = {"RUNNING": 0, "RETRYING": 1, "QUEUED": 2, "PENDING": 2}
    return sorted(views, key=lambda v: (order.get(v.state, 3), -v.priority if v.state != "SUCCEEDED" else 0,
                                        v.submitted_at))


def get_view(job_id: str, address: str | None = None) -> JobView:
    client, url = connect(address)
    d = call(url, client.get_job_info, job_id)
    v = _view(client, url, d, with_logs=True)
    if v.state in ("PENDING", "QUEUED"):
        for other in list_views(address):
            if other.job_id == job_id:
                v.position = other.position
    return v


def stop(job_id: str, address: str | None = None, wait_s: float = 30) -> str:
    """Stop a queued or running job; waits until Ray reports it ended (its workers are gone)."""
    client, url = connect(address)
    call(url, client.get_job_info, job_id)  # unknown id -> one-line error
    call(url, client.stop_job, job_id)
    deadline = time.time() + wait_s
    status = ""
    while time.time() < deadline:
        status = str(getattr(call(url, client.get_job_status, job_id), "value", ""))
        if status in ("STOPPED", "SUCCEEDED", "FAILED"):
            break
        time.sleep(0.3)
    return status


def logs(job_id: str, address: str | None = None) -> str:
    client, url = connect(address)
    return call(url, client.get_job_logs, job_id)


def follow(job_id: str, address: str | None = None, out: Any = None) -> str:
    """Stream logs until the job ends; returns its final Ray status."""
    import asyncio
    import sys

    client, url = connect(address)
    call(url, client.get_job_info, job_id)
    w = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            w.write(chunk)
            w.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001
        raise translate(e, url) from None
    return str(getattr(call(url, client.get_job_status, job_id), "value", ""))

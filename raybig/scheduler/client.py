"""Client-side library behind `raybig submit/status/logs/stop/list/queue` (Jobs API only)."""

from __future__ import annotations

import base64
import getpass
import json
import os
import pathlib
import re
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

import pathspec
from ray.job_submission import JobStatus

from raybig.cluster.connect import translate
from raybig.cluster.jobs import call, connect
from raybig.errors import ClusterError
from raybig.scheduler.meta import BOARD_FILE, is_raybig, last_state, metadata_for
from raybig.scheduler.policy import JobState

# Never ship these in a working_dir: VCS, envs, run outputs, weights and data (gitwildmatch, as Ray
# reads `excludes`: a bare name matches at any depth).
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.pyc", "runs", "*.safetensors", "*.pt", "*.bin",
            "*.ckpt", "*.npy", "*.parquet", ".mypy_cache", ".pytest_cache", "node_modules", "wandb"]


def upload_limit() -> int:
    """Ray's working_dir upload limit in bytes (RAYBIG_MAX_UPLOAD_BYTES overrides it)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return int(os.environ.get("RAYBIG_MAX_UPLOAD_BYTES", GCS_STORAGE_MAX_SIZE))


def _ignore_file_spec(folder: pathlib.Path) -> pathspec.PathSpec | None:
    """Patterns of the `.gitignore` / `.rayignore` in `folder`, or None.

    Ray honours both (.gitignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1).
    """
    names = [".rayignore"]
    if os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1":
        names.insert(0, ".gitignore")
    lines: list[str] = []
    for n in names:
        f = folder / n
        if f.is_file():
            lines += f.read_text(errors="replace").splitlines()
    return pathspec.PathSpec.from_lines("gitwildmatch", lines) if lines else None


def check_upload(workdir: str, excludes: list[str]) -> int:
    """Bytes Ray would upload as the job's working_dir; a clear error past Ray's limit.

    Mirrors Ray's packaging (`ray._private.runtime_env.packaging`): `excludes` are gitwildmatch
    patterns relative to `workdir`, and each folder's `.gitignore`/`.rayignore` applies below it.

    Raises:
        ClusterError: the total is at or over the upload limit (names the 3 largest files).
    """
    root = pathlib.Path(workdir).absolute()
    rules: list[tuple[pathlib.Path, pathspec.PathSpec]] = [
        (root, pathspec.PathSpec.from_lines("gitwildmatch", excludes))]
    total, biggest = 0, []

    def skipped(p: pathlib.Path) -> bool:
        return any(spec.match_file(str(p.relative_to(base))) for base, spec in rules)

    def walk(folder: pathlib.Path) -> None:
        nonlocal total
        own = _ignore_file_spec(folder)
        if own is not None:
            rules.append((folder, own))
        for p in sorted(folder.iterdir()):
            if skipped(p):
                continue
            if p.is_dir() and not p.is_symlink():
                walk(p)
            elif p.is_file():
                n = p.stat().st_size
                total += n
                biggest.append((n, str(p.relative_to(root))))
        if own is not None:
            rules.pop()

    walk(root)
    limit = upload_limit()
    if total >= limit:
        top = ", ".join(f"{r} ({n / 2**20:.0f} MiB)" for n, r in sorted(biggest, reverse=True)[:3])
        raise ClusterError(f"working directory {workdir} is {total / 2**20:.0f} MiB, over Ray's upload limit of "
                           f"{limit / 2**20:.0f} MiB; largest: {top}. Move data/weights to storage or exclude them")
    return total


def entrypoint(python: str | None) -> str:
    """The job's shell command.

    By default it runs the Python environment of the Ray process that launches it (the job
    supervisor, $PPID): the environment root is found from where that process loaded
    `ray/_raylet.so` (venv, conda or system), so the head's PATH never picks the interpreter.
    (/proc/PID/exe would not do: a venv's python is a symlink to the base interpreter.)
    """
    if python:
        return f"{python} -m raybig.entrypoint"
    return ("R=$(grep -m1 -o '/[^ ]*/ray/_raylet.so' /proc/$PPID/maps 2>/dev/null); "
            'PY="${R%/lib/python*}/bin/python"; [ -n "$R" ] && [ -x "$PY" ] || PY=$(command -v python3); '
            'exec "$PY" -m raybig.entrypoint')


def submit(spec: Any, spec_dir: str, address: str | None = None, python: str | None = None,
           user: str | None = None, retries: int = 8) -> tuple[str, str]:
    """Submit a validated spec; returns (job id, cluster URL).

    Relative local paths in the spec are made absolute against this process's working directory
    first (`raybig.spec.paths_resolve`): on the cluster they would name the job's own folder.
    """
    from raybig.spec import freeze, spec_hash
    from raybig.spec.paths_resolve import resolve_paths

    spec, _ = resolve_paths(spec)
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
    """One job as `raybig status/list/queue` show it.

    Attributes:
        state: the raybig lifecycle state (Ray's own status, refined by the holder's last state line).
        position: 1-based place among waiting jobs (None when not waiting).
        reason: why a queued (or preempted) job waits; for a running job being preempted, for whom.
        metrics: the latest train metrics the job reported (step, loss, ...).
        result: what the run returned when it SUCCEEDED (a train job: `TrainResult.to_json()`).
        workers: the size a worker range (`resources.workers: {min, max}`) runs at, when below its max.
        preempted: how many times the job yielded to a higher-priority job (each resumed from its
            checkpoint without spending a retry).
    """

    job_id: str
    name: str
    state: JobState
    priority: int
    submitted_at: float
    user: str = ""
    position: int | None = None
    reason: str = ""
    attempt: int | None = None
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    raybig: bool = True
    preempted: int = 0
    workers: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (`state` as its name)."""
        # Field by field: dataclasses.asdict deep-copies every value (seconds at 10,000 jobs).
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["state"] = self.state.value
        return d


# What a holder may say about a job Ray still runs; any other (or none yet) reads as RUNNING.
_HOLDER_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING, JobState.PREEMPTED)


def _state_of(ray_status: JobStatus, holder: dict[str, Any] | None) -> JobState:
    if ray_status.is_terminal():
        return JobState(ray_status.value)
    if ray_status is JobStatus.PENDING or not holder:
        return JobState.PENDING
    s = holder.get("state", JobState.QUEUED)
    return s if s in _HOLDER_STATES else JobState.RUNNING


def _status(d: Any) -> JobStatus:
    return JobStatus(getattr(d.status, "value", d.status))


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)(\([\w.]+\))?: ")
LOG_FETCHES = int(os.environ.get("RAYBIG_LOG_FETCHES", "16"))  # concurrent get_job_logs calls at most
LOG_FALLBACK_MAX = int(os.environ.get("RAYBIG_LOG_FALLBACK_MAX", "64"))  # log reads without a board, at most


def _view(client: Any, url: str, d: Any, with_logs: bool, logs: str | None = None,
          holder: dict[str, Any] | None = None) -> JobView:
    md = d.metadata or {}
    status = _status(d)
    if holder is None:  # not from the scheduler's board: the holder's log, or Ray's message
        if logs is None and with_logs:
            logs = call(url, client.get_job_logs, d.submission_id)
        if logs is not None:
            holder = last_state(logs)
        elif status is JobStatus.FAILED and is_raybig(md) and d.message:
            # Ray's message for a failed job ends with the last lines of its log (the holder's FAILED line).
            holder = last_state(d.message)
    v = JobView(job_id=d.submission_id or d.job_id, name=md.get("raybig_name", d.entrypoint[:40]),
                state=_state_of(status, holder), priority=int(md.get("raybig_priority", "0")),
                submitted_at=float(md.get("raybig_submitted_at", (d.start_time or 0) / 1000)),
                user=md.get("raybig_user", ""), raybig=is_raybig(md))
    if holder:
        v.reason = holder.get("reason", "") if v.state in (JobState.QUEUED, JobState.PREEMPTED) else ""
        v.preempted = int(holder.get("preempted") or 0)
        v.workers = holder.get("workers") if v.state is JobState.RUNNING else None
        if v.state is JobState.RUNNING and holder.get("reason"):  # a victim checkpointing before it yields
            v.reason = holder["reason"]
        v.attempt = holder.get("attempt")
        v.error = holder.get("error", "")
        v.metrics = holder.get("metrics", {})
        if v.state is JobState.SUCCEEDED and isinstance(holder.get("result"), dict):
            v.result = holder["result"]
    if holder and v.state in _WAITING and holder.get("position"):
        v.position = holder["position"]  # the scheduler's own position (list_views recomputes it)
    if status is JobStatus.FAILED and not v.error and d.message:
        # Ray's message ("Job entrypoint command failed ..., last available logs") ends with the log
        # tail: its last exception line (a holder that died before its FAILED line), else Ray's line.
        tail = [ln.strip() for ln in d.message.splitlines()[1:] if _EXC_LINE.match(ln)]
        v.error = (tail[-1] if tail else d.message.strip().partition("\n")[0])[:300]
    return v


def fetch_board(client: Any, url: str, timeout: float = 30) -> dict[str, Any] | None:
    """The scheduler's queue board (`raybig.scheduler.service.board`), or None where it cannot be read.

    Two requests to the dashboard whatever the queue's size: the head node's id (State API), then
    the board file from that node's Ray log folder (log API). None for a cluster without a scheduler
    yet, a dashboard without those APIs, or a client that is not Ray's (tests).
    """
    import requests

    from raybig.cluster.connect import auth_headers

    base = getattr(client, "_address", None)
    if not isinstance(base, str):
        return None
    headers = {**auth_headers(), **(getattr(client, "_headers", None) or {})}
    nodes = _get_json(client, "/api/v0/nodes", {"filter_keys": "is_head_node", "filter_predicates": "=",
                                                "filter_values": "True", "detail": "false", "limit": 10}, timeout)
    try:
        rows = nodes["data"]["result"]["result"]
        head = next((n.get("node_id") for n in rows if n.get("node_id")), None)
    except (TypeError, KeyError, AttributeError):
        return None
    if not head:
        return None
    try:
        q: dict[str, str | int] = {"node_id": str(head), "filename": BOARD_FILE, "lines": -1}
        r = requests.get(f"{base}/api/v0/logs/file", params=q, headers=headers, timeout=timeout)
        if r.status_code != 200:
            return None
        text = r.content.decode("utf-8", errors="replace")
        start = text.find("{")  # the log API may prefix a status byte
        board = json.loads(text[start:]) if start >= 0 else None
    except (requests.RequestException, ValueError, AttributeError, TypeError):
        return None
    return board if isinstance(board, dict) and isinstance(board.get("jobs"), dict) else None


def _get_json(client: Any, path: str, params: dict[str, str | int], timeout: float = 30) -> Any:
    """GET a dashboard JSON endpoint with the client's address and token; None on any failure."""
    import requests

    from raybig.cluster.connect import auth_headers

    base = getattr(client, "_address", None)
    if not isinstance(base, str):
        return None
    headers = {**auth_headers(), **(getattr(client, "_headers", None) or {})}
    try:
        r = requests.get(f"{base}{path}", params=params, headers=headers, timeout=timeout)
        return r.json() if r.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def node_totals(client: Any) -> list[dict[str, float]] | None:
    """Each alive node's total resources (State API through the dashboard), or None if unreadable."""
    data = _get_json(client, "/api/v0/nodes", {"detail": "true", "limit": 10_000})
    try:
        rows = data["data"]["result"]["result"]
        return [{str(k): float(v) for k, v in (n.get("resources_total") or {}).items()}
                for n in rows if n.get("state") == "ALIVE"]
    except (TypeError, KeyError, AttributeError, ValueError):
        return None


def cluster_nodes(address: str | None = None) -> list[dict[str, float]] | None:
    """Each alive node's total resources on the cluster at `address`, or None if unreadable."""
    client, _ = connect(address)
    return node_totals(client)


def never_fits(spec: Any, totals: list[dict[str, float]] | None) -> str | None:
    """Why `spec`'s gang can never fit nodes of these `totals`, or None (it fits, or they are unknown).

    A worker range is judged by its smallest gang (`resources.workers.min`).

    Totals, not what is free: a busy cluster is a reason to wait in the queue, not to warn.
    """
    from raybig.scheduler.meta import least_demand_of
    from raybig.scheduler.policy import missing_text, pack

    if not totals:
        return None
    bundles = least_demand_of(spec).as_dicts()  # a worker range: its smallest gang
    if pack(bundles, [dict(t) for t in totals]):
        return None
    return missing_text(bundles, totals)


def _from_board(entry: dict[str, Any]) -> dict[str, Any]:
    """A board entry in the shape of a holder's last state line (`meta.last_state`)."""
    h = dict(entry)
    try:
        h["state"] = JobState(h.get("state"))
    except ValueError:
        h["state"] = JobState.RUNNING
    return h


def views_of(jobs: list[Any], board: dict[str, Any] | None, include_all: bool = False,
             logs: dict[str, str] | None = None) -> list[JobView]:
    """Views of a job-table listing, each job's state and cause from the scheduler's board; O(jobs).

    Args:
        jobs: the Jobs API's `list_jobs()` rows.
        board: the scheduler's board (`fetch_board`), or None.
        include_all: keep ended and non-raybig jobs.
        logs: holder log texts for jobs the board does not cover (the fallback without a board).
    """
    entries = (board or {}).get("jobs", {})
    logs = logs or {}
    views = []
    for d in jobs:
        if not d.submission_id or (not include_all and not is_raybig(d.metadata)):
            continue
        status = _status(d)
        if not include_all and status.is_terminal():
            continue
        e = entries.get(d.submission_id)
        holder = None
        if e is not None and is_raybig(d.metadata):
            if status is JobStatus.RUNNING:
                holder = _from_board(e)
            elif status.is_terminal() and e.get("error"):
                holder = {"state": JobState(status.value), "error": e["error"]}
        if holder is not None:
            views.append(_view(None, "", d, with_logs=False, holder=holder))
        else:
            views.append(_view(None, "", d, with_logs=False, logs=logs.get(d.submission_id)))
    return _with_positions(views)


def _logs_of(client: Any, url: str, job_ids: list[str]) -> dict[str, str]:
    """Each job's log text, fetched concurrently (at most LOG_FETCHES calls in flight)."""
    if not job_ids:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(LOG_FETCHES, len(job_ids)))) as pool:
        texts = pool.map(lambda j: call(url, client.get_job_logs, j), job_ids)
        return dict(zip(job_ids, texts, strict=True))


def list_views(address: str | None = None, include_all: bool = False) -> list[JobView]:
    """Active raybig jobs in queue order (`include_all`: every job in Ray's table, ended ones too).

    One job-table listing plus the scheduler's board (`fetch_board`): each running holder's state,
    reason, position, progress and each ended job's cause come from what the scheduler recorded, with
    no log read per job. Only without a board (no scheduler yet, an older one) are the logs of at most
    `LOG_FALLBACK_MAX` running holders read instead; past that they show as RUNNING, reason unknown.

    Raises:
        ClusterError: the cluster cannot be reached or refused the token.
    """
    client, url = connect(address)
    jobs = call(url, client.list_jobs)
    board = fetch_board(client, url)
    logs: dict[str, str] = {}
    if board is None:
        need = [d.submission_id for d in jobs if d.submission_id and is_raybig(d.metadata)
                and _status(d) is JobStatus.RUNNING]
        if len(need) <= LOG_FALLBACK_MAX:
            logs = _logs_of(client, url, need)
    return views_of(jobs, board, include_all, logs)


_WAITING = (JobState.PENDING, JobState.QUEUED, JobState.PREEMPTED)
_ORDER = {JobState.RUNNING: 0, JobState.RETRYING: 1, JobState.QUEUED: 2, JobState.PENDING: 2, JobState.PREEMPTED: 2}


def _with_positions(views: list[JobView]) -> list[JobView]:
    """Queue positions computed from the job table's order (priority, then submission time)."""
    waiting = sorted((v for v in views if v.raybig and v.state in _WAITING),
                     key=lambda v: (-v.priority, v.submitted_at, v.job_id))
    for i, v in enumerate(waiting):
        v.position = i + 1
    return sorted(views, key=lambda v: (_ORDER.get(v.state, 3),
                                        -v.priority if v.state is not JobState.SUCCEEDED else 0,
                                        v.submitted_at))


def get_view(job_id: str, address: str | None = None) -> JobView:
    """One job's view, with its queue position when it waits.

    Raises:
        ClusterError: unreachable cluster, refused token, or no such job.
    """
    client, url = connect(address)
    d = call(url, client.get_job_info, job_id)
    v = _view(client, url, d, with_logs=True)
    if v.state in _WAITING and v.position is None:  # no holder line yet: place it by the job table
        for other in list_views(address):
            if other.job_id == job_id:
                v.position = other.position
    return v


def stop(job_id: str, address: str | None = None, wait_s: float = 30) -> JobState | None:
    """Stop a queued or running job; waits up to `wait_s` seconds until Ray reports it ended.

    Returns:
        The job's final state, or None if it had not ended within `wait_s`.

    Raises:
        ClusterError: unreachable cluster, refused token, or no such job.
    """
    client, url = connect(address)
    call(url, client.get_job_info, job_id)  # unknown id -> one-line error
    call(url, client.stop_job, job_id)
    deadline = time.time() + wait_s
    while time.time() < deadline:
        status = JobStatus(call(url, client.get_job_status, job_id))
        if status.is_terminal():
            return JobState(status.value)
        time.sleep(0.3)
    return None


def logs(job_id: str, address: str | None = None) -> str:
    """The job's whole log text so far."""
    client, url = connect(address)
    return call(url, client.get_job_logs, job_id)


def follow(job_id: str, address: str | None = None, out: Any = None) -> JobState:
    """Stream logs to `out` (default stdout) until the job ends; returns its final state."""
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
    return JobState(JobStatus(call(url, client.get_job_status, job_id)).value)

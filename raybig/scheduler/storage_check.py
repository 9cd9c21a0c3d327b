"""Is a job's local `storage.path` shared by every node of the cluster? Checked for real at `raybig submit`.

A multi-node job writes checkpoints from every rank and reads them back on whichever node resumes
it, so a plain local folder that only the head sees fails at the first checkpoint. Guessing from the
path's form cannot tell an NFS mount from a private disk, so `check_shared` asks the cluster: it
runs this module as a short plain Ray job (not a raybig job: nothing is queued) that, on the head,
writes a marker file with a random token under the path, then reads it back with a zero-CPU task
pinned to every other alive node, and prints what each node saw. The client refuses the submit
(exit 2) only on a positive finding, a node that ran and could not read the marker; when the check
itself cannot run (no agent, a timeout) it warns and lets the job go. Object-store URIs (`s3://`,
`gs://`, ...) are shared by construction and not checked; nor is a single-node cluster.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from raybig.errors import UsageError

ENV = "RAYBIG_STORAGE_CHECK"  # {"path": folder, "token": ...} for the check job
RESULT_PREFIX = "[raybig] storage-check "
NOT_RUN = "the read did not run"


@dataclass
class SharedCheck:
    """What the check job found: the head wrote the marker (or why not), and each other node's read."""

    path: str
    wrote: bool = True
    write_error: str = ""
    nodes: dict[str, str] = field(default_factory=dict)  # node ip (id) -> "ok" or what went wrong

    def problem(self, what: str = "storage.path") -> str | None:
        """The one-line refusal, or None when every node read the head's marker."""
        if not self.wrote:
            return (f"{what} {self.path!r}: the cluster's head cannot write there ({self.write_error}); use an "
                    "object store (s3://..., gs://...) or a folder every node mounts")
        # A read that did not run says nothing about the folder: only a node that looked counts.
        bad = {n: why for n, why in self.nodes.items() if why != "ok" and not why.startswith(NOT_RUN)}
        if not bad:
            return None
        shown = "; ".join(f"{n}: {why}" for n, why in sorted(bad.items())[:3])
        return (f"{what} {self.path!r} is not shared by every node of this cluster: a file the head wrote there "
                f"is not readable on {len(bad)} of {len(self.nodes)} other node(s) ({shown}); checkpoints would "
                "be lost or unreadable. Use an object store (s3://..., gs://...) or a shared mount (NFS, "
                "a cluster filesystem) for storage.path")

    @staticmethod
    def from_logs(text: str, path: str) -> SharedCheck | None:
        """The check job's result line, parsed from its log text (None if it printed none)."""
        for line in reversed(text.splitlines()):
            i = line.find(RESULT_PREFIX)
            if i >= 0:
                d = json.loads(line[i + len(RESULT_PREFIX):])
                return SharedCheck(path=path, wrote=bool(d.get("wrote")), write_error=str(d.get("write_error", "")),
                                   nodes={str(k): str(v) for k, v in (d.get("nodes") or {}).items()})
        return None


def needs_check(path: str) -> bool:
    """Whether `path` is a local folder (plain or `file://`) whose sharing must be checked."""
    return "://" not in path or path.startswith("file://")


def check_shared(path: str, address: str | None = None, timeout_s: float = 90) -> SharedCheck | None:
    """Run the check job on the cluster at `address`; None when it could not run or say (then: no verdict).

    Args:
        path: an absolute local folder (`storage.path` after resolution), or `file://...`.
        address: the cluster (as `raybig submit --address`).
        timeout_s: how long to wait for the check job.
    """
    from ray.job_submission import JobStatus

    from raybig.cluster.jobs import call, connect
    from raybig.scheduler.client import entrypoint

    client, url = connect(address)
    local = path[len("file://"):] if path.startswith("file://") else path
    job_id = f"raybig-storage-check-{uuid.uuid4().hex[:8]}"
    env = {ENV: json.dumps({"path": local, "token": uuid.uuid4().hex})}
    try:
        call(url, client.submit_job, submission_id=job_id, runtime_env={"env_vars": env}, entrypoint_num_cpus=0,
             entrypoint=entrypoint(None).replace("raybig.entrypoint", "raybig.scheduler.storage_check"))
    except Exception:  # noqa: BLE001 - no verdict; the caller warns
        return None
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            status = JobStatus(call(url, client.get_job_status, job_id))
        except Exception:  # noqa: BLE001
            return None
        if status.is_terminal():
            try:
                return SharedCheck.from_logs(call(url, client.get_job_logs, job_id) or "", local)
            except Exception:  # noqa: BLE001
                return None
        time.sleep(0.5)
    try:
        call(url, client.stop_job, job_id)
    except Exception:  # noqa: BLE001
        pass
    return None


def require_shared(spec: Any, address: str | None, node_count: int | None, warn: Any = None) -> None:
    """Refuse (exit 2) a multi-node submit whose local `storage.path` a node cannot read.

    Args:
        spec: the resolved spec (paths absolute); kinds without `storage` pass.
        address: the cluster.
        node_count: alive nodes (None: unknown, then nothing is checked).
        warn: called with a line when the check could not give a verdict.

    Raises:
        UsageError: a node could not read the head's marker, or the head could not write it.
    """
    st = getattr(spec, "storage", None)
    path = getattr(st, "path", None)
    if not isinstance(path, str) or not needs_check(path) or not node_count or node_count < 2:
        return
    found = check_shared(path, address)
    if found is None:
        if warn is not None:
            warn(f"could not check that storage.path {path!r} is shared by the cluster's {node_count} nodes "
                 "(the check job did not report); a folder only the head sees loses checkpoints")
        return
    problem = found.problem()
    if problem:
        raise UsageError(problem)


def _read(marker: str, token: str) -> str:
    try:
        with open(marker) as f:
            return "ok" if f.read() == token else "the marker holds other content"
    except FileNotFoundError:
        return "no such file there"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def main() -> int:
    """The check job (runs on the head): write the marker, read it on every other node, report."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    req = json.loads(os.environ[ENV])
    folder, token = req["path"], req["token"]
    marker = os.path.join(folder, f".raybig-shared-{token[:12]}")
    out: dict[str, Any] = {"wrote": True, "nodes": {}}
    try:
        os.makedirs(folder, exist_ok=True)
        with open(marker, "w") as f:
            f.write(token)
    except OSError as e:
        out.update(wrote=False, write_error=f"{type(e).__name__}: {e}")
        print(RESULT_PREFIX + json.dumps(out), flush=True)
        return 0
    try:
        ray.init(log_to_driver=False)
        here = ray.get_runtime_context().get_node_id()
        read = ray.remote(num_cpus=0, max_retries=0)(_read)
        nodes = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
        refs = {f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})": read.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker, token)
            for n in nodes}
        for name, ref in refs.items():
            try:
                out["nodes"][name] = ray.get(ref, timeout=60)
            except Exception as e:  # noqa: BLE001 - that node's answer is the failure
                out["nodes"][name] = f"{NOT_RUN}: {type(e).__name__}"
    finally:
        try:
            os.remove(marker)
        except OSError:
            pass
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

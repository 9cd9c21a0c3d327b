"""What runs on the cluster for every submitted raybig job (the "holder").

1. Re-validates the frozen spec that travelled with the job (and checks its hash): a spec is never
   trusted just because the client validated it.
2. Waits for admission from the scheduler actor, heartbeating; reports its state as log lines
   (`[raybig] state {...}`) that `raybig status` reads back through the Jobs API.
3. Runs the spec in this process (train: `run_train` with a metrics hook so status shows progress;
   other kinds: `raybig.runners.run_spec`). On failure it backs off and goes back into the queue,
   up to `max_retries` times; a retried train run resumes from its latest checkpoint because it
   reuses the same (storage, name).
Exit codes: 0 done, 1 failed after retries, 2 invalid spec.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from raybig.scheduler.meta import METRICS_PREFIX, demand_of, state_line

HEARTBEAT_S = float(os.environ.get("RAYBIG_HEARTBEAT_S", "0.5"))
BACKOFF_S = float(os.environ.get("RAYBIG_RETRY_BACKOFF_S", "2"))
# RAYBIG_SCHEDULER=off: start at once, like a plain Ray job (no queue, no admission). Used by the
# submission benchmark to price the scheduler, and as an escape hatch if the scheduler is broken.
OFF = os.environ.get("RAYBIG_SCHEDULER", "on") == "off"


def say(state: str, **fields: Any) -> None:
    print(state_line(state, t=round(time.time(), 3), **fields), flush=True)


class Holder:
    def __init__(self, job_id: str, job: dict[str, Any]):
        self.job_id, self.job = job_id, job
        self.phase = "waiting"
        self._handle: Any = None
        self._stop = threading.Event()

    def _sched(self) -> Any:
        from raybig.scheduler.service import get_scheduler

        if self._handle is None:
            self._handle = get_scheduler()
        return self._handle

    def beat(self) -> dict[str, Any] | None:
        import ray

        if OFF:
            return {"admitted": True}

        try:
            return ray.get(self._sched().heartbeat.remote(self.job_id, self.phase, self.job), timeout=30)
        except Exception:  # noqa: BLE001 - the scheduler died or restarts: get it again next beat
            self._handle = None
            return None

    def wait_admitted(self) -> None:
        self.phase = "waiting"
        last = None
        while True:
            r = self.beat()
            if r and r["admitted"]:
                self.phase = "running"
                self.beat()
                return
            if r:
                cur = (r.get("position"), r.get("reason"))
                if cur != last:
                    say("QUEUED", position=r.get("position"), reason=r.get("reason"))
                    last = cur
            time.sleep(HEARTBEAT_S)

    def keep_alive(self) -> None:
        """Heartbeat in the background so a restarted scheduler learns this job's phase."""
        if getattr(self, "_beating", False):
            return
        self._beating = True

        def loop() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                self.beat()
        threading.Thread(target=loop, daemon=True).start()

    def release(self) -> None:
        import ray

        self._stop.set()
        if OFF:
            return
        try:
            ray.get(self._sched().release.remote(self.job_id), timeout=10)
        except Exception:  # noqa: BLE001 - the scheduler drops ended jobs from the table anyway
            pass


def _run(spec: Any) -> dict[str, Any] | None:
    cwd = os.getcwd()  # the runtime_env working_dir (user plug-ins), if one was shipped
    if spec.kind == "train":
        from raybig.train.runner import run_train

        def emit(m: dict[str, Any]) -> None:
            print(METRICS_PREFIX + json.dumps(m, default=str), flush=True)

        res = run_train(spec, on_metrics=emit, python_path=[cwd])
        return res.to_json()
    from raybig.runners import run_spec

    return run_spec(spec, as_json=True, python_path=[cwd])


def main() -> int:
    from raybig.spec import SpecError, load_spec_text, spec_hash

    job_id = os.environ.get("RAYBIG_JOB_ID", "local")  # set by `raybig submit` (the submission id)
    text = base64.b64decode(os.environ["RAYBIG_SPEC_B64"]).decode()
    sys.path.insert(0, os.getcwd())
    try:
        spec = load_spec_text(text, source=f"job {job_id}")
    except SpecError as e:
        for i in e.issues:
            print(f"[raybig] invalid spec: {i.render()}", flush=True)
        say("FAILED", error="invalid spec on the cluster")
        return 2
    want = os.environ.get("RAYBIG_SPEC_HASH")
    if want and spec_hash(spec) != want:
        say("FAILED", error=f"spec hash mismatch ({spec_hash(spec)} != {want})")
        return 2
    import ray

    ray.init(log_to_driver=True, namespace="raybig-jobs")
    md = json.loads(os.environ.get("RAYBIG_JOB_META", "{}"))
    job = {"priority": int(getattr(spec, "priority", 0)), "submitted_at": float(md.get("submitted_at", time.time())),
           "demand": demand_of(spec).to_json(), "user": md.get("user", "")}
    holder = Holder(job_id, job)
    # `ray job stop` sends SIGTERM: unwind so the scheduler is told at once (Ray frees the workers).
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    retries = int(getattr(spec, "max_retries", 0))
    last_err = ""
    for attempt in range(retries + 1):
        try:
            holder.wait_admitted()
            os.environ["RAYBIG_ATTEMPT"] = str(attempt + 1)
            say("RUNNING", attempt=attempt + 1, of=retries + 1)
            holder.keep_alive()
            result = _run(spec)
            holder.release()
            say("SUCCEEDED", attempt=attempt + 1, result=result)
            return 0
        except KeyboardInterrupt:
            holder.release()
            say("STOPPED")
            return 130
        except Exception as e:  # noqa: BLE001 - any failure of the run counts as an attempt
            last_err = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
            # Backoff: the job keeps its place in the table but asks for nothing (frees its gang).
            holder.phase = "backoff"
            holder.beat()
            if attempt < retries:
                delay = BACKOFF_S * (2 ** attempt)
                say("RETRYING", attempt=attempt + 1, of=retries + 1, error=last_err, backoff_s=delay)
                from raybig.metrics import scheduler_retry

                scheduler_retry(job["priority"], type(e).__name__)  # Prometheus; reason = exception class
                time.sleep(delay)
    holder.release()
    say("FAILED", attempts=retries + 1, error=last_err)
    print(f"[raybig] failed after {retries + 1} attempt(s): {last_err}", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())

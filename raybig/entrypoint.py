"""What runs on the cluster for every submitted raybig job (the "holder").

1. Re-validates the frozen spec that travelled with the job (and checks its hash): a spec is never
   trusted just because the client validated it.
2. Waits for admission from the scheduler actor, heartbeating; reports its state as log lines
   (`[raybig] state {...}`) that `raybig status` reads back through the Jobs API.
3. Runs the spec in this process through `raybig.runners.run_spec` (train with a metrics hook, so
   status shows progress; the result is the same `TrainResult` as `raybig run --json`). On failure
   it backs off and goes back into the queue, up to `max_retries` times; a retried train run resumes from its latest checkpoint because it
   reuses the same (storage, name).
4. Preemption: when the scheduler picks this job as a victim, its heartbeat answer says so. A train
   job's loop is asked to checkpoint now (`raybig.train.preempt`: a key in Ray's KV that rank 0 polls)
   and returns after saving at its next step boundary; a preemptible sweep is interrupted (Tune saves
   its experiment; `Tuner.restore` resumes it). The holder then goes back into the queue (PREEMPTED)
   without spending a retry, and the next admission resumes from that checkpoint. A run still going
   `grace_s` after the request is stopped by re-executing this holder in place (same process id, so the
   Ray job lives on): Ray ends the old driver's workers, and the new holder queues again and resumes
   from the last checkpoint there was.
Exit codes: 0 done, 1 failed after retries, 2 invalid spec.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from raybig.scheduler.meta import METRICS_PREFIX, Phase, demand_of, priority_of, state_line
from raybig.scheduler.policy import JobState
from raybig.spec.base import QueuedSpec
from raybig.train.causes import root_cause
from raybig.train.progress import RunHooks

HEARTBEAT_S = float(os.environ.get("RAYBIG_HEARTBEAT_S", "0.5"))
RESUME_ENV = "RAYBIG_HOLDER_RESUME"  # set when a holder re-executes itself after a forced preemption
BACKOFF_S = float(os.environ.get("RAYBIG_RETRY_BACKOFF_S", "2"))
# RAYBIG_SCHEDULER=off: start at once, like a plain Ray job (no queue, no admission). Used by the
# submission benchmark to price the scheduler, and as an escape hatch if the scheduler is broken.
OFF = os.environ.get("RAYBIG_SCHEDULER", "on") == "off"


def say(state: JobState, **fields: Any) -> None:
    """Print one state line (read back by `raybig status` through the Jobs API's logs)."""
    print(state_line(state, t=round(time.time(), 3), **fields), flush=True)


class Holder:
    """One submitted job's side of the scheduler protocol: heartbeats, admission, release.

    Args:
        job_id: the Ray submission id.
        job: the queue record sent with each heartbeat (priority, submitted_at, demand, user).
    """
    def __init__(self, job_id: str, job: dict[str, Any], kind: str = "", preempted: int = 0):
        self.job_id, self.job, self.kind = job_id, job, kind
        self.phase = Phase.WAITING
        self.info: dict[str, Any] = {}  # attempt, error, latest metrics: shown by `raybig list/queue`
        self._handle: Any = None
        self._legacy = False  # the scheduler actor predates `info` (an older raybig on the cluster)
        self._stop = threading.Event()
        self.preempted = preempted  # times this job yielded to a higher-priority one
        self.yielding: dict[str, Any] | None = None  # the scheduler's preemption request being served
        self.workers: int | None = None  # a worker range's admitted size
        self.stopping = False  # `ray job stop` (SIGTERM): a KeyboardInterrupt then means STOPPED
        self.attempt = 0
        self.requeued = preempted > 0  # back in the queue after a preemption, not yet running again
        self._run_ended = threading.Event()
        self._full_job = dict(job)

    def _sched(self) -> Any:
        from raybig.scheduler.service import get_scheduler

        if self._handle is None:
            self._handle = get_scheduler()
        return self._handle

    def beat(self) -> dict[str, Any] | None:
        """One heartbeat with the current `Phase`; the actor's answer, or None if it is unreachable."""
        import ray

        if OFF:
            return {"admitted": True}

        try:
            info = dict(self.info)
            if self.preempted:
                info["preempted"] = self.preempted
            if self.yielding is not None:
                info["yielding"] = self.yielding
            args = (self.job_id, self.phase, self.job) + (() if self._legacy else (info,))
            return ray.get(self._sched().heartbeat.remote(*args), timeout=30)
        except Exception as e:  # noqa: BLE001 - the scheduler died or restarts: get it again next beat
            if "positional argument" in str(e) and not self._legacy:
                self._legacy = True  # an older scheduler actor: heartbeat without `info`
            self._handle = None
            return None

    def wait_admitted(self) -> None:
        """Heartbeat until admitted, printing a QUEUED line whenever the position or reason changes."""
        self.phase = Phase.WAITING
        last = None
        while True:
            r = self.beat()
            if r and r["admitted"]:
                self.workers = r.get("workers")
                if self.workers:  # admitted below its range's maximum: the gang it holds, for a restart
                    self.job = {**self._full_job, "workers": self.workers,
                                "demand": next((d for n, d in self._full_job.get("sizes") or () if n == self.workers),
                                               self._full_job["demand"])}
                else:
                    self.job = dict(self._full_job)
                self.phase = Phase.RUNNING
                self.requeued = False
                self._run_ended.clear()
                self.beat()
                return
            if r:
                cur = (r.get("position"), r.get("reason"))
                if cur != last:  # a preempted job waiting to resume says so until it runs again
                    say(JobState.PREEMPTED if self.requeued else JobState.QUEUED, position=r.get("position"),
                        reason=r.get("reason"), **({"preempted": self.preempted} if self.requeued else {}))
                    last = cur
            time.sleep(HEARTBEAT_S)

    def keep_alive(self) -> None:
        """Heartbeat in the background so a restarted scheduler learns this job's phase."""
        if getattr(self, "_beating", False):
            return
        self._beating = True

        def loop() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                r = self.beat()
                if r and r.get("preempt") and self.phase is Phase.RUNNING:
                    self.yield_now(r["preempt"])
        threading.Thread(target=loop, daemon=True).start()

    def yield_now(self, request: dict[str, Any]) -> None:
        """Serve a preemption request once: ask the run to checkpoint and stop, bounded by its grace.

        A train job's loop gets the checkpoint-now key; a sweep is interrupted like Ctrl-C (Tune saves
        its experiment state for `Tuner.restore`). Past `grace_s` the holder re-executes itself.
        """
        if self.yielding is not None:
            return
        self.yielding = dict(request)
        grace = float(request.get("grace_s", 120))
        print(f"[raybig] preempted for {request.get('by')}: checkpointing now (at most {grace:g} s)", flush=True)
        say(JobState.RUNNING, attempt=self.attempt + 1, of=self.info.get("of"),
            reason=f"preempted for {request.get('by')}: checkpointing")
        if self.kind == "train":
            from raybig.train.preempt import request as ask

            ask(self.job_id)
        else:
            os.kill(os.getpid(), signal.SIGINT)

        def bound() -> None:
            if not self._run_ended.wait(grace) and self.yielding is not None:
                print(f"[raybig] the run did not stop within {grace:g} s of the checkpoint request: "
                      "stopping it (it resumes from its last checkpoint)", flush=True)
                self.reexec()
        threading.Thread(target=bound, daemon=True).start()

    def reexec(self) -> None:
        """Stop the run by replacing this process with a fresh holder (same pid: the Ray job lives on).

        Ray ends the old driver's Train controller and workers when its connection drops; the new
        holder says PREEMPTED and queues again.
        """
        env = {**os.environ, RESUME_ENV: json.dumps({"attempt": self.attempt, "preempted": self.preempted + 1,
                                                      "forced": True})}
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "raybig.entrypoint"], env)

    def back_in_queue(self, step: Any = None) -> None:
        """After a preempted run returned: queue again (PREEMPTED) without spending a retry."""
        self._run_ended.set()
        self.preempted += 1
        self.yielding = None
        self.workers = None
        self.job = dict(self._full_job)
        self.phase = Phase.WAITING
        self.requeued = True
        self.info = {**{k: v for k, v in self.info.items() if k in ("attempt", "of", "metrics")},
                     "preempted_at_step": step}
        say(JobState.PREEMPTED, preempted=self.preempted, step=step, attempt=self.attempt + 1,
            of=self.info.get("of"))

    def release(self, state: JobState | None = None, error: str = "") -> None:
        """Stop heartbeating and tell the scheduler this job no longer holds its gang.

        Args:
            state: how the job ended (kept by the scheduler for `raybig list --all`), if it did.
            error: its one-line cause when it failed.
        """
        import ray

        self._stop.set()
        if self.yielding is not None and self.kind == "train":  # ended before its loop saw the request
            from raybig.train.preempt import clear

            clear(self.job_id)
        if OFF:
            return
        outcome = None if state is None else {"state": state.value, **({"error": error} if error else {})}
        try:
            args = (self.job_id,) + (() if self._legacy or outcome is None else (outcome,))
            ray.get(self._sched().release.remote(*args), timeout=10)
        except Exception:  # noqa: BLE001 - the scheduler drops ended jobs from the table anyway
            pass


# The metrics the board carries for `raybig list/queue` (the whole record stays in the job's log).
BOARD_METRICS = ("step", "loss", "val_loss", "tokens_per_s")


class _EmitMetrics(RunHooks):
    """Prints each train metrics record as a log line (`raybig status` shows the latest).

    The latest progress also goes to the holder's heartbeats, for `raybig list/queue`.
    """

    def __init__(self, holder: Holder | None = None) -> None:
        self.holder = holder

    @contextlib.contextmanager
    def train(self, spec: Any) -> Iterator[Callable[[dict[str, Any]], None]]:
        def emit(m: dict[str, Any]) -> None:
            print(METRICS_PREFIX + json.dumps(m, default=str), flush=True)
            if self.holder is not None:
                latest = dict(self.holder.info.get("metrics") or {})
                latest.update({k: m[k] for k in BOARD_METRICS if isinstance(m.get(k), int | float)})
                self.holder.info = {**self.holder.info, "metrics": latest}

        yield emit


def _workdir() -> str:
    """The job's working folder (the runtime_env working_dir with user plug-ins, if one was shipped).

    Resolved once, at start: Ray may re-extract the working_dir package at the same path while the
    job runs (another node's agent, a retry), leaving this process in a deleted folder where
    `os.getcwd()` raises a bare FileNotFoundError. `RAYBIG_WORKDIR` is set by `main`.
    """
    path = os.environ.get("RAYBIG_WORKDIR") or os.environ.get("PWD") or "."
    with contextlib.suppress(OSError):
        os.chdir(path)  # back into the live folder at that path if ours was replaced
    return path


def _run(spec: Any, holder: Holder | None = None) -> dict[str, Any]:
    from raybig.runners import run_spec
    from raybig.train.result import TrainResult

    result = run_spec(spec, python_path=[_workdir()], hooks=_EmitMetrics(holder))
    return result.to_json() if isinstance(result, TrainResult) else result


def main() -> int:
    """Validate the job's frozen spec, wait for admission, run it with retries; the process exit code."""
    from raybig.spec import SpecError, load_spec_text, spec_hash

    job_id = os.environ.get("RAYBIG_JOB_ID", "local")  # set by `raybig submit` (the submission id)
    text = base64.b64decode(os.environ["RAYBIG_SPEC_B64"]).decode()
    try:
        workdir = os.getcwd()  # once, before anything can replace it
    except FileNotFoundError:  # already replaced: the path the shell started us in
        workdir = os.environ.get("PWD", ".")
    os.environ["RAYBIG_WORKDIR"] = workdir
    sys.path.insert(0, workdir)
    try:
        spec = load_spec_text(text, source=f"job {job_id}")
    except SpecError as e:
        for i in e.issues:
            print(f"[raybig] invalid spec: {i.render()}", flush=True)
        say(JobState.FAILED, error="invalid spec on the cluster")
        return 2
    want = os.environ.get("RAYBIG_SPEC_HASH")
    if want and spec_hash(spec) != want:
        say(JobState.FAILED, error=f"spec hash mismatch ({spec_hash(spec)} != {want})")
        return 2
    import ray

    ray.init(log_to_driver=True, namespace="raybig-jobs")
    md = json.loads(os.environ.get("RAYBIG_JOB_META", "{}"))
    job = {"priority": priority_of(spec), "submitted_at": float(md.get("submitted_at", time.time())),
           "demand": demand_of(spec).to_json(), "user": md.get("user", "")}
    from raybig.scheduler.meta import preemptible_of, sizes_of

    job["preemptible"] = preemptible_of(spec)
    if sizes := sizes_of(spec):
        job["sizes"] = [[n, d.to_json()] for n, d in sizes]
    resumed = json.loads(os.environ.pop(RESUME_ENV, "") or "{}")  # a holder re-executed after a preemption
    holder = Holder(job_id, job, kind=str(spec.kind), preempted=int(resumed.get("preempted", 0)))

    def on_sigterm(*_: Any) -> None:
        holder.stopping = True
        raise KeyboardInterrupt

    # `ray job stop` sends SIGTERM: unwind so the scheduler is told at once (Ray frees the workers).
    signal.signal(signal.SIGTERM, on_sigterm)
    retries = spec.max_retries if isinstance(spec, QueuedSpec) else 0
    last_err = ""
    attempt = int(resumed.get("attempt", 0))
    if resumed:
        holder.attempt = attempt
        holder.info = {"attempt": attempt + 1, "of": retries + 1}
        say(JobState.PREEMPTED, preempted=holder.preempted, forced=True, attempt=attempt + 1, of=retries + 1)
    while attempt <= retries:
        holder.attempt = attempt
        try:
            holder.wait_admitted()
            run = spec
            if holder.workers:  # a worker range admitted below its maximum: the `--set` override
                run = load_spec_text(text, source=f"job {job_id}", overrides=[f"resources.workers={holder.workers}"])
            if spec.kind == "train":
                from raybig.train.preempt import clear

                clear(job_id)  # an earlier preemption's request must not stop this run
            os.environ["RAYBIG_ATTEMPT"] = str(attempt + 1)
            say(JobState.RUNNING, attempt=attempt + 1, of=retries + 1,
                **({"workers": holder.workers} if holder.workers else {}),
                **({"preempted": holder.preempted} if holder.preempted else {}))
            holder.info = {"attempt": attempt + 1, "of": retries + 1}
            holder.keep_alive()
            result = _run(run, holder)
            if holder.yielding is not None and not _finished(run, result):
                holder.back_in_queue(result.get("steps") if isinstance(result, dict) else None)
                continue  # a preemption spends no retry
            holder._run_ended.set()
            holder.release(JobState.SUCCEEDED)
            say(JobState.SUCCEEDED, attempt=attempt + 1, result=result)
            return 0
        except KeyboardInterrupt:
            if holder.yielding is not None and not holder.stopping:  # the interrupt was our own (a sweep)
                holder.back_in_queue()
                continue
            holder.release(JobState.STOPPED)
            say(JobState.STOPPED)
            return 130
        except Exception as e:  # noqa: BLE001 - any failure of the run counts as an attempt
            if holder.yielding is not None:
                # Stopped while yielding (e.g. Train's workers torn down): back in the queue, no retry spent.
                print(f"[raybig] the run ended while yielding: {root_cause(e)[:300]}", flush=True)
                holder.back_in_queue()
                continue
            holder._run_ended.set()
            last_err = root_cause(e)[:500]  # the root exception and its message, in one line
            # The whole cause goes into the job's log (`raybig logs JOB`); the state line keeps one line.
            print(f"[raybig] attempt {attempt + 1} failed:", flush=True)
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
            # Backoff: the job keeps its place in the table but asks for nothing (frees its gang).
            holder.phase = Phase.BACKOFF
            holder.info = {"attempt": attempt + 1, "of": retries + 1, "error": last_err}
            holder.beat()
            if attempt < retries:
                delay = BACKOFF_S * (2 ** attempt)
                say(JobState.RETRYING, attempt=attempt + 1, of=retries + 1, error=last_err, backoff_s=delay)
                from raybig.metrics import scheduler_retry

                scheduler_retry(job["priority"], type(e).__name__)  # Prometheus; reason = exception class
                time.sleep(delay)
            attempt += 1
    holder.release(JobState.FAILED, last_err)
    say(JobState.FAILED, attempts=retries + 1, error=last_err)
    print(f"[raybig] failed after {retries + 1} attempt(s): {last_err}", flush=True)
    print(f"[raybig] the traceback is above; the whole log: `raybig logs {job_id}`"
          + (f", on the head node {_driver_log(job_id)}" if _driver_log(job_id) else ""), flush=True)
    return 1


def _finished(spec: Any, result: Any) -> bool:
    """Whether a run that returned while yielding had reached its end anyway (then it succeeded)."""
    if spec.kind == "train" and isinstance(result, dict):
        return int(result.get("steps") or 0) >= int(spec.train.steps)
    return False


def _driver_log(job_id: str) -> str | None:
    """This job's driver log file on the head (Ray writes `<session>/logs/job-driver-<id>.log`)."""
    try:
        import ray

        node: Any = ray._private.worker._global_node
        path = os.path.join(node.get_logs_dir_path(), f"job-driver-{job_id}.log")
    except Exception:  # noqa: BLE001 - only a hint
        return None
    return path if os.path.exists(path) else None


if __name__ == "__main__":
    sys.exit(main())

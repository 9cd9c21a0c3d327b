"""Checkpoint-now requests: how a preempted job's training loop learns to save and stop.

The channel is one key per job in Ray's GCS key-value store (`key(job_id)`, namespace `NAMESPACE`),
written by the job's holder when the scheduler picks the job as a preemption victim. Every rank of a
submitted job (`RAYBIG_JOB_ID` travels in the job's runtime env to each Ray Train worker) runs a
`Watch`: rank 0 reads the key at most every `POLL_S` seconds (one small GCS read), and all ranks
agree on it with one all-reduce of two numbers at the same steps, so every rank stops after the same
step. The agreement also carries rank 0's choice of the next check: as many steps as fit in about
`POLL_S` seconds of its measured step time (1 to `MAX_EVERY`), so short steps do not pay a collective
(a device-to-host sync on GPUs) each step, and long steps are still checked every step.
A loop launched outside a submitted job (`raybig run`, torchrun) has no job id and never polls.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

NAMESPACE = "raybig"
POLL_S = float(os.environ.get("RAYBIG_PREEMPT_POLL_S", "0.5"))
MAX_EVERY = 100
"""The most steps between two agreements (bounds the delay when step times grow later)."""


def key(job_id: str) -> str:
    """The KV key that asks job `job_id` to checkpoint now and stop."""
    return f"raybig-preempt:{job_id}"


def request(job_id: str) -> None:
    """Ask `job_id`'s training loop to checkpoint at its next step boundary and stop (needs Ray)."""
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key(job_id), str(time.time()), overwrite=True, namespace=NAMESPACE)


def clear(job_id: str) -> None:
    """Withdraw the request (before the job runs again); no error when there is none."""
    from ray.experimental.internal_kv import _internal_kv_del

    try:
        _internal_kv_del(key(job_id), namespace=NAMESPACE)
    except Exception:  # noqa: BLE001 - a missing key or a not-yet-connected process: nothing to clear
        pass


def requested(job_id: str) -> bool:
    """Whether a checkpoint-now request is pending for `job_id` (False where Ray cannot be read)."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(key(job_id), namespace=NAMESPACE) is not None
    except Exception:  # noqa: BLE001 - a loop outside Ray, or the GCS briefly away: keep training
        return False


class Watch:
    """Per-rank view of the request, agreed across ranks at steps every rank knows.

    Args:
        rank: this rank (only rank 0 reads the KV store and times the steps).
        agree: reduces `[flag, next_every]` over ranks with "max" (the loop's `all_reduce`); called
            by every rank at the same steps (those where `stop_now` agrees).
        job_id: the job to watch; default `RAYBIG_JOB_ID` (unset: the watch is off and costs nothing).
    """

    def __init__(self, rank: int, agree: Callable[[list[float]], list[float]], job_id: str | None = None) -> None:
        self.rank, self.agree = rank, agree
        self.job_id = job_id if job_id is not None else os.environ.get("RAYBIG_JOB_ID")
        self._last = 0.0
        self._seen = False
        self._next = 0  # the step at which the ranks agree next
        self._mark: tuple[int, float] | None = None  # (step, time) of rank 0's last agreement

    def stop_now(self, step: int) -> bool:
        """True on every rank once rank 0 has seen a request, decided at the agreed steps only.

        `step`: optimizer steps done (the same on every rank). Between agreements this returns False
        without any communication.
        """
        if not self.job_id or step < self._next:
            return False
        every = 0.0
        if self.rank == 0:
            now = time.monotonic()
            if not self._seen and now - self._last >= POLL_S:
                self._last = now
                self._seen = requested(self.job_id)
            if self._mark is not None and step > self._mark[0]:
                per_step = (now - self._mark[1]) / (step - self._mark[0])
                every = float(min(MAX_EVERY, max(1, round(POLL_S / per_step) if per_step > 0 else MAX_EVERY)))
            else:
                every = 1.0
            self._mark = (step, now)
        flag, agreed_every = self.agree([1.0 if self._seen else 0.0, every])
        self._next = step + max(1, int(agreed_every))
        return flag > 0

"""raybig's own Prometheus metrics, exported through Ray's metrics system.

Every metric raybig emits is declared once here, in `METRICS`, so names, units and tags stay stable
and tests can check them. Ray exports a metric `NAME` as `ray_NAME` on each node's metrics port
(counters as `ray_NAME_total`; histograms as `ray_NAME_{bucket,sum,count}`). Dashboards in
`dashboards/` query those exported names.

Naming: `raybig_<area>_<what>_<unit>`; units are base units in the name (`_seconds`, `_bytes`,
`_ratio`), counters are plural nouns (Prometheus adds `_total`).

Tags (bounded cardinality; never a step, a request id or a prompt):
  job_name  the spec's `name` (a raybig job). Not `job`: Prometheus reserves `job` for the scrape
            job and would rename ours to `exported_job`.
  run       the run name under storage (= job_name for `raybig run`; the trial's run for sweeps).
  trial     the sweep trial name, or "" outside sweeps.
  rank      the Train worker's world rank (peak memory only).
  sweep     the sweep's name; state: a trial state; metric: the metric a sweep optimises.
  model / status    serving: the model name, and "ok" | "client_error" | "server_error".
  priority  the scheduler's queue priority; reason: why a job was retried.
Serve replicas get `deployment`, `replica`, `application` and `route` added by `ray.serve.metrics`.

Ray stops exporting a gauge roughly 20-30 s after its last `set` (counters and histograms stay), so
emitters re-set gauges on every report/tick; a finished run's gauges end with it in Prometheus.

All helpers are best-effort: metrics must never break training or serving, so every emit swallows
errors (and is a no-op outside a Ray worker/driver).

MFU: achieved model FLOP/s over the hardware's peak. FLOP/s = tokens/s x `flops_per_token` (6N +
12·L·C·T, forward + backward, PaLM appendix B). Peaks we know (dense, per device):
  NVIDIA H100 SXM 989e12 (bf16), H200 989e12, A100 312e12 (bf16/fp16), L4 121e12, A10G 125e12,
  V100 125e12 (fp16 tensor core), T4 65e12.
  CPU: no peak is assumed (too variable); set RAYBIG_PEAK_FLOPS (FLOP/s per worker) to get MFU on CPU
  or an unlisted GPU. Unknown peak -> MFU is not emitted (absent, not 0).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from dataclasses import dataclass
from typing import Any

PROM_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
PROM_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Tag keys whose values come from a small set per cluster; anything else is refused by the tests.
BOUNDED_TAGS = frozenset({"job_name", "run", "trial", "rank", "sweep", "state", "metric", "model",
                          "status", "priority", "reason", "deployment", "replica", "application",
                          "route"})

TIME_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
WAIT_BUCKETS_S = [1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


@dataclass(frozen=True)
class MetricDef:
    """One metric raybig declares: its Ray name, kind, description, tag keys and histogram boundaries."""
    name: str  # as given to Ray; exported as ray_<name>[_total]
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...]
    boundaries: tuple[float, ...] = ()
    serve: bool = False  # created with ray.serve.metrics (adds deployment/replica/application)

    @property
    def exported(self) -> list[str]:
        """The Prometheus series names Ray exports for this metric."""
        base = f"ray_{self.name}"
        if self.kind == "counter":
            return [f"{base}_total"]
        if self.kind == "histogram":
            return [f"{base}_bucket", f"{base}_sum", f"{base}_count"]
        return [base]


_TRAIN = ("job_name", "run", "trial")
_SERVE = ("model",)
METRICS: dict[str, MetricDef] = {m.name: m for m in [
    # training (rank 0 reports the all-reduced values; peak memory comes from every rank)
    MetricDef("raybig_train_loss", "gauge", "Training loss (mean over ranks, last log window).", _TRAIN),
    MetricDef("raybig_train_val_loss", "gauge", "Validation loss at the last eval.", _TRAIN),
    MetricDef("raybig_train_accuracy_ratio", "gauge", "Training accuracy (0-1; a classifier's, or a masked LM's "
              "on its masked tokens), last log window; absent for causal LMs.", _TRAIN),
    MetricDef("raybig_train_val_accuracy_ratio", "gauge", "Validation accuracy (0-1) at the last eval; absent for "
              "causal LMs.", _TRAIN),
    MetricDef("raybig_train_learning_rate", "gauge", "Learning rate at the last step.", _TRAIN),
    MetricDef("raybig_train_step", "gauge", "Optimizer steps completed.", _TRAIN),
    MetricDef("raybig_train_throughput_tokens_per_second", "gauge", "Training tokens/s, all workers.", _TRAIN),
    MetricDef("raybig_train_step_time_seconds", "histogram", "Wall time of one optimizer step.", _TRAIN,
              tuple(TIME_BUCKETS_S)),
    MetricDef("raybig_train_tokens", "counter", "Training tokens processed, all workers.", _TRAIN),
    MetricDef("raybig_train_samples_seen", "gauge", "Training samples (sequences) seen so far.", _TRAIN),
    MetricDef("raybig_train_checkpoint_save_seconds", "histogram", "Time to save one checkpoint.", _TRAIN,
              tuple(TIME_BUCKETS_S)),
    MetricDef("raybig_train_peak_memory_bytes", "gauge",
              "Peak memory of one worker (CUDA max allocated, or max RSS on CPU).", (*_TRAIN, "rank")),
    MetricDef("raybig_train_mfu_ratio", "gauge",
              "Model FLOPs utilisation estimate (0-1); absent when the hardware peak is unknown.", _TRAIN),
    # sweeps
    MetricDef("raybig_sweep_trials", "gauge", "Trials of a sweep by state.", ("sweep", "state")),
    MetricDef("raybig_sweep_best_metric", "gauge", "Best value of the sweep's metric so far.",
              ("sweep", "metric")),
    # serving (inside replicas; ray.serve.metrics adds deployment/replica/application)
    MetricDef("raybig_serve_requests", "counter", "Completion requests by outcome.", (*_SERVE, "status"),
              serve=True),
    MetricDef("raybig_serve_request_latency_seconds", "histogram", "End-to-end request latency.", _SERVE,
              tuple(TIME_BUCKETS_S), serve=True),
    MetricDef("raybig_serve_time_to_first_token_seconds", "histogram", "Time to the first generated token.",
              _SERVE, tuple(TIME_BUCKETS_S), serve=True),
    MetricDef("raybig_serve_generated_tokens", "counter", "Tokens generated.", _SERVE, serve=True),
    MetricDef("raybig_serve_batch_size", "histogram", "Requests per generation batch.", _SERVE,
              tuple(BATCH_BUCKETS), serve=True),
    MetricDef("raybig_serve_cancelled", "counter", "Requests whose client went away mid-generation "
              "(their rows removed from the engine).", _SERVE, serve=True),
    # scheduler
    MetricDef("raybig_scheduler_queue_depth", "gauge", "Jobs waiting in the queue.", ("priority",)),
    MetricDef("raybig_scheduler_wait_time_seconds", "histogram", "Time from submit to admission.",
              ("priority",), tuple(WAIT_BUCKETS_S)),
    MetricDef("raybig_scheduler_admissions", "counter", "Jobs admitted to the cluster.", ("priority",)),
    MetricDef("raybig_scheduler_retries", "counter", "Job retries after a failure.", ("priority", "reason")),
    MetricDef("raybig_scheduler_preemptions", "counter", "Running jobs asked to checkpoint and yield to a "
              "higher-priority job (labelled with the victim's priority).", ("priority",)),
]}

_lock = threading.Lock()
_objs: dict[str, Any] = {}


def _metric(name: str) -> Any:
    """The Ray metric object for `name`, created once per process (lazily: needs `import ray`)."""
    obj = _objs.get(name)
    if obj is not None:
        return obj
    with _lock:
        if name in _objs:
            return _objs[name]
        d = METRICS[name]
        if d.serve:
            from ray.serve import metrics as serve_metrics

            mod: Any = serve_metrics
        else:
            from ray.util import metrics as util_metrics

            mod = util_metrics
        cls = {"counter": mod.Counter, "gauge": mod.Gauge, "histogram": mod.Histogram}[d.kind]
        kw: dict[str, Any] = {"description": d.description, "tag_keys": d.tags}
        if d.kind == "histogram":
            kw["boundaries"] = list(d.boundaries)
        _objs[name] = obj = cls(d.name, **kw)
        return obj


def _tags(name: str, tags: dict[str, Any]) -> dict[str, str]:
    keys = METRICS[name].tags
    return {k: "" if tags.get(k) is None else str(tags[k]) for k in keys}


def emit(name: str, value: float, **tags: Any) -> None:
    """Record one value: gauges are set, counters incremented, histograms observed. Never raises."""
    with contextlib.suppress(Exception):
        import ray

        if not ray.is_initialized() or value is None:
            return
        d = METRICS[name]
        m, t = _metric(name), _tags(name, tags)
        if d.kind == "gauge":
            m.set(float(value), tags=t)
        elif d.kind == "counter":
            if value > 0:
                m.inc(float(value), tags=t)
        else:
            m.observe(float(value), tags=t)


# ---- hardware peak and MFU -------------------------------------------------------------------------

GPU_PEAK_FLOPS = {  # dense bf16/fp16 tensor-core peaks, per device (vendor datasheets)
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
    "A10": 125e12, "V100": 125e12, "T4": 65e12,
}


def peak_flops(device_name: str | None = None) -> float | None:
    """Peak FLOP/s of one worker's device, or None when unknown (CPU unless RAYBIG_PEAK_FLOPS is set)."""
    env = os.environ.get("RAYBIG_PEAK_FLOPS")
    if env:
        with contextlib.suppress(ValueError):
            return float(env)
    if device_name is None:
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                device_name = torch.cuda.get_device_name()
    if not device_name:
        return None
    up = device_name.upper()
    for key in sorted(GPU_PEAK_FLOPS, key=len, reverse=True):  # "A10G" before "A10"
        if key in up:
            return GPU_PEAK_FLOPS[key]
    return None


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_per_device: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices; None if the peak is unknown."""
    if not peak_per_device or n_devices <= 0 or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak_per_device * n_devices)


# ---- helpers the components call -------------------------------------------------------------------

class TrainMetrics:
    """Per-worker training emitter: rank 0 publishes the (all-reduced) run metrics, every rank its memory."""

    def __init__(self, job_name: str, run: str, trial: str = "", rank: int = 0, world_size: int = 1,
                 flops_per_token: float | None = None, peak_per_device: float | None = None):
        self.tags = {"job_name": job_name, "run": run, "trial": trial}
        self.rank, self.world_size = rank, world_size
        self.flops_per_token, self.peak = flops_per_token, peak_per_device
        self._tokens = 0

    def report(self, m: dict[str, Any]) -> None:
        """Publish one metrics dict from `train_worker` (never raises: metrics must not stop training)."""
        with contextlib.suppress(Exception):
            self._report(m)

    def _report(self, m: dict[str, Any]) -> None:
        if "peak_mem_bytes" in m:  # every rank: its own peak, not the all-reduced max
            emit("raybig_train_peak_memory_bytes", local_peak_memory_bytes(), **self.tags, rank=self.rank)
        if self.rank != 0:
            return
        simple = {"loss": "raybig_train_loss", "val_loss": "raybig_train_val_loss",
                  "lr": "raybig_train_learning_rate", "step": "raybig_train_step",
                  "tokens_per_s": "raybig_train_throughput_tokens_per_second",
                  "step_time_s": "raybig_train_step_time_seconds", "samples": "raybig_train_samples_seen",
                  "checkpoint_save_s": "raybig_train_checkpoint_save_seconds",
                  "accuracy": "raybig_train_accuracy_ratio", "masked_accuracy": "raybig_train_accuracy_ratio",
                  "val_accuracy": "raybig_train_val_accuracy_ratio",
                  "val_masked_accuracy": "raybig_train_val_accuracy_ratio"}
        for key, name in simple.items():
            if m.get(key) is not None:
                emit(name, m[key], **self.tags)
        if m.get("tokens") is not None:
            # Counter: add what was processed since the last report of this process. A worker restored
            # from a checkpoint reports cumulative tokens that earlier processes already counted, so its
            # first report (the one carrying `restored_step`) only sets the baseline.
            tokens = int(m["tokens"])
            if self._tokens or "restored_step" not in m:
                emit("raybig_train_tokens", tokens - self._tokens, **self.tags)
            self._tokens = tokens
        if m.get("tokens_per_s") and self.flops_per_token:
            u = mfu(m["tokens_per_s"], self.flops_per_token, self.world_size, self.peak)
            if u is not None:
                emit("raybig_train_mfu_ratio", u, **self.tags)


def local_peak_memory_bytes() -> int:
    """This process's peak: CUDA max allocated when CUDA is in use, else max RSS."""
    import resource

    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def train_metrics_for(spec: Any, rank: int, world_size: int, run: str | None = None,
                      trial: str = "") -> TrainMetrics:
    """A `TrainMetrics` for a TrainSpec; FLOPs/token only for the built-in GPT."""
    fpt = None
    with contextlib.suppress(Exception):
        if spec.model.target is None:
            from raybig.model import GPTConfig, flops_per_token  # leaves only: no train/ import
            from raybig.tokenizer import BYTE_VOCAB

            cfg = GPTConfig(**spec.model.gpt_shape(), vocab_size=spec.model.vocab_size or BYTE_VOCAB)
            fpt = flops_per_token(cfg, spec.data.seq_len)
    return TrainMetrics(spec.name, run or spec.name, trial, rank, world_size, fpt, peak_flops())


def sweep_trials(sweep: str, counts: dict[str, int]) -> None:
    """Trials per state (set every state you know, including zeros, so finished states drop to 0)."""
    for state, n in counts.items():
        emit("raybig_sweep_trials", n, sweep=sweep, state=state)


def sweep_best(sweep: str, metric: str, value: float | None) -> None:
    """The best value of the sweep's metric so far (None: nothing reported yet, not emitted)."""
    if value is not None:
        emit("raybig_sweep_best_metric", value, sweep=sweep, metric=metric)


def serve_request(model: str, status: str, latency_s: float, ttft_s: float | None = None,
                  tokens: int = 0) -> None:
    """One finished completion request (call inside the replica)."""
    emit("raybig_serve_requests", 1, model=model, status=status)
    emit("raybig_serve_request_latency_seconds", latency_s, model=model)
    if ttft_s is not None:
        emit("raybig_serve_time_to_first_token_seconds", ttft_s, model=model)
    if tokens:
        emit("raybig_serve_generated_tokens", tokens, model=model)


class RequestTimer:
    """Times one completion request inside a replica.

    Call `first()` at each generated chunk (the first call fixes time-to-first-token) and
    `done(http_status, job)` once at the end.
    """

    def __init__(self, model: str):
        import time

        self.model, self._clock = model, time.perf_counter
        self.t0, self._done = self._clock(), False
        self.ttft: float | None = None

    def first(self) -> None:
        """Call at each generated chunk; the first call fixes time-to-first-token."""
        if self.ttft is None:
            self.ttft = self._clock() - self.t0

    def done(self, http_status: int, job: Any = None) -> None:
        """Call once when the request ends: records outcome, latency, TTFT and generated tokens."""
        if self._done:
            return
        self._done = True
        tokens = 0
        with contextlib.suppress(Exception):
            tokens = int(job.usage()["completion_tokens"]) if job is not None else 0
        serve_request(self.model, status_class(http_status), self._clock() - self.t0, self.ttft, tokens)


def serve_batch(model: str, size: int) -> None:
    """The size of one generation batch (requests in it)."""
    emit("raybig_serve_batch_size", size, model=model)


def serve_cancelled(model: str) -> None:
    """One request cancelled because its client disconnected (exported as ..._cancelled_total)."""
    emit("raybig_serve_cancelled", 1, model=model)


def status_class(code: int) -> str:
    """An HTTP status as a bounded tag value: ok, client_error or server_error."""
    return "ok" if code < 400 else "client_error" if code < 500 else "server_error"


def scheduler_queue(depth_by_priority: dict[Any, int]) -> None:
    """Queue depth per priority (jobs waiting for admission)."""
    for prio, n in depth_by_priority.items():
        emit("raybig_scheduler_queue_depth", n, priority=prio)


def scheduler_admitted(priority: Any, wait_s: float) -> None:
    """One admission and its wait from submission (seconds)."""
    emit("raybig_scheduler_admissions", 1, priority=priority)
    emit("raybig_scheduler_wait_time_seconds", max(wait_s, 1e-6), priority=priority)


def scheduler_retry(priority: Any, reason: str = "failed") -> None:
    """One retry of a failed job; `reason` is a bounded label (the exception class)."""
    emit("raybig_scheduler_retries", 1, priority=priority, reason=reason)


def scheduler_preempted(priority: Any) -> None:
    """One running job picked as a preemption victim (`priority`: the victim's)."""
    emit("raybig_scheduler_preemptions", 1, priority=priority)


_sched_priorities: set[str] = set()


def scheduler_observe(jobs: list[Any], admitted_now: list[str], now: float | None = None) -> None:
    """Record one scheduler tick: queue depth per priority, and admissions with their queue wait.

    Depth counts jobs not admitted; priorities seen before are kept at zero so the gauge drops when
    a queue empties.
    """
    import time

    now = time.time() if now is None else now
    admit = set(admitted_now)
    depth: dict[str, int] = dict.fromkeys(_sched_priorities, 0)
    for j in jobs:
        prio = str(getattr(j, "priority", ""))
        _sched_priorities.add(prio)
        depth.setdefault(prio, 0)
        if j.job_id in admit:
            scheduler_admitted(prio, now - float(getattr(j, "submitted_at", now) or now))
        elif not getattr(j, "admitted", False):
            depth[prio] += 1
    scheduler_queue(depth)

"""Driver side of a train job: TorchTrainer setup, progress, run records."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from raybig import storage
from raybig.errors import TrainingFailed, UsageError
from raybig.spec import freeze, spec_hash
from raybig.spec.models import TrainSpec
from raybig.train.result import METRICS_FILE, RUN_FILE, TrainResult, dedupe_steps, export_of

SPEC_FILE = "spec.yaml"


def run_dir_of(spec: TrainSpec) -> str:
    """`<storage.path>/<name>`: where a train spec's outputs go."""
    return storage.join(spec.storage.path, spec.name)


class _RayReporter:
    """Reporter for the loop inside a Ray Train worker."""

    def __init__(self, queue: Any, spec: TrainSpec | None = None):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.queue = queue
        self.prom = None  # Prometheus metrics (raybig.metrics); a sweep trial's run name != spec.name
        if spec is not None:
            from raybig.metrics import train_metrics_for

            run = ctx.get_experiment_name()
            self.prom = train_metrics_for(spec, self.rank, self.world_size, run,
                                          trial=run if run != spec.name else "")

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        if self.rank == 0 and self.queue is not None:
            with contextlib.suppress(Exception):  # progress is best-effort; never block training
                self.queue.put_nowait({**metrics, "_t": time.time()})
        if self.prom is not None:
            self.prom.report(metrics)  # best-effort, never raises
        # Train v2's report() is a barrier across workers (about a second each on a busy 2-core box),
        # so only evaluations and checkpoints go through it (Tune and ASHA read val_loss there);
        # per-step progress travels through the queue alone. Every rank takes the same branch.
        if checkpoint_dir or "val_loss" in metrics:
            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt)


def _worker_entry(config: dict[str, Any]) -> None:
    from raybig.plugins import add_python_path
    from raybig.train.loop import train_worker

    add_python_path(config.get("python_path", []))
    spec: TrainSpec = config["spec"]
    train_worker(spec, _RayReporter(config.get("queue"), spec), config["run_dir"], config.get("resume_from"),
                 prepared=config.get("prepared"))


def prepare_data(spec: TrainSpec, run_dir: str, storage_path: str | None = None,
                 on_note: Callable[[str], None] | None = None) -> str:
    """Tokenize `spec.data` into token shards once, or reuse the set whose fingerprint matches.

    Runs where the trainer is built (the driver, or a sweep trial's task), before any worker starts:
    the run's tokenizer (a BPE is trained into `run_dir` here), then `raybig.data.prepare.prepare_spec`
    under `data.prepared_path` (default `<storage>/.prepared`), then every rank's share is checked
    (`raybig.data.shards.check_shares`). One line about it goes to `on_note`.

    Returns:
        The prepared set's URI, which every worker opens with `ShardBatches`.

    Raises:
        raybig.data.sources.DataError (exit 2): no files, a bad record (`on_bad_record: fail`), a
            template field the data lacks, a share too small for one row.
    """
    from raybig.data.prepare import describe, prepare_spec, prepared_root
    from raybig.data.shards import check_shares

    tok = None
    if spec.tokenizer_kind() != "bytes":  # bytes need no torch import here
        from raybig.train.built import run_tokenizer

        tok = run_tokenizer(spec, run_dir, 0, None)
    summary = prepare_spec(spec.data, prepared_root(spec.data, storage_path or spec.storage.path), tok)
    check_shares(summary.uri, spec.data.seq_len, spec.train.micro_batch_size, spec.seed, spec.resources.workers,
                 packed=spec.data.is_packed())
    if on_note is not None:
        on_note(describe(summary))
    return summary.uri


def prepare_only(spec: TrainSpec, address: str | None = None, use_ray: bool = True,
                 progress: Callable[[Any], None] | None = None) -> Any:
    """`raybig prepare`: tokenize a train spec's data into token shards once (or find them), train nothing.

    Relative paths resolve against the working directory, as for `raybig run`; with `use_ray` the
    tokenizing runs as Ray Data tasks on an embedded local Ray (or `address`).

    Returns:
        The `raybig.data.prepare.PrepareSummary` (`reused` when a matching set already existed).

    Raises:
        raybig.data.sources.DataError (exit 2), raybig.data.prepare.DataWriteError (exit 1).
    """
    from raybig.data.prepare import prepare_spec, prepared_root
    from raybig.data.shards import check_shares
    from raybig.spec.paths_resolve import resolve_paths

    spec, _ = resolve_paths(spec)
    tok = None
    if spec.tokenizer_kind() != "bytes":
        from raybig.train.built import run_tokenizer

        tok = run_tokenizer(spec, run_dir_of(spec), 0, None)
    if use_ray:
        from raybig.cluster.ray_env import ensure_ray

        ensure_ray(address)
    summary = prepare_spec(spec.data, prepared_root(spec.data, spec.storage.path), tok, use_ray=use_ray,
                           progress=progress)
    check_shares(summary.uri, spec.data.seq_len, spec.train.micro_batch_size, spec.seed, spec.resources.workers,
                 packed=spec.data.is_packed())
    return summary


def build_trainer(spec: TrainSpec, queue: Any = None, resume_from: str | None = None,
                  python_path: list[str] | None = None, callbacks: list[Any] | None = None,
                  name: str | None = None, storage_path: str | None = None,
                  on_note: Callable[[str], None] | None = None) -> Any:
    """A TorchTrainer for `spec`. Re-running the same (storage, name) resumes automatically.

    Prepares the data first (`prepare_data`: token shards made once, reused while unchanged).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raybig.cluster.ray_env import worker_env

    r = spec.resources
    use_gpu = r.gpus_per_worker > 0
    per_worker = spec.worker_bundle()
    from raybig.train.failfast import FailFast

    spath, sfs = storage.ray_storage(storage_path or spec.storage.path)
    run_name = name or spec.name
    run_dir = storage.join(storage_path or spec.storage.path, run_name)
    # Token shards for language models; a classifier reads its labelled arrays in the workers
    # (raybig.train.classifiers), a custom task its plug-in dataset.
    lm = spec.task in ("causal_lm", "masked_lm")
    prepared = prepare_data(spec, run_dir, storage_path, on_note) if lm else None
    return TorchTrainer(
        _worker_entry,
        train_loop_config={"spec": spec, "queue": queue, "resume_from": resume_from,
                           "python_path": python_path or [], "prepared": prepared,
                           "run_dir": run_dir},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(  # type: ignore[call-arg]  # Train v2's RunConfig (the stubs are v1's)
            name=run_name, storage_path=spath, storage_filesystem=sfs,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures,  # type: ignore[call-arg]
                                         controller_failure_limit=3),
            worker_runtime_env={"env_vars": worker_env(use_gpu)},
            # FailFast: a worker error a restart cannot fix (missing file, bad data) is not retried.
            callbacks=[*(callbacks or []), FailFast()],  # type: ignore[list-item]  # a v2 controller callback
        ),
    )


def write_run_record(spec: TrainSpec, run_dir: str) -> None:
    """The resolved spec beside the outputs (secrets written back as ${VAR})."""
    storage.write_text(f"{run_dir}/{SPEC_FILE}", freeze(spec))
    storage.write_text(f"{run_dir}/{RUN_FILE}", json.dumps({"name": spec.name, "kind": spec.kind,
                                                          "spec_hash": spec_hash(spec)}, indent=2))


def run_train(spec: TrainSpec, address: str | None = None, resume_from: str | None = None,
              on_metrics: Callable[[dict[str, Any]], None] | None = None,
              python_path: list[str] | None = None, verbose: bool = False, sample: bool = False,
              on_note: Callable[[str], None] | None = None) -> TrainResult:
    """Train `spec` on Ray (embedded unless `address`/RAY_ADDRESS); blocks until done.

    Re-running the same (storage, name) resumes from its latest checkpoint.

    Args:
        spec: the train spec.
        address: Ray cluster to attach to; None: RAY_ADDRESS, else an embedded local Ray.
        resume_from: a checkpoint URI to start from (any fsspec URI).
        on_metrics: called on the driver with each metrics record rank 0 reports (progress display).
        python_path: folders added to sys.path on the workers (plug-in models).
        verbose: show Ray's and the workers' logs.
        sample: generate `spec.sample`'s text from the export at the end (loads the model here).
        on_note: gets one line about the data (prepared now, or reused).

    Returns:
        The run's `TrainResult` (with driver timings and, if `spec.sample` asks, a text sample).

    Raises:
        UsageError: `resume_from` does not exist (exit 2; nothing was started).
        PreflightError: the data, `init_from` or the checkpoint to resume cannot work (exit 2; nothing
            was started; see `raybig.train.preflight`).
        TrainingFailed: the run failed: at once for an error a restart cannot fix, else once its
            restarts (`checkpoint.max_failures`) are spent.
        IncompleteCheckpointError: `resume_from` is a partial checkpoint.
        CheckpointConversionError: the checkpoint was written by another worker count and DeepSpeed's
            universal conversion of it failed (`elastic_resume`; the checkpoint is unchanged).

    Relative paths in `spec` and `resume_from` resolve against the working directory, here, before
    anything starts (`raybig.spec.paths_resolve`); the spec.yaml in the run directory shows them absolute.
    """
    import ray
    from ray.train import TrainingFailedError
    from ray.util.queue import Queue

    from raybig.cluster.ray_env import check_gang_fits, ensure_ray
    from raybig.spec.paths_resolve import absolute, resolve_paths
    from raybig.train.preflight import preflight_run

    t0 = time.time()
    spec, _ = resolve_paths(spec)  # in the driver: Ray Train moves each worker to its own folder
    resume_from = absolute(resume_from) if resume_from else None
    if resume_from and not _exists(resume_from):  # before Ray starts: a typo costs nothing
        raise UsageError(f"--resume-from {resume_from}: no such checkpoint")
    from raybig.train.compat import check_resume_compatible

    # Before Ray starts and before spec.yaml is rewritten: a spec the run's checkpoint cannot carry
    # raises ResumeMismatch (exit 2); a run already complete returns its result without starting.
    plan = check_resume_compatible(spec, run_dir_of(spec))
    if plan.result is not None:
        return plan.result
    from raybig.train.compat import with_schedule

    spec = with_schedule(spec, plan)  # a changed train.steps continues the learning rate where it was
    # Before Ray starts: what no worker-group restart can fix (no data, too little of it, a
    # checkpoint from another world size) ends here in one line.
    preflight_run(spec, resume_from)
    # Another worker count than the checkpoint's: converted once, here, before Ray or any worker starts.
    converted = elastic_resume(spec, run_dir_of(spec), resume_from, on_note)
    resume_from = converted or resume_from
    from raybig.train.tracking import RunTracking

    tracking = RunTracking.for_spec(spec)  # an unreachable tracking store: TrackingError (exit 2), before Ray
    if spec.task == "classification":  # arrays that do not fit (labels, shapes): one line, before Ray
        from raybig.train.classifiers import split_for_spec

        split_for_spec(spec)
    r = spec.resources
    ensure_ray(address, num_cpus=r.workers * r.cpus_per_worker + 1,
               use_gpu=r.gpus_per_worker > 0, verbose=verbose)
    check_gang_fits(spec.worker_bundle(), r.workers, f"train {spec.name!r}")  # refuse now, not after minutes
    run_dir = run_dir_of(spec)
    write_run_record(spec, run_dir)
    tracking.start(spec, run_dir)  # params: the frozen spec (secrets as ${VAR}); never raises
    from raybig.train.checkpoints import recover_snapshot

    # A crash while Ray rewrote its checkpoint registry: resume from the newest complete folder.
    recovered = recover_snapshot(run_dir)
    resume_from = converted or recovered or resume_from  # a conversion already used what it would pick
    # Pinned to this (the driver's) node: with num_cpus=0 Ray may place it on a worker host, and
    # losing that host would silently cut off all later progress (history, metrics.jsonl, status).
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
    history: list[dict[str, Any]] = []
    stop = threading.Event()
    first_step_t: list[float] = []
    metrics_uri = f"{run_dir}/{METRICS_FILE}"
    if storage.exists(metrics_uri):
        history = [json.loads(line) for line in storage.read_text(metrics_uri).splitlines() if line]

    def pump() -> None:
        while not stop.is_set() or not queue.empty():
            try:
                m = queue.get(timeout=0.5)
            except Exception:
                continue
            m.pop("_t", None)
            if not first_step_t and m.get("step", 0) > 0:
                first_step_t.append(time.time() - t0)
            history.append(m)
            tracking.log(m)  # rank 0's record, here on the driver: a dead store never stalls a worker
            if on_metrics:
                on_metrics(m)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    first_step = max((h["step"] for h in history), default=0) or None
    try:
        trainer = build_trainer(spec, queue, resume_from, python_path=python_path or [os.getcwd()],
                                on_note=on_note)
        try:
            result = trainer.fit()
        except SystemExit as e:
            # Train v2's own SIGINT handler aborts the controller (stopping every worker), after
            # which its pending ray.get exits the process with SystemExit; surface it as Ctrl-C.
            raise KeyboardInterrupt from e
        except TrainingFailedError as e:  # Train v2's fit() raises once max_failures is spent
            raise TrainingFailed(_explain_failure(spec, e)) from e
    except BaseException as e:
        tracking.fail("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        stop.set()
        pumper.join(timeout=5)
        with contextlib.suppress(Exception):
            queue.shutdown()
        # Keep the history; a resumed run appends to it.
        storage.write_text(metrics_uri, "".join(json.dumps(h) + "\n" for h in dedupe_steps(history)))
    if result.error is not None:
        tracking.fail()
        raise TrainingFailed(_explain_failure(spec, result.error)) from result.error
    export = export_of(run_dir)
    res = TrainResult.from_history(
        spec.name, run_dir, history, checkpoint=result.checkpoint.path if result.checkpoint else None,
        export_dir=export, resumed_from_step=plan.resume_step if plan.resume_step is not None else first_step,
        seconds_to_first_step=round(first_step_t[0], 1) if first_step_t else None)
    if res.preempted_at_step is not None:
        tracking.fail("KILLED")  # preempted: checkpointed, not finished; the next attempt resumes it
    else:
        tracking.finish(export)  # the export as artifacts; status FINISHED
    if sample and export and res.preempted_at_step is None and spec.sample.max_new_tokens > 0 \
            and spec.task == "causal_lm":
        res.sample = sample_text(export, spec)
    res.seconds = round(time.time() - t0, 1)
    from raybig.train.result import write_result

    write_result(run_dir, res)  # run.json: name, kind, spec hash + the result with the driver's timings
    return res


def elastic_resume(spec: TrainSpec, run_dir: str, resume_from: str | None,
                   on_note: Callable[[str], None] | None = None) -> str | None:
    """The checkpoint the workers resume from, converted first if another worker count wrote it.

    The workers resume from Ray's latest checkpoint of the run, else `resume_from`. When that
    checkpoint's manifests name a world size other than `resources.workers` (ZeRO stage 1-3), it is
    converted to DeepSpeed's universal format in a new folder of the run
    (`raybig.train.universal.convert`; the checkpoint itself is untouched), and that folder is returned:
    the loop prefers it over Ray's checkpoint of the other size and loads it with `load_universal`.

    Args:
        spec: the train spec about to run (paths absolute).
        run_dir: the run directory.
        resume_from: `--resume-from` (or the checkpoint `recover_snapshot` chose), if any.
        on_note: gets one line saying what was converted and how long it took.

    Returns:
        The universal folder's URI, or None when no conversion is needed.

    Raises:
        CheckpointConversionError: DeepSpeed's conversion failed (exit 1, one line; nothing started).
        IncompleteCheckpointError: the checkpoint to convert is missing files (exit 1).
    """
    from raybig.train.checkpoints import latest_checkpoint, newest_complete_checkpoint, world_size_of
    from raybig.train.universal import conversion_needed, convert, universal_path

    try:
        source = latest_checkpoint(run_dir) or resume_from
    except (OSError, ValueError, KeyError, AttributeError):  # what recover_snapshot will pick
        source = newest_complete_checkpoint(run_dir) or resume_from
    if source is None:
        return None
    ws = world_size_of(source)
    if ws is None or not conversion_needed(spec, ws):
        return None
    conv = convert(source, universal_path(run_dir, source, ws), spec.deepspeed.zero_stage)
    if on_note is not None:
        how = "found converted" if conv.reused else f"converted in {conv.seconds:.1f} s"
        on_note(f"elastic resume: step {conv.step} of {ws} workers -> {spec.resources.workers} workers "
                f"(ZeRO-{spec.deepspeed.zero_stage} universal checkpoint {how}; the data stream changes with "
                f"the worker count)")
    return conv.path


def _exists(uri: str) -> bool:
    try:
        return storage.exists(uri)
    except Exception:  # noqa: BLE001 - e.g. credentials only the workers have: let them try
        return True


def sample_text(export_dir: str, spec: TrainSpec) -> str:
    """Text generated from the export by `spec.sample`, with the run's tokenizer (`raybig.train.sample`)."""
    from raybig.train.sample import sample_text as _sample

    return _sample(export_dir, spec)


def _explain_failure(spec: TrainSpec, err: BaseException) -> str:
    """One line a user can act on: whether restarts were spent, and the root cause (`train.causes`).

    Ray's own message starts with 'Training failed due to worker errors:' and buries the cause
    (a dead node, a crashed rank) many lines further down.
    """
    from raybig.train.causes import root_cause, worker_node

    failure = getattr(err, "controller_failure", None)
    if type(failure).__name__ == "NotRetried":  # raybig.train.failfast: a restart cannot fix it
        return f"training failed (not retried: a restart cannot fix this): {failure}"[:1000]
    cause = root_cause(err)
    node = worker_node(err)
    where = f" (a worker on {node})" if node and node not in cause else ""
    mf = spec.checkpoint.max_failures
    return (f"training failed and its worker-group restarts are spent (checkpoint.max_failures={mf}): "
            f"{cause}{where}")[:1000]

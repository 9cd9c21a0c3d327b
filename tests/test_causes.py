"""The cause-finder (`raybig.train.causes`) over a table of real exceptions and real failure texts."""

from __future__ import annotations

import traceback

import pytest

from raybig.errors import IncompleteCheckpointError, TrainingFailed
from raybig.train.causes import cause_from_text, is_deterministic, root_cause

pytestmark = pytest.mark.unit


def _raised(exc: BaseException) -> BaseException:
    """`exc` after a real raise (so it has a traceback)."""
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001
        return e


def _chained() -> BaseException:
    try:
        try:
            open("/nonexistent/corpus/part1.txt")
        except FileNotFoundError as e:
            raise RuntimeError("could not load the corpus") from e
    except RuntimeError as e:
        return e
    raise AssertionError


def _context() -> BaseException:
    try:
        try:
            {}["n_layer"]
        except KeyError:
            raise ValueError("bad model config") from None  # suppressed: the ValueError is the root
    except ValueError as e:
        return e
    raise AssertionError


def _implicit_context() -> BaseException:
    try:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            raise OSError("disk full")  # noqa: B904 - implicit context on purpose
    except OSError as e:
        return e
    raise AssertionError


def _torch_oom() -> BaseException:
    import torch

    return _raised(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; "
                                          "79.15 GiB total capacity)"))


def _ray_task_error(cause: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    tb = "".join(traceback.format_exception(cause))
    return RayTaskError("load_shard", tb, cause, pid=4242, ip="10.0.0.7").as_instanceof_cause()


def _user_exc(cause: BaseException) -> BaseException:
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    return UserExceptionWithTraceback(cause, "Traceback (most recent call last):\n"
                                      + "".join(traceback.format_exception(cause)))


def _worker_group_error(failures: dict[int, BaseException]) -> BaseException:
    from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus

    status = WorkerGroupPollStatus(worker_statuses={r: WorkerStatus(running=False, error=e)
                                                    for r, e in failures.items()})
    return status.get_worker_group_error()


def _controller_error(cause: BaseException) -> BaseException:
    from ray.train import ControllerError

    return ControllerError(cause)


def _wrapped_in_training_failed() -> BaseException:
    inner = _worker_group_error({0: _user_exc(_raised(FileNotFoundError("data.path 'corpus/*.txt' matched no "
                                                                      "files")))})
    try:
        raise TrainingFailed("training failed (not retried): FileNotFoundError: data.path 'corpus/*.txt' "
                             "matched no files") from inner
    except TrainingFailed as e:
        return e


# (case, exception factory, the cause line must contain each of these)
EXCEPTIONS = [
    ("plain builtin", lambda: _raised(FileNotFoundError(2, "No such file or directory", "/data/x.txt")),
     ["FileNotFoundError: [Errno 2] No such file or directory: '/data/x.txt'"]),
    ("explicit __cause__", _chained, ["FileNotFoundError:", "/nonexistent/corpus/part1.txt"]),
    ("suppressed context", _context, ["ValueError: bad model config"]),
    ("implicit __context__", _implicit_context, ["ZeroDivisionError: division by zero"]),
    ("module-qualified torch OOM", _torch_oom, ["torch.OutOfMemoryError: CUDA out of memory."]),
    ("RayTaskError(FileNotFoundError)", lambda: _ray_task_error(_raised(FileNotFoundError("shard 3 is gone"))),
     ["FileNotFoundError: shard 3 is gone"]),
    ("worker group, one rank", lambda: _worker_group_error({0: _user_exc(_raised(ValueError("corpus too small")))}),
     ["ValueError: corpus too small"]),
    ("worker group, OOM on rank 1, collateral on 0", lambda: _worker_group_error({
        0: _user_exc(_raised(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                                          "Connection closed by peer [10.0.0.5]:4242"))),
        1: _user_exc(_torch_oom())}),
     ["torch.OutOfMemoryError: CUDA out of memory."]),
    ("controller error", lambda: _controller_error(_raised(IncompleteCheckpointError(
        "checkpoint /runs/x/checkpoint_1 is incomplete: rank 1's manifest is missing"))),
     ["IncompleteCheckpointError: checkpoint /runs/x/checkpoint_1 is incomplete"]),
    ("raybig summary kept", _wrapped_in_training_failed,
     ["TrainingFailed: training failed (not retried): FileNotFoundError: data.path"]),
]


@pytest.mark.parametrize(("case", "make", "want"), EXCEPTIONS, ids=[c[0] for c in EXCEPTIONS])
def test_root_cause_of_exceptions(case: str, make, want: list[str]) -> None:
    line = root_cause(make())
    assert "\n" not in line
    for w in want:
        assert w in line, (case, line)


# Texts as they reach a log or a job message (copied from real runs; paths shortened).
TEXTS = [
    ("worker-group text, module-qualified",
     """ray.train.v2.api.exceptions.WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
Traceback (most recent call last):
  File "/work/main/raybig/train/runner.py", line 73, in _worker_entry
    train_worker(spec, _RayReporter(config.get("queue"), spec), config["run_dir"], config.get("resume_from"))
  File "/work/main/raybig/train/loop.py", line 114, in train_worker
    _, client = engine.load_checkpoint(resume, load_optimizer_states=True,
  File "/work/main/.venv/lib/python3.11/site-packages/deepspeed/runtime/zero/stage_1_and_2.py", line 2341, in _load_legacy_checkpoint
    assert self.partition_count == ckpt_partition_count
deepspeed.runtime.zero.utils.ZeRORuntimeException: The checkpoint being loaded used a DP world size of 2 but the current world size is 1.
""", ["deepspeed.runtime.zero.utils.ZeRORuntimeException: The checkpoint being loaded used a DP world size of 2",
      "(rank 0)"]),
    ("bare assert in a snippet",
     """Training failed due to worker errors:
[Rank 0,1 Error Snippet]:
Traceback (most recent call last):
  File "stage_1_and_2.py", line 2341, in _load_legacy_checkpoint
    assert self.partition_count == ckpt_partition_count
AssertionError
""", ["AssertionError", "(rank 0,1)"]),
    ("chained traceback text: root first",
     """Traceback (most recent call last):
  File "a.py", line 3, in f
    open(p)
FileNotFoundError: [Errno 2] No such file or directory: 'corpus/part1.txt'

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "b.py", line 9, in g
    raise RuntimeError("loading failed") from e
RuntimeError: loading failed
""", ["FileNotFoundError: [Errno 2] No such file or directory: 'corpus/part1.txt'"]),
    ("RayTaskError(X) text",
     """ray.exceptions.RayTaskError(FileNotFoundError): ray::read_shard() (pid=123, ip=10.0.0.7)
  File "shards.py", line 40, in read_shard
    raise FileNotFoundError(p)
FileNotFoundError: /data/shard-00003.bin
""", ["FileNotFoundError: /data/shard-00003.bin"]),
    ("dead actor",
     """Training failed due to worker errors:
[Rank 1 Error Snippet]:
The actor died unexpectedly before finishing this task.
\tclass_name: RayTrainWorker
\tactor_id: 5f3
\tpid: 3124
\tnode_id: 0a1
\tip: 10.0.0.9
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR
""", ["The actor is dead because its worker process has died", "(rank 1)"]),
    ("torch OOM in a log tail",
     """[raybig] state {"state": "RUNNING"}
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.10 GiB
""", ["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB."]),
]


@pytest.mark.parametrize(("case", "text", "want"), TEXTS, ids=[c[0] for c in TEXTS])
def test_root_cause_of_texts(case: str, text: str, want: list[str]) -> None:
    line = cause_from_text(text)
    assert "\n" not in line
    for w in want:
        assert w in line, (case, line)


def test_deterministic_errors() -> None:
    """Restarts are not spent on missing files or raybig's own input errors; OOM and crashes retry."""
    from raybig.data.sources import DataError

    assert is_deterministic(_user_exc(_raised(FileNotFoundError("x"))))
    assert is_deterministic(_user_exc(_raised(DataError("data.path 'x' matched no files"))))
    assert is_deterministic(_ray_task_error(_raised(FileNotFoundError("x"))))
    assert is_deterministic(_chained())
    assert not is_deterministic(_user_exc(_torch_oom()))
    assert not is_deterministic(_user_exc(_raised(RuntimeError("NCCL timeout"))))
    assert not is_deterministic("FileNotFoundError: x")  # text alone is never enough to stop a run

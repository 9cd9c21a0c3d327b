"""Checks a train spec must pass before any worker starts: what a worker-group restart cannot fix.

Each failure here would otherwise surface inside the workers, after Ray Train spent its
`checkpoint.max_failures` restarts on it. Run once in the driver (`run_train`, before Ray starts)
and by `raybig validate` for the local, cheap ones (globs and file sizes). No torch, no Ray.

- `data.path`: a local path or glob that matches no files; a corpus too small for one training
  sequence per worker once the validation hold-out is taken (a 12-byte file: all of it is held out).
- `init_from`: a local path that does not exist.
- resuming (`--resume-from`, or a re-run of the same run): only a complete checkpoint; one written at
  another world size (its per-rank manifests, `raybig.train.checkpoints`) is converted by the runner
  (`raybig.train.universal`), except a LoRA adapter-only one, refused here.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from raybig.errors import IncompleteCheckpointError, RaybigError, UsageError


class PreflightError(UsageError):
    """A train spec cannot run as given and nothing was started (exit 2)."""


def _local(path: str) -> str | None:
    """The local filesystem path of `path` (plain or `file://`), or None for other protocols."""
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if "://" in path else os.path.expanduser(path)


def local_files(path: str) -> list[str] | None:
    """Files a local data path (file, folder, glob) names, sorted; None if it is not local."""
    p = _local(path)
    if p is None:
        return None
    if os.path.isdir(p):
        return sorted(os.path.join(r, n) for r, _, names in os.walk(p) for n in names)
    if glob.has_magic(p):
        return sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
    return [p] if os.path.isfile(p) else []


def min_corpus_tokens(seq_len: int, workers: int, val_fraction: float) -> int:
    """Fewest corpus tokens that leave each worker one training sequence after the hold-out.

    The rule of `raybig.data.text.Batches`: the last max(len * val_fraction, seq_len + 2) tokens are
    held out, and each worker's shard of the rest must be longer than seq_len + 1.
    """
    n = workers * (seq_len + 2) + seq_len + 2
    while _train_shard(n, seq_len, workers, val_fraction) <= seq_len + 1:
        n += max(1, n // 64)
    return n


def _train_shard(n: int, seq_len: int, workers: int, val_fraction: float) -> int:
    n_val = max(int(n * val_fraction), seq_len + 2)
    return (n - n_val) // workers


def data_problems(spec: Any) -> list[str]:
    """Problems with `spec.data` found from local globs and file sizes (remote paths are skipped)."""
    d = spec.data
    paths = d.path if isinstance(d.path, list) else [d.path]
    files: list[str] = []
    for p in paths:
        if not isinstance(p, str) or p.startswith("stdlib://"):
            return []
        found = local_files(p)
        if found is None:
            return []  # s3://, gs://, ...: listed by the data layer, with the workers' credentials
        if not found:
            hint = ""
            if not os.path.isabs(os.path.expanduser(_local(p) or p)):
                hint = f" (relative paths resolve against {os.getcwd()})"
            return [f"data.path {p!r} matched no files{hint}"]
        files += found
    if d.example_format() != "text" or d.file_format() != "text":
        return []  # record bytes are not text tokens: the driver checks every rank's prepared share
    cap = d.token_limit()
    total = 0
    for f in files:
        total += os.path.getsize(f) + 2  # the loader separates files with two newlines
        if cap and total >= cap:
            break
    workers = spec.resources.workers
    need = min_corpus_tokens(d.seq_len, workers, d.val_fraction)
    if total < need:
        return [f"data.path {paths[0]!r}: the corpus is {total - 2 * len(files)} bytes, too small for one "
                f"training sequence of data.seq_len={d.seq_len} per worker ({workers}) after "
                f"data.val_fraction={d.val_fraction} is held out (at least {need} bytes needed)"]
    return []


def checkpoint_world_size(path: str) -> int | None:
    """The world size that wrote a raybig checkpoint folder (from rank 0's manifest), or None.

    None also for a universal folder (`raybig.train.universal`): any world size resumes from it.
    """
    from raybig.train.checkpoints import world_size_of

    return world_size_of(path)


def resume_problems(spec: Any, checkpoint: str, flag: str = "--resume-from") -> list[str]:
    """What keeps a checkpoint written at another world size from resuming `spec`.

    A ZeRO-1/2/3 checkpoint of W != resources.workers workers is converted on the driver before the
    workers start (`raybig.train.universal`); only what that conversion cannot carry is refused here
    (a LoRA adapter-only checkpoint).
    """
    from raybig.train.universal import conversion_needed, refusal

    ws = checkpoint_world_size(checkpoint)
    if ws is None or not conversion_needed(spec, ws):
        return []
    why = refusal(spec, ws)
    if why is None:
        return []
    return [f"{flag} {checkpoint} was written by {ws} workers but resources.workers is "
            f"{spec.resources.workers}: {why}"]


def preflight(spec: Any, resume_from: str | None = None, auto_resume: str | None = None) -> None:
    """Raise one `PreflightError` (exit 2) or `IncompleteCheckpointError` (exit 1) for what would fail.

    Args:
        spec: a train spec whose paths are already absolute (`raybig.spec.paths_resolve`).
        resume_from: the `--resume-from` checkpoint, if any.
        auto_resume: the checkpoint a re-run of the same run resumes from (Ray's latest), if any.
    """
    problems = data_problems(spec)
    init = getattr(spec, "init_from", None)
    if init and _local(init) is not None and not os.path.exists(_local(init) or init):
        problems.append(f"init_from {init!r}: no such export or checkpoint")
    ckpt, flag = (auto_resume, "the run's latest checkpoint") if auto_resume else (resume_from, "--resume-from")
    if ckpt:
        problems += resume_problems(spec, ckpt, flag)
        if not problems:
            _require_complete(ckpt)
    if problems:
        raise PreflightError("; ".join(problems))


def preflight_run(spec: Any, resume_from: str | None = None) -> None:
    """`preflight` for a run about to start: also checks the checkpoint a re-run resumes from."""
    from raybig.train.checkpoints import latest_checkpoint

    run_dir = f"{spec.storage.path.rstrip('/')}/{spec.name}"
    try:
        auto = latest_checkpoint(run_dir)
    except Exception:  # noqa: BLE001 - an unreadable registry is recover_snapshot's case, later
        auto = None
    preflight(spec, resume_from, auto_resume=auto)


def _require_complete(path: str) -> None:
    from raybig.train.checkpoints import require_complete

    try:
        require_complete(path)
    except IncompleteCheckpointError:
        raise
    except (OSError, RaybigError, ValueError):
        pass  # unreadable here (e.g. credentials only the workers have): the workers check again


__all__ = ["PreflightError", "checkpoint_world_size", "data_problems", "local_files", "min_corpus_tokens",
           "preflight", "preflight_run", "resume_problems"]

"""Which checkpoints of a run are complete, and which one a resume uses.

A checkpoint folder is published in pieces: every rank saves its DeepSpeed shard into its own local
temp dir, then Ray Train copies each rank's files into one `<run>/checkpoint_<time>/` folder, and
only after every rank has copied does the controller register it in
`checkpoint_manager_snapshot.json`. A crash mid-copy leaves a partial folder on storage that was
never registered; a resume must never pick it.

Ray rewrites that snapshot in place, so a crash in the middle of that write can leave it unreadable;
`recover_snapshot` then moves it aside and names the newest complete folder to resume from instead.

Two guards, independent of each other:
- raybig resumes only from what Ray registered (`latest_checkpoint`), and
- every rank writes a manifest beside its shard (`write_manifest`: each file's size, then the rank
  and world size). A folder is complete only if all `world_size` manifests are present and every
  file they list is there at its size (`verify`), whatever order the copies landed in. A resume
  refuses an incomplete folder with an error naming what is missing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from raybig import storage
from raybig.errors import IncompleteCheckpointError

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train v2's registry of reported checkpoints
MANIFEST = "raybig-manifest-rank{rank}.json"


def write_manifest(local_dir: str, rank: int, world_size: int, step: int) -> str:
    """List this rank's files (relative path -> size) into its manifest, written last."""
    files: dict[str, int] = {}
    for root, _, names in os.walk(local_dir):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, local_dir)] = os.path.getsize(p)
    path = os.path.join(local_dir, MANIFEST.format(rank=rank))
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, "world_size": world_size, "step": step, "files": files}, f)
    os.replace(path + ".tmp", path)  # a manifest is itself never half-written
    return path


@dataclass
class CheckpointCheck:
    """What `verify` found: complete or not, the step and world size the manifests name, and why not."""

    path: str
    complete: bool
    step: int | None = None
    world_size: int | None = None
    problems: list[str] = field(default_factory=list)


def verify(path: str) -> CheckpointCheck:
    """Is the checkpoint folder at `path` (any fsspec URI) complete, by its ranks' manifests?"""
    fs, root = storage.fs_for(path)
    root = root.rstrip("/")
    m0 = f"{root}/{MANIFEST.format(rank=0)}"
    if not fs.exists(m0):
        return CheckpointCheck(path, False, problems=[f"no {MANIFEST.format(rank=0)} (rank 0's manifest)"])
    try:
        first = json.loads(fs.cat_file(m0))
    except ValueError as e:
        return CheckpointCheck(path, False, problems=[f"rank 0's manifest is unreadable: {e}"])
    ws, step = int(first["world_size"]), int(first["step"])
    problems: list[str] = []
    sizes = {_rel(root, i["name"]): int(i["size"]) for i in fs.find(root, detail=True).values()}
    for r in range(ws):
        name = MANIFEST.format(rank=r)
        if name not in sizes:
            problems.append(f"rank {r}'s manifest is missing")
            continue
        try:
            man = json.loads(fs.cat_file(f"{root}/{name}"))
        except ValueError as e:
            problems.append(f"rank {r}'s manifest is unreadable: {e}")
            continue
        for rel, size in man["files"].items():
            if rel not in sizes:
                problems.append(f"rank {r}: {rel} is missing")
            elif sizes[rel] != size:
                problems.append(f"rank {r}: {rel} has {sizes[rel]} of {size} bytes")
    return CheckpointCheck(path, not problems, step, ws, problems)


def world_size_of(path: str) -> int | None:
    """The world size that wrote a checkpoint folder (any fsspec URI), from rank 0's manifest.

    None when there is no readable manifest, and for a universal folder (`raybig.train.universal`),
    which any world size resumes from.
    """
    m0 = storage.join(path, MANIFEST.format(rank=0))
    try:
        if not storage.exists(m0):
            return None
        man = json.loads(storage.read_text(m0))
        return None if man.get("universal") else int(man["world_size"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _rel(root: str, name: str) -> str:
    return name[len(root):].lstrip("/") if name.startswith(root) else name


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint a re-run of this run resumes from: the newest Ray registered (None: start over)."""
    snap = storage.join(run_dir, SNAPSHOT)
    if not storage.exists(snap):
        return None
    latest = (json.loads(storage.read_text(snap)).get("latest_checkpoint_result") or {})
    name = latest.get("checkpoint_dir_name")
    return storage.join(run_dir, name) if name else None


def require_complete(path: str) -> None:
    """Refuse a partial checkpoint before DeepSpeed reads it (it would fail on some rank, or worse).

    Folders from before manifests existed are let through: DeepSpeed's own `latest` tag still guards.
    Raises IncompleteCheckpointError.
    """
    fs, root = storage.fs_for(path)
    if not any(os.path.basename(p).startswith("raybig-manifest-") for p in fs.ls(root, detail=False)):
        return
    check = verify(path)
    if not check.complete:
        raise IncompleteCheckpointError(f"checkpoint {path} is incomplete (a crash while it was being "
                                        f"written?): {'; '.join(check.problems[:5])}")


def newest_complete_checkpoint(run_dir: str) -> str | None:
    """The highest-step checkpoint folder of the run whose manifests verify (registered or not)."""
    fs, root = storage.fs_for(run_dir)
    best: tuple[int, str] | None = None
    for p in fs.glob(f"{root.rstrip('/')}/checkpoint_*"):
        uri = storage.join(run_dir, os.path.basename(p))
        check = verify(uri)
        if check.complete and check.step is not None and (best is None or check.step > best[0]):
            best = (check.step, uri)
    return best[1] if best else None


def recover_snapshot(run_dir: str) -> str | None:
    """Repair a run whose Ray checkpoint snapshot is unreadable; return a checkpoint to resume from.

    If Ray's snapshot is unreadable or names a folder that is gone, move it aside (Ray would refuse
    to start the run) and return the newest complete checkpoint, if any.
    """
    snap = storage.join(run_dir, SNAPSHOT)
    if not storage.exists(snap):
        return None
    try:
        state = json.loads(storage.read_text(snap))
        names = [r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])]
        if all(storage.exists(storage.join(run_dir, n)) for n in names):
            return None
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    fs, path = storage.fs_for(snap)
    fs.mv(path, f"{path}.unreadable")
    return newest_complete_checkpoint(run_dir)

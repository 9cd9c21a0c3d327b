"""Elastic resume: a ZeRO checkpoint written by W workers, converted to resume on N != W.

DeepSpeed partitions ZeRO-1/2/3 optimizer state (and ZeRO-3 weights) per data-parallel rank, and its
`load_checkpoint` refuses another world size. Its universal-checkpoint format stores every parameter
whole (`zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt`), which any world size can load with the
config `"checkpoint": {"load_universal": true}`.

Where and when: on the driver (`raybig.train.runner.run_train`), once, before any worker starts. The
checkpoint is read (downloaded first if remote), converted by DeepSpeed's own
`deepspeed.checkpoint.ds_to_universal` in a child process, and the result published as a new folder
in the run directory, `universal_<checkpoint>_from<W>/`; the old checkpoint is never written to. A
restart of the driver finds the folder complete (by its manifest) and does not convert again.

The folder is what the training loop resumes from: DeepSpeed's `latest_universal` and `latest` files,
the tag folder (model-states files, which carry raybig's `client_state` step and data position), a
`raybig-universal.json` record (source, its world size, step, ZeRO stage, seconds) and one manifest
(`raybig.train.checkpoints`, `"universal": true`) written last, so a cut-short upload is refused.

ZeRO stage 0 needs no conversion (each rank holds the whole optimizer state). A LoRA checkpoint holds
only the adapter and is refused: resume it at the world size that wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from raybig import storage
from raybig.errors import CheckpointConversionError, first_line
from raybig.train.checkpoints import MANIFEST, require_complete, verify, write_manifest

LATEST_UNIVERSAL = "latest_universal"  # DeepSpeed reads the tag from it when load_universal is on
RECORD = "raybig-universal.json"


@dataclass
class Conversion:
    """One converted checkpoint.

    Attributes:
        source: the checkpoint converted (left unchanged).
        path: the universal folder (any fsspec URI) the workers resume from.
        source_world_size: workers that wrote `source`.
        step: the optimizer step both hold.
        seconds: conversion time (0.0 when an earlier conversion was reused).
        bytes: size of the source checkpoint folder in bytes.
        reused: an earlier complete conversion was found and used.
    """

    source: str
    path: str
    source_world_size: int
    step: int
    seconds: float
    bytes: int
    reused: bool = False


def is_universal(local_dir: str) -> bool:
    """True if the local folder is a universal checkpoint (has DeepSpeed's `latest_universal` file)."""
    return os.path.isfile(os.path.join(local_dir, LATEST_UNIVERSAL))


def universal_path(run_dir: str, checkpoint: str, world_size: int) -> str:
    """Where the conversion of `checkpoint` (written by `world_size` workers) goes: in `run_dir`."""
    name = storage.normalize(checkpoint).rstrip("/").rsplit("/", 1)[-1]
    return storage.join(run_dir, f"universal_{name}_from{world_size}")


def conversion_needed(spec: Any, world_size: int | None) -> bool:
    """A checkpoint written by `world_size` workers must be converted to resume `spec`.

    False for an unknown world size (no manifest), the same one, ZeRO stage 0 (each rank saved the
    whole optimizer) and an already universal folder (world size None).
    """
    return (world_size is not None and world_size != spec.resources.workers
            and spec.deepspeed.zero_stage > 0)


def refusal(spec: Any, world_size: int) -> str | None:
    """Why a checkpoint of `world_size` workers cannot be converted for `spec`, or None."""
    if spec.finetune.method == "lora":
        return (f"a LoRA checkpoint holds only the adapter, which DeepSpeed's universal conversion cannot "
                f"rebuild; set resources.workers: {world_size} (the size that wrote it), or start from "
                f"its weights with init_from")
    return None


def convert(checkpoint: str, out: str, zero_stage: int, timeout_s: float = 3600.0) -> Conversion:
    """Convert the raybig ZeRO checkpoint folder `checkpoint` into a universal one at `out`.

    `checkpoint` is only read (a remote one is downloaded into a temp folder). The result is built in
    a local temp folder and published to `out` (renamed into place locally; uploaded with the
    manifest last elsewhere). A complete `out` from an earlier call is reused.

    Args:
        checkpoint: a checkpoint folder Ray Train registered (any fsspec URI), with raybig manifests.
        out: the universal folder to create (any fsspec URI); must not be inside `checkpoint`.
        zero_stage: the run's ZeRO stage (recorded; DeepSpeed reads the stage from the files).
        timeout_s: bound on DeepSpeed's conversion, in seconds.

    Returns:
        The `Conversion` (source, path, world size, step, seconds, source bytes).

    Raises:
        IncompleteCheckpointError: `checkpoint` is missing files its manifests list.
        CheckpointConversionError: DeepSpeed's conversion or the publishing failed (one line; the
            checkpoint is unchanged and no partial `out` is left behind).
    """
    require_complete(checkpoint)
    check = verify(checkpoint)
    ws, step = check.world_size or 0, check.step or 0
    if storage.exists(storage.join(out, MANIFEST.format(rank=0))) and verify(out).complete:
        return Conversion(checkpoint, out, ws, step, 0.0, _size(checkpoint), reused=True)
    what = f"checkpoint {checkpoint} (ZeRO-{zero_stage}, written by {ws} workers, step {step})"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raybig-universal-") as tmp:
        try:
            src = storage.download_dir(checkpoint, os.path.join(tmp, "src"))
            tag = _tag(src)
            built = os.path.join(tmp, "out")
            _run_ds_to_universal(os.path.join(src, tag), os.path.join(built, tag), timeout_s)
            _finish(built, src, tag, checkpoint, ws, step, zero_stage, time.perf_counter() - t0)
            _publish(built, out)
        except CheckpointConversionError as e:
            raise CheckpointConversionError(f"converting {what} for another worker count failed: {e}; "
                                            "the checkpoint is unchanged") from None
        except (OSError, ValueError, KeyError) as e:
            _remove(out)
            raise CheckpointConversionError(f"converting {what} for another worker count failed: "
                                            f"{first_line(e)}; the checkpoint is unchanged") from e
    return Conversion(checkpoint, out, ws, step, round(time.perf_counter() - t0, 3), _size(checkpoint))


def _tag(local: str) -> str:
    latest = os.path.join(local, "latest")
    if not os.path.isfile(latest):
        raise CheckpointConversionError("no `latest` file (not a DeepSpeed checkpoint)")
    with open(latest) as f:
        tag = f.read().strip()
    if not tag or "/" in tag or not os.path.isdir(os.path.join(local, tag)):
        raise CheckpointConversionError(f"`latest` names {tag[:60]!r}, which is not a folder there")
    return tag


def _run_ds_to_universal(src_tag: str, out_tag: str, timeout_s: float) -> None:
    """DeepSpeed's converter in a child process (its prints, pools and memory stay out of the driver)."""
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    cmd = [sys.executable, "-m", "raybig.train.universal", src_tag, out_tag]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise CheckpointConversionError(f"DeepSpeed's ds_to_universal ran past {timeout_s:.0f} s") from None
    if p.returncode != 0:
        raise CheckpointConversionError(f"DeepSpeed's ds_to_universal failed: {_last_error(p.stderr)}")


def _last_error(stderr: str) -> str:
    """The exception line of a child's traceback (its last line naming an error), else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if "Weights only load failed" in ln:  # torch's advice to load unsafely does not apply here
            return f"{head}: a checkpoint file is not a plain torch tensor file (damaged, or it needs pickled code)"
        if head.endswith(("Error", "Exception")) or head.endswith("Exit"):
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


def _finish(built: str, src: str, tag: str, checkpoint: str, ws: int, step: int, zero_stage: int,
            seconds: float) -> None:
    """Make the converted folder one the loop resumes from: `latest`, the record, the manifest last."""
    if not os.path.isfile(os.path.join(built, LATEST_UNIVERSAL)):
        raise CheckpointConversionError("DeepSpeed wrote no latest_universal file")
    shutil.copyfile(os.path.join(src, "latest"), os.path.join(built, "latest"))
    with open(os.path.join(built, RECORD), "w") as f:
        json.dump({"source": checkpoint, "source_world_size": ws, "step": step, "tag": tag,
                   "zero_stage": zero_stage, "seconds": round(seconds, 3)}, f)
    path = write_manifest(built, 0, 1, step)
    with open(path) as f:  # mark it: any world size resumes from it (checkpoint_world_size reads this)
        man = json.load(f)
    man["universal"] = True
    with open(path, "w") as f:
        json.dump(man, f)


def _publish(built: str, out: str) -> None:
    """Put the local folder `built` at `out`: a rename locally, else an upload with the manifest last."""
    _remove(out)
    if storage.is_local(out):
        dest = storage.normalize(out)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        staging = f"{dest}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(built, staging)
        os.replace(staging, dest)
        return
    manifest = os.path.join(built, MANIFEST.format(rank=0))
    held = manifest + ".last"
    os.replace(manifest, held)
    fs, path = storage.fs_for(out)
    fs.put(built.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    fs.put_file(held, f"{path.rstrip('/')}/{MANIFEST.format(rank=0)}")


def _remove(out: str) -> None:
    try:
        fs, path = storage.fs_for(out)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError:
        pass


def _size(uri: str) -> int:
    try:
        fs, path = storage.fs_for(uri)
        return int(sum(fs.du(path, total=False).values()))
    except (OSError, ValueError):
        return 0


def _main(argv: list[str]) -> int:
    """`python -m raybig.train.universal SRC_TAG_DIR OUT_TAG_DIR`: DeepSpeed's conversion, safely loaded."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main

    from raybig.train.export import weights_only_loads

    n = max(1, min(4, os.cpu_count() or 1))
    args = argparse.Namespace(input_folder=argv[0], output_folder=argv[1], num_extract_workers=n,
                              num_merge_workers=max(1, n // 2), keep_temp_folder=False, strict=True,
                              # raybig's models set no universal_checkpoint_info: DeepSpeed's default
                              # (no tensor or pipeline parallelism) is right for them.
                              inject_missing_state=True)
    with weights_only_loads():  # a --resume-from checkpoint may be anyone's: no pickled code runs
        main(args)
    return 0


__all__ = ["LATEST_UNIVERSAL", "RECORD", "Conversion", "conversion_needed", "convert", "is_universal",
           "refusal", "universal_path"]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m raybig.train.universal SRC_TAG_DIR OUT_TAG_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(_main(sys.argv[1:]))

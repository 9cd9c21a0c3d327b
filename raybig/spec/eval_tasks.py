"""lm-eval task files, read and checked without lm-eval or torch (so `raybig validate` can check them).

A task is a shipped task's name (a `*.yaml` in `raybig/eval/tasks/`) or a path to an lm-eval task
YAML whose data is local (`dataset_path: json|csv|parquet|text|arrow` with
`dataset_kwargs.data_files` relative to the YAML). `raybig.eval.harness` runs them; this module only
finds and checks them, so the spec layer can refuse a malformed or unknown task at validate time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raybig.errors import EvalTaskError

TASKS_DIR = Path(__file__).resolve().parent.parent / "eval" / "tasks"
"""Where the shipped task YAMLs and their jsonl live (`raybig/eval/tasks/`)."""

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
LOCAL_FORMATS = ("json", "csv", "parquet", "text", "arrow")
"""`dataset_path` values `datasets.load_dataset` reads from local files (anything else is a Hub id)."""


def list_tasks(tasks_dir: str | Path = TASKS_DIR) -> list[str]:
    """Task names shipped in `tasks_dir`: the stems of its `*.yaml` files, sorted."""
    return sorted(p.stem for p in Path(tasks_dir).glob("*.yaml"))


def is_task_path(task: str) -> bool:
    """Whether `task` names a task file (ends in .yaml/.yml) rather than a shipped task."""
    return task.endswith((".yaml", ".yml"))


def _task_file(task: str, tasks_dir: Path) -> Path:
    if is_task_path(task):
        path = Path(os.path.expanduser(task))
    else:
        path = tasks_dir / f"{task}.yaml"
    if not path.is_file():
        if is_task_path(task):
            raise EvalTaskError(f"eval task file {task!r} does not exist")
        from raybig.spec.issues import did_you_mean

        names = list_tasks(tasks_dir)
        raise EvalTaskError(f"unknown eval task {task!r}{did_you_mean(task, names)} (shipped tasks: "
                            f"{', '.join(names)}; or give a path to a task .yaml); no file {path}")
    return path


def _check_jsonl(path: Path, where: str) -> None:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalTaskError(f"{path}:{n}: {where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvalTaskError(f"{path}:{n}: {where}: each line must be a JSON object")


def load_task_config(task: str, tasks_dir: str | Path = TASKS_DIR) -> dict[str, Any]:
    """Read and check one task file; returns its config with `data_files` made absolute.

    Args:
        task: a shipped task's name (`<tasks_dir>/<task>.yaml`) or a path to a `.yaml` task file.
        tasks_dir: where names are looked up.

    Raises:
        EvalTaskError: (one line, `file[:line]: what`) the task is unknown or the file is missing,
            not YAML, not a mapping, lacks `task`/`dataset_path`/`output_type`/`doc_to_target` (or
            `doc_to_choice` for multiple choice), uses `include:` or a Hub dataset, or names data
            files that are missing or (jsonl) not one JSON object per line.
    """
    import yaml

    path = _task_file(task, Path(tasks_dir))
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else "?"
        raise EvalTaskError(f"{path}:{line}: not valid YAML: {e.problem}") from None
    except yaml.YAMLError as e:  # e.g. an lm-eval `!function` tag: python code is not run offline
        raise EvalTaskError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise EvalTaskError(f"{path}: a task file must be a YAML mapping, got {type(cfg).__name__}")
    for key in ("task", "dataset_path", "output_type", "doc_to_target"):
        if key not in cfg:
            raise EvalTaskError(f"{path}: missing required key {key!r}")
    if not isinstance(cfg["task"], str) or not cfg["task"]:
        raise EvalTaskError(f"{path}: 'task' must be a non-empty string")
    if "include" in cfg:
        raise EvalTaskError(f"{path}: 'include' is not supported in raybig task files (write the task out)")
    if cfg["output_type"] not in OUTPUT_TYPES:
        raise EvalTaskError(f"{path}: output_type {cfg['output_type']!r} is not one of {', '.join(OUTPUT_TYPES)}")
    if cfg["output_type"] == "multiple_choice" and "doc_to_choice" not in cfg:
        raise EvalTaskError(f"{path}: a multiple_choice task needs 'doc_to_choice'")
    if cfg["dataset_path"] not in LOCAL_FORMATS:
        raise EvalTaskError(f"{path}: dataset_path {cfg['dataset_path']!r} would be fetched from the Hub; "
                            f"use a local format ({', '.join(LOCAL_FORMATS)}) with dataset_kwargs.data_files")
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if not files:
        raise EvalTaskError(f"{path}: dataset_kwargs.data_files is required (local data only)")
    if not any(cfg.get(k) for k in ("test_split", "validation_split", "training_split")):
        raise EvalTaskError(f"{path}: name the split to evaluate with test_split (or validation_split)")

    def absolute(f: Any) -> str:
        if not isinstance(f, str):
            raise EvalTaskError(f"{path}: data_files entries must be paths, got {f!r}")
        p = Path(f) if os.path.isabs(f) else path.parent / f
        if not p.is_file():
            raise EvalTaskError(f"{path}: data file {f!r} does not exist ({p})")
        if cfg["dataset_path"] == "json" and p.suffix == ".jsonl":
            _check_jsonl(p, cfg["task"])
        return str(p.resolve())

    if isinstance(files, dict):
        resolved: Any = {s: ([absolute(x) for x in v] if isinstance(v, list) else absolute(v))
                         for s, v in files.items()}
    elif isinstance(files, list):
        resolved = [absolute(x) for x in files]
    else:
        resolved = absolute(files)
    return {**cfg, "dataset_kwargs": {**kwargs, "data_files": resolved}}

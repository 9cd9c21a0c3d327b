"""Shared fixtures: one real embedded Ray per test session, with the dashboard on.

The dashboard is needed by Train's placement-group cleaner (Tune early stopping) and the Jobs API.
Tests never call `ray stop`; every cluster they start, they stop by PID.
"""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if not os.path.exists("/dev/nvidiactl"):  # a GPU box: GPU tests need DeepSpeed's CUDA accelerator
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Train v2 polls its workers every 2 s (and for preemption every 5 s), so each of the suite's ~30
# short runs would idle up to a few seconds after its last step; poll faster on the test box.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (4 logical CPUs on the 2-core CI box: a Tune driver plus 2 workers fit)."""
    import ray

    from raybig.cluster.ray_env import ensure_ray

    info = ensure_ray(num_cpus=4, dashboard=True)
    yield info
    ray.shutdown()


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: tiny models on a shared 2-core box only contend (10x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def ray_starts(monkeypatch) -> list:
    """Calls of ensure_ray (how every raybig command starts Ray): proves "before Ray" even when an
    earlier test in this process left a Ray running (so ray.is_initialized() says nothing)."""
    started: list = []
    monkeypatch.setattr("raybig.cluster.ray_env.ensure_ray", lambda *a, **k: started.append(1) or {})
    return started


@pytest.fixture
def storage_dir(tmp_path):
    return str(tmp_path / "runs")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{"root": folder, "llama": root/tiny-llama, "gpt2": root/tiny-gpt2}: tiny random HF models with
    their tokenizers, made offline by scripts/make_tiny_hf.py (the folders jobs/*.yaml name under
    ${RAYBIG_MODELS})."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_hf", ROOT / "scripts" / "make_tiny_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    root = tmp_path_factory.mktemp("models")
    return {"root": str(root), "llama": mod.make_tiny(str(root / "tiny-llama"), "llama", seed=0),
            "gpt2": mod.make_tiny(str(root / "tiny-gpt2"), "gpt2", seed=0)}

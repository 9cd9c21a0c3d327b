"""The per-worker training loop: DeepSpeed engine, steps, eval, checkpoints, export.

It knows nothing of its launcher. A `Reporter` (Ray Train, or plain torchrun in the
benchmark) supplies rank, the checkpoint to resume from, and where reports go.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist

from raybig.data.text import VOCAB_SIZE, Batches
from raybig.spec.models import TrainSpec
from raybig.train.build import build_model, gpt_config
from raybig.train.checkpoints import write_manifest
from raybig.train.ds_config import build_ds_config, resolve_precision


class Reporter(Protocol):
    rank: int
    world_size: int

    def resume_dir(self) -> contextlib.AbstractContextManager[str | None]: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None: ...


def disable_shm_comm_build() -> None:
    """Skip DeepSpeed's JIT-built shm op: it serves inference all-reduce only, and costs ~100 s to build."""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):
        pass


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases, norms and embeddings' 1-D params are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def all_reduce(values: list[float], device: torch.device, op: str = "mean") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return [float(v) for v in t.tolist()]


def load_init_weights(model: torch.nn.Module, uri: str) -> None:
    """`init_from`: weights only, from an export dir, a run dir, or a ZeRO checkpoint dir."""
    from raybig.train.export import load_state_dict

    sd = load_state_dict(uri)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "tied_keys", ()))
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"init_from {uri!r} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def train_worker(spec: TrainSpec, rep: Reporter, run_dir: str | None,
                 resume_from: str | None = None) -> dict[str, Any]:
    """Run the whole job on this rank. Returns rank-local final metrics."""
    import deepspeed

    disable_shm_comm_build()
    on_cuda = torch.cuda.is_available() and spec.resources.gpus_per_worker > 0
    torch.manual_seed(spec.seed)  # same init on every rank
    model = build_model(spec)
    ds_cfg = build_ds_config(spec, on_cuda=on_cuda)
    t = spec.train

    with contextlib.ExitStack() as stack:
        resume = stack.enter_context(rep.resume_dir())
        if resume is None and resume_from:
            resume = stack.enter_context(_local_copy(resume_from))
        if resume is None and spec.init_from:
            load_init_weights(model, spec.init_from)
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, t.weight_decay), config=ds_cfg)
        step = 0
        if resume is not None:
            from raybig.train.checkpoints import require_complete
            from raybig.train.export import weights_only_loads

            require_complete(resume)  # never resume from a folder a crash left half-written

            with weights_only_loads():  # --resume-from may name anyone's checkpoint: no pickled code
                _, client = engine.load_checkpoint(resume, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
            if client is None:
                raise RuntimeError(f"no DeepSpeed checkpoint found in {resume}")
            step = int(client["step"])

    device = engine.device
    batches = Batches.build(spec.data, t.micro_batch_size, spec.seed, rep.rank, rep.world_size)
    tokens_per_step = t.micro_batch_size * t.grad_accum * spec.data.seq_len * rep.world_size
    last: dict[str, Any] = {"step": step}
    # Tell the first report after a restore where training picked up (tests and `status` read it).
    pending: dict[str, Any] = {"restored_step": step} if resume is not None else {}
    if step == 0:
        last = {"step": 0, "val_loss": evaluate(engine, batches, t.eval_batches, device)}
        rep.report(last)

    window_loss = torch.zeros((), dtype=torch.float64)
    window_steps, window_time = 0, 0.0
    while step < t.steps:
        t0 = time.perf_counter()
        if spec.model.dropout > 0:
            torch.manual_seed(hash((spec.seed, rep.rank, step)) & 0x7FFFFFFF)
        for micro in range(t.grad_accum):
            x, y = batches.train_batch(step, micro)
            loss = engine(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach().to("cpu", torch.float64) / t.grad_accum
        if on_cuda:
            torch.cuda.synchronize()
        window_time += time.perf_counter() - t0
        window_steps += 1
        step += 1

        done = step == t.steps
        metrics: dict[str, Any] = {}
        if step % t.log_every == 0 or done:
            loss_avg, step_time = all_reduce([window_loss.item() / window_steps, window_time / window_steps],
                                             device)
            (peak,) = all_reduce([peak_memory_bytes(device)], device, op="max")
            metrics = {"step": step, "loss": loss_avg, "lr": float(engine.get_lr()[0]),
                       "step_time_s": step_time, "tokens_per_s": tokens_per_step / max(step_time, 1e-9),
                       "tokens": step * tokens_per_step,
                       "samples": step * tokens_per_step // spec.data.seq_len,
                       "peak_mem_bytes": int(peak)}
            window_loss.zero_()
            window_steps, window_time = 0, 0.0
        if pending and metrics:
            metrics.update(pending)
            pending = {}
        if step % t.eval_every == 0 or done:
            metrics.setdefault("step", step)
            metrics["val_loss"] = evaluate(engine, batches, t.eval_batches, device)
        if step % spec.checkpoint.every == 0 or done:
            metrics.setdefault("step", step)
            t_ck = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="raybig-ckpt-") as tmp:
                engine.save_checkpoint(tmp, tag=f"step_{step:08d}", client_state={"step": step})
                # This rank's file list, so a reader can tell a complete upload from a cut-short one.
                write_manifest(tmp, rep.rank, rep.world_size, step)
                metrics["checkpoint_save_s"] = time.perf_counter() - t_ck
                rep.report(metrics, checkpoint_dir=tmp)
        elif metrics:
            rep.report(metrics)
        if metrics:
            last.update(metrics)

    if run_dir is not None:
        export_final(engine, spec, run_dir, rep.rank)
    return last


@torch.no_grad()
def evaluate(engine: Any, batches: Batches, n: int, device: torch.device) -> float:
    engine.eval()
    total = 0.0
    for i in range(n):
        x, y = batches.val_batch(i)
        total += float(engine(x.to(device), y.to(device)).float())
    engine.train()
    (mean,) = all_reduce([total / n], device)
    return mean


def export_final(engine: Any, spec: TrainSpec, run_dir: str, rank: int) -> None:
    """Consolidated weights (safetensors) + model config, loadable without DeepSpeed."""
    from raybig.train.export import write_export

    if spec.deepspeed.zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank must call it
    else:
        sd = engine.module.state_dict() if rank == 0 else None
    if rank == 0 and sd is not None:
        model_cfg = gpt_config(spec).to_dict() if spec.model.target is None else {
            "target": spec.model.target, "kwargs": dict(spec.model.kwargs),
            "vocab_size": spec.model.vocab_size or VOCAB_SIZE, "seq_len": spec.data.seq_len}
        write_export(run_dir, sd, model_cfg, tied=getattr(engine.module, "tied_keys", ()),
                     precision=resolve_precision(spec), name=spec.name)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _local_copy(uri: str) -> Iterator[str]:
    from raybig.storage import download_dir, is_local, normalize

    if is_local(uri):
        yield normalize(uri)
        return
    with tempfile.TemporaryDirectory(prefix="raybig-resume-") as tmp:
        yield download_dir(uri, tmp)


def lr_at(spec: TrainSpec, step: int) -> float:
    """The schedule DeepSpeed's WarmupCosineLR follows (for docs and tests)."""
    t = spec.train
    if step < t.warmup:
        return t.lr * step / max(1, t.warmup)
    frac = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def add_python_path(paths: list[str]) -> None:
    for p in reversed(paths):
        if p and p not in sys.path:
            sys.path.insert(0, p)


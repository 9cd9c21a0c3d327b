"""The per-worker training loop: DeepSpeed engine, steps, eval, checkpoints, export.

It knows nothing of its launcher. A `Reporter` (Ray Train, or plain torchrun in the
benchmark) supplies rank, the checkpoint to resume from, and where reports go.
"""

from __future__ import annotations

import contextlib
import inspect
import resource
import tempfile
import time
import zlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist

from raybig.data.shards import Batch, ShardBatches
from raybig.spec.deepspeed import build_ds_config, resolve_precision
from raybig.spec.models import TrainSpec
from raybig.tokenizer import BYTE_VOCAB
from raybig.train.build import build
from raybig.train.built import Built, gpt_config, run_tokenizer
from raybig.train.checkpoints import write_manifest
from raybig.train.preempt import Watch


class Reporter(Protocol):
    """What the loop needs of its launcher: rank, world size, the checkpoint to resume, reporting."""

    rank: int
    world_size: int

    def resume_dir(self) -> contextlib.AbstractContextManager[str | None]:
        """A local folder holding the checkpoint to resume from (None: start fresh)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Send `metrics` (and a checkpoint folder every rank wrote) to the launcher."""
        ...


def disable_shm_comm_build() -> None:
    """Skip DeepSpeed's JIT-built shm op: it serves inference all-reduce only, and costs ~100 s to build."""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (ImportError, AttributeError, TypeError):
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak bytes this rank used: CUDA allocations on a GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; biases, norms and embeddings' 1-D params are not decayed."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def all_reduce(values: list[float], device: torch.device, op: str = "mean") -> list[float]:
    """`values` reduced over ranks ("mean", "sum" or "max"); one host sync for the whole list."""
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


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def train_worker(spec: TrainSpec, rep: Reporter, run_dir: str | None,
                 resume_from: str | None = None, prepared: str | None = None) -> dict[str, Any]:
    """Run the whole job on this rank. Returns rank-local final metrics.

    `prepared` is the token-shard set the driver prepared (`raybig.train.runner.prepare_data`); without
    it (a launcher other than Ray Train), rank 0 prepares it in-process first. Each rank streams its own
    share through `ShardBatches`: batch (step, micro) is a function of (seed, rank, step, micro), so a
    run resumed at step N continues with exactly the batches it would have seen.
    """
    import deepspeed

    disable_shm_comm_build()
    on_cuda = torch.cuda.is_available() and spec.resources.gpus_per_worker > 0
    capability = torch.cuda.get_device_capability() if on_cuda else None
    ds_cfg = build_ds_config(spec, on_cuda=on_cuda, capability=capability)
    tokenizer = run_tokenizer(spec, run_dir, rep.rank, _barrier)
    t = spec.train
    lora = spec.finetune.method == "lora"

    with contextlib.ExitStack() as stack:
        resume = stack.enter_context(rep.resume_dir())
        if resume_from and (resume is None or _written_by_others(resume, rep.world_size)):
            # Ray's checkpoint is of another world size: the driver converted it (raybig.train.universal).
            resume = stack.enter_context(_local_copy(resume_from))
        if resume is not None and _is_universal(resume):
            ds_cfg = {**ds_cfg, "checkpoint": {**ds_cfg.get("checkpoint", {}), "load_universal": True}}
        # LoRA checkpoints hold only the adapter: the frozen weights come from init_from every time.
        init = spec.init_from if (resume is None or lora) and not spec.model.is_hf else None
        torch.manual_seed(spec.seed)  # same init on every rank
        # zero.Init cannot take init_from's whole state dict: build whole, DeepSpeed partitions it.
        built = build(spec, None if init else ds_cfg, vocab_size=tokenizer.vocab_size)
        if init:
            base = getattr(built.model, "get_base_model", None)
            load_init_weights(base() if built.lora and base is not None else built.model, init)
        model = built.model
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, t.weight_decay), config=ds_cfg)
        step = 0
        ckpt_data: dict[str, Any] | None = None  # the data stream a resumed checkpoint was reading
        if resume is not None:
            from raybig.train.checkpoints import require_complete
            from raybig.train.export import weights_only_loads

            require_complete(resume)  # never resume from a folder a crash left half-written

            with weights_only_loads():  # --resume-from may name anyone's checkpoint: no pickled code
                _, client = engine.load_checkpoint(resume, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True,
                                                   load_module_strict=not lora)
            if client is None:
                raise RuntimeError(f"no DeepSpeed checkpoint found in {resume}")
            step = int(client["step"])
            ckpt_data = client.get("data")

    device = engine.device
    if prepared is None and spec.task not in ("classification", "custom"):  # masked_lm: rank 0 prepares here
        prepared = _prepare_here(spec, run_dir, rep.rank, tokenizer)
    batches: Any
    if spec.task == "classification":  # labelled arrays, not token shards (raybig.train.classifiers)
        from raybig.train.classifiers import batches_for_spec

        batches = batches_for_spec(spec, rep.rank, rep.world_size)
        has_val, data_state = True, {"prepared": "arrays", "world_size": rep.world_size}
    elif spec.task == "custom":  # a plug-in dataset: example indices per (rank, step, micro)
        from raybig.train import plugin_task

        batches = plugin_task.batches_for_spec(spec, rep.rank, rep.world_size)
        has_val, data_state = batches.has_val, plugin_task.data_state(spec, batches)
    else:
        assert prepared is not None
        batches = ShardBatches(prepared, spec.data.seq_len, t.micro_batch_size, spec.seed, rep.rank,
                               rep.world_size, packed=spec.data.is_packed())
        has_val = batches.val.n > 0  # data.val_fraction: 0 holds nothing out: no val_loss
        data_state = {"prepared": batches.index["hash"], "world_size": rep.world_size}
        if built.wrap_batches is not None:  # masked_lm: BERT masking keyed on (seed, rank, step, micro)
            batches = built.wrap_batches(batches, rep.rank)
    tokens_per_step = spec.tokens_per_step()  # Ray Train starts exactly resources.workers ranks
    last: dict[str, Any] = {"step": step}
    # Tell the first report after a restore where training picked up (tests and `status` read it).
    pending: dict[str, Any] = {"restored_step": step} if resume is not None else {}
    if ckpt_data and ckpt_data.get("prepared") != data_state["prepared"]:
        # Sources, tokenizer or data options changed since the checkpoint: same step, another stream.
        pending["data_changed_since_checkpoint"] = True
    if ckpt_data and ckpt_data.get("world_size") not in (None, rep.world_size):
        # Elastic resume: batches are keyed by (seed, rank, step, micro) over world_size shares.
        pending.update(data_changed_since_checkpoint=True, resumed_from_world_size=ckpt_data["world_size"])
    if step == 0 and has_val:
        last = {"step": 0, "val_loss": evaluate(engine, batches, t.eval_batches, device, built)}
        last.update(built.val_metrics())  # a classifier's val_accuracy
        rep.report(last)

    # The loss stays on the device: reading it (.item()) every micro step would make the host wait
    # for the GPU each time; it is read once per log window, where the window's time is taken too.
    window_loss = torch.zeros((), dtype=torch.float32 if on_cuda else torch.float64, device=device)
    window_steps = 0
    window_extra: dict[str, float] = {}  # a classifier's accuracy, summed like the loss
    data_wait = 0.0  # seconds of this log window spent waiting for batches
    digest = 0  # crc32 of this rank's input ids at micro step 0 of the last step
    t0 = time.perf_counter()
    dropout = spec.model.dropout > 0 or (lora and spec.finetune.dropout > 0)
    # A scheduler's checkpoint-now request (raybig.train.preempt): save after this step and stop.
    watch = Watch(rep.rank, lambda v: all_reduce(v, device, op="max"))
    preempted = False
    while step < t.steps:
        if dropout:
            torch.manual_seed(hash((spec.seed, rep.rank, step)) & 0x7FFFFFFF)
        for micro in range(t.grad_accum):
            t_data = time.perf_counter()
            bt = batches.get(step, micro)
            if micro == 0:  # which rows of the stream this step read (a resumed run can be checked)
                digest = zlib.crc32(bt.x.tobytes())
            x, y, pos, docs = _on_device(bt, device, batches.packed)
            data_wait += time.perf_counter() - t_data
            loss = built.loss(engine, x, y, pos, docs)
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach().to(window_loss.dtype) / t.grad_accum
            for k, v in built.metrics.items():
                window_extra[k] = window_extra.get(k, 0.0) + v / t.grad_accum
        window_steps += 1
        step += 1

        done = step == t.steps
        preempted = not done and watch.stop_now(step)
        metrics: dict[str, Any] = {}
        if step % t.log_every == 0 or done or preempted:
            if on_cuda:
                torch.cuda.synchronize()
            window_time = time.perf_counter() - t0
            loss_avg, step_time = all_reduce([window_loss.item() / window_steps, window_time / window_steps],
                                             device)
            (peak,) = all_reduce([peak_memory_bytes(device)], device, op="max")
            metrics = {"step": step, "loss": loss_avg, "lr": float(engine.get_lr()[0]),
                       "step_time_s": step_time, "tokens_per_s": tokens_per_step / max(step_time, 1e-9),
                       "tokens": step * tokens_per_step,
                       "samples": step * tokens_per_step // spec.data.seq_len,
                       "peak_mem_bytes": int(peak), "data_wait_frac": data_wait / max(window_time, 1e-9),
                       "data_digest": digest}
            if window_extra:  # e.g. accuracy, reported beside the loss
                metrics.update(zip(window_extra, all_reduce([v / window_steps for v in window_extra.values()],
                                                            device), strict=True))
                window_extra = {}
            window_loss.zero_()
            window_steps = 0
            data_wait = 0.0
        if pending and metrics:
            metrics.update(pending)
            pending = {}
        if (step % t.eval_every == 0 or done) and has_val:
            metrics.setdefault("step", step)
            metrics["val_loss"] = evaluate(engine, batches, t.eval_batches, device, built)
            metrics.update(built.val_metrics())
        if step % spec.checkpoint.every == 0 or done or preempted:
            metrics.setdefault("step", step)
            if preempted:
                metrics["preempted_at_step"] = step
            t_ck = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="raybig-ckpt-") as tmp:
                # LoRA: the frozen weights are not saved (they come back from the model folder).
                # The data position is the step itself (batches are keyed on it); the prepared set's
                # hash and world size say which stream that step indexes.
                engine.save_checkpoint(tmp, tag=f"step_{step:08d}", client_state={"step": step, "data": data_state},
                                       exclude_frozen_parameters=lora)
                # This rank's file list, so a reader can tell a complete upload from a cut-short one.
                write_manifest(tmp, rep.rank, rep.world_size, step)
                metrics["checkpoint_save_s"] = time.perf_counter() - t_ck
                rep.report(metrics, checkpoint_dir=tmp)
        elif metrics:
            rep.report(metrics)
        if metrics:
            last.update(metrics)
        if metrics and (step % t.log_every == 0 or done):
            t0 = time.perf_counter()  # evaluation and checkpoint time stay out of step_time
        if preempted:
            break  # checkpointed at this step; the job resumes here when admitted again

    if run_dir is not None and not preempted:
        export_final(engine, spec, run_dir, rep.rank, built, tokenizer)
    return last


def _on_device(bt: Batch, device: torch.device, packed: bool,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x, y, positions, doc_ids) of a batch as device tensors; positions/doc_ids only for packed rows."""
    def put(a: Any) -> torch.Tensor:
        return torch.from_numpy(a).to(device, non_blocking=True)

    if not packed:
        return put(bt.x), put(bt.y), None, None
    return put(bt.x), put(bt.y), put(bt.positions), put(bt.doc_ids)


def _prepare_here(spec: TrainSpec, run_dir: str | None, rank: int, tokenizer: Any) -> str:
    """Without a driver-prepared set: rank 0 prepares (or finds) it, the others wait and open it."""
    from raybig.data.prepare import prepare_spec, prepared_root

    root = prepared_root(spec.data, spec.storage.path)
    uri = prepare_spec(spec.data, root, tokenizer, use_ray=False).uri if rank == 0 else ""
    _barrier()
    return uri or prepare_spec(spec.data, root, tokenizer, use_ray=False).uri


@torch.no_grad()
def evaluate(engine: Any, batches: Any, n: int, device: torch.device, built: Built | None = None) -> float:
    """Mean validation loss over `n` micro batches, averaged over ranks (a Python float).

    `batches`: a `ShardBatches` (packed rows keep their example masks), or anything with
    `val_batch(i) -> (x, y)`.
    """
    engine.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    extra: dict[str, float] = {}  # named metrics beyond the loss (a classifier's accuracy)
    for i in range(n):
        if isinstance(batches, ShardBatches):
            x, y, pos, docs = _on_device(batches.get_val(i), device, batches.packed)
        else:
            xv, yv = batches.val_batch(i)
            x, y, pos, docs = xv.to(device), yv.to(device), None, None
        loss = built.loss(engine, x, y, pos, docs, validation=True) if built is not None else engine(x, y)
        total += loss.detach().to(torch.float64)
        for k, v in (built.metrics if built is not None else {}).items():
            extra[k] = extra.get(k, 0.0) + v
    engine.train()
    (mean,) = all_reduce([float(total) / n], device)
    if built is not None:
        built.val = dict(zip(extra, all_reduce([v / n for v in extra.values()], device), strict=True)) if extra else {}
    return mean


def merge_lora_state_dict(sd: dict[str, torch.Tensor], scaling: float,
                          fan_in_fan_out: bool = False) -> dict[str, torch.Tensor]:
    """A peft LoRA model's full state dict -> the plain model's, adapters folded in.

    Each adapted weight W (out, in) becomes W + scaling * B @ A, with A (r, in), B (out, r) and
    scaling = alpha / r (GPT-2's Conv1D stores W as (in, out): `fan_in_fan_out` transposes the
    update). Keys lose peft's `base_model.model.` prefix and `.base_layer` infix.
    """
    def plain(k: str) -> str:
        return k.removeprefix("base_model.model.").replace(".base_layer.", ".")

    out = {plain(k): v for k, v in sd.items() if ".lora_" not in k}
    for k, a in sd.items():
        if ".lora_A." not in k:
            continue
        mod, rest = k.split(".lora_A.", 1)
        b = sd[f"{mod}.lora_B.{rest}"]
        w = plain(mod) + ".weight"
        delta = (b.float() @ a.float()) * scaling
        out[w] = (out[w].float() + (delta.t() if fan_in_fan_out else delta)).to(out[w].dtype)
    return out


def export_final(engine: Any, spec: TrainSpec, run_dir: str, rank: int, built: Built | None = None,
                 tokenizer: Any = None) -> None:
    """Consolidated weights (safetensors) + model config, loadable without DeepSpeed.

    Hugging Face models export as a `save_pretrained` folder of their own class (LoRA merged unless
    `finetune.merge: false`, which writes peft's adapter folder); raybig's GPT as today's export.
    """
    from raybig.train.export import EXPORT_DIR, write_export

    if spec.deepspeed.zero_stage == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank must call it
    else:
        sd = engine.module.state_dict() if rank == 0 else None
    lora_cfg = None
    if built is not None and built.lora:
        lora_cfg = engine.module.peft_config["default"]
    if rank == 0 and sd is not None and built is not None and built.kind == "hf":
        _export_hf(engine.module, sd, spec, storage_join(run_dir, EXPORT_DIR), tokenizer, lora_cfg)
    elif rank == 0 and sd is not None:
        if lora_cfg is not None:
            sd = merge_lora_state_dict(sd, lora_cfg.lora_alpha / lora_cfg.r, bool(lora_cfg.fan_in_fan_out))
        vocab = getattr(tokenizer, "vocab_size", None)
        model_cfg = gpt_config(spec, vocab).to_dict() if spec.model.target is None else {
            "target": spec.model.target, "kwargs": dict(spec.model.kwargs),
            "vocab_size": spec.model.vocab_size or BYTE_VOCAB, "seq_len": spec.data.seq_len}
        if built is not None and built.config:  # a classifier: its arch, example shape and classes
            model_cfg = built.config
        # The export carries the tokenizer its ids belong to (write_export gained `tokenizer=` with
        # the HF-format export; until both land together, only pass it where it is accepted).
        kw = {"tokenizer": tokenizer} if "tokenizer" in inspect.signature(write_export).parameters else {}
        write_export(run_dir, sd, model_cfg, tied=("lm_head.weight",) if built is not None and built.kind == "gpt"
                     else getattr(engine.module, "tied_keys", ()),
                     precision=resolve_precision(spec), name=spec.name, **kw)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def storage_join(*parts: str) -> str:
    """`raybig.storage.join` (local paths and fsspec URIs alike)."""
    from raybig import storage

    return storage.join(*parts)


def _export_hf(module: Any, sd: dict[str, torch.Tensor], spec: TrainSpec, out: str, tokenizer: Any,
               lora_cfg: Any) -> None:
    """Rank 0: write a Hugging Face model's export (see `export_final`)."""
    from raybig.train.export_hf import atomic_export_dir, hf_tokenizer_for, save_hf_export

    sd = {k: v.detach().to("cpu") for k, v in sd.items()}
    if lora_cfg is not None and not spec.finetune.merge:  # peft's adapter folder alone
        with atomic_export_dir(out) as tmp:
            module.save_pretrained(tmp, state_dict=sd)
            hf_tokenizer_for(tokenizer).save_pretrained(tmp)
        return
    if lora_cfg is not None:
        sd = merge_lora_state_dict(sd, lora_cfg.lora_alpha / lora_cfg.r, bool(lora_cfg.fan_in_fan_out))
        module = module.get_base_model()
    # A tied head shares the embedding's storage; save_pretrained drops the duplicate itself.
    save_hf_export(module, tokenizer, out, state_dict=sd)


def _written_by_others(local: str, world_size: int) -> bool:
    """A (non-universal) checkpoint folder whose manifests name another world size."""
    from raybig.train.checkpoints import world_size_of

    ws = world_size_of(local)
    return ws is not None and ws != world_size


def _is_universal(local: str) -> bool:
    from raybig.train.universal import is_universal

    return is_universal(local)


@contextlib.contextmanager
def _local_copy(uri: str) -> Iterator[str]:
    from raybig.storage import download_dir, is_local, normalize

    if is_local(uri):
        yield normalize(uri)
        return
    with tempfile.TemporaryDirectory(prefix="raybig-resume-") as tmp:
        yield download_dir(uri, tmp)

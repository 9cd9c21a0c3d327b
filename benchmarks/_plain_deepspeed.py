"""Plain DeepSpeed baseline, launched by torchrun: same model, data and DeepSpeed config as raybig,
no Ray. `train_bench.py` runs it and compares; run it alone with
`torchrun --nproc_per_node 2 benchmarks/_plain_deepspeed.py SPEC.yaml OUT.json`."""

from __future__ import annotations

import json
import os
import resource
import sys
import time

T_PROCESS = time.time()

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from raybig.data.text import Batches  # noqa: E402
from raybig.spec import load_spec  # noqa: E402
from raybig.spec.deepspeed import build_ds_config  # noqa: E402
from raybig.train.build import build  # noqa: E402
from raybig.train.built import run_tokenizer  # noqa: E402
from raybig.train.loop import disable_shm_comm_build, param_groups  # noqa: E402


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process (params, grads, optimizer state,
    DeepSpeed's flat buffers and partitions): RSS can't show ZeRO's savings, because the allocator
    keeps pages that freed full-size buffers used."""
    import gc

    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except Exception:
            continue
    return sum(seen.values())


def optimizer_state_bytes(engine) -> int:
    """Bytes of the optimizer's own state on this rank (Adam's exp_avg and exp_avg_sq partitions)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO wrapper holds the torch optimizer
    return sum(t.numel() * t.element_size() for st in inner.state.values() for t in st.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)


def main(spec_path: str, out: str) -> None:
    spec = load_spec(spec_path)
    disable_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(spec.seed)
    rss0 = rss()
    ds_cfg = build_ds_config(spec, on_cuda=False)
    tok = run_tokenizer(spec, None)  # bytes, or the HF folder's own (a BPE would be trained here)
    built = build(spec, ds_cfg, vocab_size=tok.vocab_size)  # as raybig's loop: HF, LoRA, zero.Init at stage 3
    model = built.model
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg,
                                      model_parameters=param_groups(model, spec.train.weight_decay))
    batches = Batches.build(spec.data, spec.train.micro_batch_size, spec.seed, rank, world, tokenizer=tok)
    ready_at = time.time()  # workers up, model built, DeepSpeed initialised
    times, stamps, first_step_at = [], [], None
    for step in range(spec.train.steps):
        t0 = time.perf_counter()
        for micro in range(spec.train.grad_accum):
            x, y = batches.train_batch(step, micro)
            loss = built.loss(engine, x, y)
            engine.backward(loss)
            if step == spec.train.steps - 1 and micro == spec.train.grad_accum - 1:
                held = live_tensor_bytes()  # grads and optimizer state both alive: the model-state peak
            engine.step()
        times.append(time.perf_counter() - t0)
        stamps.append(time.time())
        if first_step_at is None:
            first_step_at = time.time()
    rss_after = rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = torch.tensor([float(rss_after - rss0), float(peak), float(held), float(optimizer_state_bytes(engine))])
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if rank == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        with open(out, "w") as f:
            json.dump({"step_times": times, "stamps": stamps, "first_step_at": first_step_at, "ready_at": ready_at,
                       "loss": float(loss.item()), "rss_growth": stats[0].item(), "tensor_bytes": stats[2].item(),
                       "peak_rss": stats[1].item(), "optim_state_bytes": stats[3].item(),
                       "trainable_params": trainable}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

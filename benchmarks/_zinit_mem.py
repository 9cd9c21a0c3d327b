"""Peak host memory of one rank while building a raybig GPT: whole (then partitioned) vs `zero.Init`.

Launched by `hf_bench.py --zinit` under torchrun:
`torchrun --nproc_per_node N benchmarks/_zinit_mem.py PRESET MODE OUT.json`, MODE `whole` (the model
built whole on the rank, as before zero.Init) or `zinit` (`raybig.train.build.build` with the
ZeRO-3 DeepSpeed config: every parameter partitioned as it is created). Writes, for the rank with
the highest peak: RSS before the build (imports and process group included), peak RSS (ru_maxrss)
after it, and the build time.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import deepspeed
import torch
import torch.distributed as dist

from raybig.spec.deepspeed import build_ds_config
from raybig.spec.models import TrainSpec
from raybig.train.build import build
from raybig.train.loop import disable_shm_comm_build


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(preset: str, mode: str, out: str) -> None:
    disable_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    spec = TrainSpec(name="zinit-bench", model={"preset": preset}, data={"seq_len": 64},
                     deepspeed={"zero_stage": 3}, resources={"workers": world})
    ds_cfg = build_ds_config(spec, on_cuda=False)
    torch.manual_seed(0)
    before = rss()
    t0 = time.perf_counter()
    built = build(spec, ds_cfg if mode == "zinit" else None)
    build_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = sum(t.numel() * t.element_size() for t in  # this rank's share: its ZeRO-3 partition, or the whole
               (getattr(p, "ds_tensor", p.data) for p in built.model.parameters()))
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in built.model.parameters())
    stats = torch.tensor([float(peak), float(before), float(held), build_s], dtype=torch.float64)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"preset": preset, "mode": mode, "world": world, "params": numel,
                       "peak_rss": stats[0].item(), "rss_before": stats[1].item(),
                       "param_bytes_held": stats[2].item(), "build_s": stats[3].item()}, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])

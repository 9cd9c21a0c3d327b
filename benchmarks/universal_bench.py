"""Elastic resume: seconds to convert a ZeRO checkpoint to DeepSpeed's universal format, against its size.

For each model preset and ZeRO stage, 2 ranks (torchrun, gloo, CPU) build raybig's GPT with raybig's
DeepSpeed config, take one optimizer step and save a checkpoint exactly as the training loop does
(`engine.save_checkpoint` + raybig manifests). Then `raybig.train.universal.convert` (what the driver
runs before an elastic resume: a child process running DeepSpeed's `ds_to_universal`, then the
manifest) is timed on it. The child's fixed cost (starting Python and importing DeepSpeed) is
measured alone and shown beside it.

    python benchmarks/universal_bench.py [--presets gpt-debug,gpt-tiny,gpt-mini] [--stages 2,3]

Run it under the shared lock on a shared box (it starts DeepSpeed training processes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SPEC = """kind: train
name: ubench
model: {{preset: {preset}}}
data: {{seq_len: 64}}
train: {{steps: 1, micro_batch_size: 2}}
deepspeed: {{zero_stage: {stage}}}
resources: {{workers: 2}}
"""


def worker(spec_path: str, out: str) -> None:
    """torchrun entry: one step of raybig's model under raybig's DeepSpeed config, then a checkpoint."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from raybig.spec import load_spec
    from raybig.spec.deepspeed import build_ds_config
    from raybig.train.build import build
    from raybig.train.checkpoints import write_manifest
    from raybig.train.loop import disable_shm_comm_build, param_groups

    spec = load_spec(spec_path)
    disable_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = build_ds_config(spec)
    built = build(spec, cfg, vocab_size=256)
    engine, _, _, _ = deepspeed.initialize(model=built.model, model_parameters=param_groups(built.model, 0.1),
                                           config=cfg)
    x = torch.randint(0, 256, (spec.train.micro_batch_size, spec.data.seq_len))
    loss = built.loss(engine, x, x, None, None)
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out, tag="step_00000001", client_state={"step": 1, "data": {}})
    write_manifest(out, dist.get_rank(), dist.get_world_size(), 1)
    dist.barrier()


def _size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(folder) for n in names)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="gpt-debug,gpt-tiny,gpt-mini")
    ap.add_argument("--stages", default="2,3")
    args = ap.parse_args()
    from raybig.train.universal import convert

    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import deepspeed.checkpoint.ds_to_universal"], env=env, check=True,
                   capture_output=True)
    fixed = time.perf_counter() - t
    rows = []
    with tempfile.TemporaryDirectory(prefix="ubench-") as tmp:
        for preset in args.presets.split(","):
            for stage in map(int, args.stages.split(",")):
                spec_path = os.path.join(tmp, f"{preset}-{stage}.yaml")
                with open(spec_path, "w") as f:
                    f.write(SPEC.format(preset=preset, stage=stage))
                ckpt = os.path.join(tmp, f"checkpoint_{preset}_{stage}")
                subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(29700 + stage),
                                __file__, "--worker", spec_path, ckpt], env=env, check=True, capture_output=True)
                conv = convert(ckpt, os.path.join(tmp, f"universal_{preset}_{stage}"), stage)
                mb = conv.bytes / 2**20
                rows.append({"preset": preset, "stage": stage, "checkpoint_mib": round(mb, 1),
                             "universal_mib": round(_size(conv.path) / 2**20, 1), "seconds": conv.seconds,
                             "seconds_over_fixed": round(conv.seconds - fixed, 2)})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nfixed cost (python + import deepspeed in the child): {fixed:.1f} s\n")
    print("| preset | ZeRO | checkpoint (MiB) | universal (MiB) | convert (s) | convert - fixed (s) | "
          "(convert - fixed) / MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        per = r["seconds_over_fixed"] / max(r["checkpoint_mib"], 1e-9)
        print(f"| {r['preset']} | {r['stage']} | {r['checkpoint_mib']} | {r['universal_mib']} | {r['seconds']:.1f} | "
              f"{r['seconds_over_fixed']:.1f} | {per:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()

"""Issue 14's benchmarks, each a ratio from one invocation (--step, --zinit alternate sides). Prints markdown.

    .venv/bin/python benchmarks/hf_bench.py --step     # HF GPT-2 124M: raybig vs plain DeepSpeed; LoRA vs full
    .venv/bin/python benchmarks/hf_bench.py --zinit    # peak RSS per rank building a GPT: zero.Init vs whole
    .venv/bin/python benchmarks/hf_bench.py --bpe      # raybig's GPT, BPE vs bytes: validation bits per byte

--step: a GPT-2-shaped model from its config (124M parameters, random init, no download), ZeRO-2,
2 CPU workers. Full fine-tuning through raybig (`run_train`: Ray Train workers, raybig's loop) and
through a bare `deepspeed.initialize` loop under torchrun (`_plain_deepspeed.py`, same
`raybig.train.build.build`, DeepSpeed config and data); and LoRA (r=8 on c_attn) through the same
bare loop, for optimizer-state bytes per rank and step time against full fine-tuning.

--zinit: `_zinit_mem.py` under torchrun builds `--zinit-preset` with the ZeRO-3 DeepSpeed config
under `deepspeed.zero.Init` on 2 ranks, and whole (as before zero.Init) in one process (a whole
build is the same on every rank, and one copy at a time keeps the shared box safe). Refuses to start
a side that MemAvailable could not hold with a 4 GiB margin.

--bpe: two raybig runs of the same GPT preset on the same corpus, same steps, micro batch and
seq_len (so the same tokens per step), bytes vs a BPE of `--vocab` tokens. bits/byte =
val_loss / ln 2 x (validation tokens / validation UTF-8 bytes), the ratio taken on the whole
validation split with the run's own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

GPT2_124M = ("{model_type: gpt2, vocab_size: 50257, n_positions: 1024, n_embd: 768, n_layer: 12, n_head: 12}")


def _load() -> str:
    return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def hf_spec(name: str, storage: str, steps: int, mbs: int, seq: int, log_every: int, lora: bool) -> str:
    ft = "finetune: {method: lora, r: 8, alpha: 16, dropout: 0.0}\n" if lora else ""
    return f"""
kind: train
name: {name}
seed: 0
model: {{hf_config: {GPT2_124M}}}
data: {{path: "stdlib://", seq_len: {seq}, max_tokens: 2000000}}
{ft}train: {{steps: {steps}, micro_batch_size: {mbs}, lr: 1.0e-4, warmup_steps: 1, eval_every: 100000,
        eval_batches: 1, log_every: {log_every}}}
deepspeed: {{zero_stage: 2}}
resources: {{workers: 2, cpus_per_worker: 1}}
storage: {{path: {storage}}}
checkpoint: {{every: 100000, keep: 1}}
sample: {{max_new_tokens: 0}}
"""


def _write(tmp: str, name: str, text: str) -> str:
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def step(args: argparse.Namespace) -> None:
    import ray
    from train_bench import run_plain, run_raybig

    from raybig.cluster.ray_env import ensure_ray

    ensure_ray(None, num_cpus=3)
    tmp = tempfile.mkdtemp(prefix="raybig-hfbench-")
    steps, le, w = args.steps, args.log_every, args.warmup
    full = _write(tmp, "full", hf_spec("full", tmp, steps, args.mbs, args.seq, le, lora=False))
    lora = _write(tmp, "lora", hf_spec("lora", tmp, steps, args.mbs, args.seq, le, lora=True))
    lo, hi = w, steps - le  # the last step carries raybig's final checkpoint and export: left out
    rows, loads = [], [_load()]
    for _rep in range(args.repeats):  # alternate, so drift on a shared box hits every side alike
        p = run_plain(full)
        r = run_raybig(full)
        q = run_plain(lora)
        a = r["arrivals"]
        p_step = (p["stamps"][hi - 1] - p["stamps"][lo - 1]) / (hi - lo)
        q_step = (q["stamps"][hi - 1] - q["stamps"][lo - 1]) / (hi - lo)
        r_step = (a[hi] - a[lo]) / (hi - lo)
        rows.append({"plain": p_step, "raybig": r_step, "lora": q_step, "p_opt": p["optim_state_bytes"],
                     "q_opt": q["optim_state_bytes"], "p_train": p["trainable_params"],
                     "q_train": q["trainable_params"], "p_rss": p["peak_rss"], "q_rss": q["peak_rss"]})
        print(f"  rep {_rep}: plain {p_step:.3f}s raybig {r_step:.3f}s lora {q_step:.3f}s ({_load()})", flush=True)
        shutil.rmtree(os.path.join(tmp, "full"), ignore_errors=True)  # a fresh run, no auto-resume
        loads.append(_load())
    med = {k: statistics.median(x[k] for x in rows) for k in rows[0]}
    gib = 1024**3
    print(f"\nHF GPT-2 124M shape from config (random init), ZeRO-2 fp32, 2 CPU workers, micro-batch {args.mbs} x "
          f"seq {args.seq}, {steps} steps, step time = rank 0 wall clock steps {lo}..{hi}, median of "
          f"{args.repeats} alternating rounds; {loads[0]} at start, {loads[-1]} at end\n")
    print("| | plain DeepSpeed (torchrun) | raybig (Ray Train) | raybig / plain |")
    print("|---|---:|---:|---:|")
    print(f"| steady-state step time, full fine-tune | {med['plain']:.2f} s | {med['raybig']:.2f} s | "
          f"{med['raybig'] / med['plain']:.3f} |")
    print("\nper round, raybig / plain: " + ", ".join(f"{x['raybig'] / x['plain']:.3f}" for x in rows)
          + "; LoRA / full: " + ", ".join(f"{x['lora'] / x['plain']:.3f}" for x in rows))
    print("\nLoRA (r=8 on c_attn) against full fine-tuning, same bare loop (torchrun), same rounds\n")
    print("| | full | LoRA | LoRA / full |")
    print("|---|---:|---:|---:|")
    print(f"| trainable parameters | {med['p_train']:,.0f} | {med['q_train']:,.0f} | "
          f"{med['q_train'] / med['p_train']:.4f} |")
    print(f"| optimizer state / rank (Adam moments) | {med['p_opt'] / gib:.3f} GiB | {med['q_opt'] / 2**20:.2f} MiB | "
          f"{med['q_opt'] / med['p_opt']:.4f} |")
    print(f"| steady-state step time | {med['plain']:.2f} s | {med['lora']:.2f} s | {med['lora'] / med['plain']:.3f} |")
    print(f"| peak RSS / rank | {med['p_rss'] / gib:.2f} GiB | {med['q_rss'] / gib:.2f} GiB | "
          f"{med['q_rss'] / med['p_rss']:.2f} |")
    ray.shutdown()


def _gpt_params(preset: str) -> int:
    from raybig.spec.models import PRESETS

    c = PRESETS[preset]
    C, L = c["n_embd"], c["n_layer"]
    return 12 * L * C * C + (256 + c["block_size"]) * C


def _torchrun(nproc: int, preset: str, mode: str, out: str) -> dict:
    from raybig.cluster.ray_env import free_port

    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(free_port()), os.path.join(HERE, "_zinit_mem.py"), preset, mode, out],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def zinit(args: argparse.Namespace) -> None:
    preset, world = args.zinit_preset, 2
    model_bytes = 4 * _gpt_params(preset)
    need = {"whole": 1.3 * model_bytes + 1.5 * 1024**3,
            "zinit": world * (1.3 * model_bytes / world + 1.5 * 1024**3)}
    tmp = tempfile.mkdtemp(prefix="raybig-zinit-")
    rows, loads = [], [_load()]
    for rep in range(args.repeats):
        for mode in ("whole", "zinit"):
            avail = _mem_available()
            if avail < need[mode] + 4 * 1024**3:
                raise SystemExit(f"refusing {preset} {mode}: needs ~{need[mode] / 1024**3:.1f} GiB + 4 GiB margin, "
                                 f"MemAvailable {avail / 1024**3:.1f} GiB; pick a smaller --zinit-preset")
            res = _torchrun(1 if mode == "whole" else world, preset, mode, os.path.join(tmp, f"{mode}{rep}.json"))
            rows.append(res)
            print(f"  {mode}: peak {res['peak_rss'] / 1024**3:.2f} GiB, before {res['rss_before'] / 1024**3:.2f} GiB, "
                  f"build {res['build_s']:.1f} s ({_load()})", flush=True)
        loads.append(_load())
    gib = 1024**3

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["mode"] == mode)

    n = rows[0]["params"]
    print(f"\n{preset} ({n / 1e9:.2f} B parameters, fp32 = {4 * n / gib:.2f} GiB), ZeRO-3 config, "
          f"median of {args.repeats} alternating rounds; {loads[0]} at start, {loads[-1]} at end\n")
    print("| per rank | whole build | zero.Init, 2 ranks | zero.Init / whole |")
    print("|---|---:|---:|---:|")
    pw, pz = med("whole", "peak_rss"), med("zinit", "peak_rss")
    bw, bz = med("whole", "rss_before"), med("zinit", "rss_before")
    print(f"| peak RSS while building | {pw / gib:.2f} GiB | {pz / gib:.2f} GiB | {pz / pw:.2f} |")
    print(f"| peak RSS growth over the process before the build | {(pw - bw) / gib:.2f} GiB | "
          f"{(pz - bz) / gib:.2f} GiB | {(pz - bz) / (pw - bw):.2f} |")
    print(f"| parameter bytes held after the build | {med('whole', 'param_bytes_held') / gib:.2f} GiB | "
          f"{med('zinit', 'param_bytes_held') / gib:.2f} GiB | "
          f"{med('zinit', 'param_bytes_held') / med('whole', 'param_bytes_held'):.2f} |")
    print(f"| build time | {med('whole', 'build_s'):.1f} s | {med('zinit', 'build_s'):.1f} s | "
          f"{med('zinit', 'build_s') / med('whole', 'build_s'):.2f} |")


def gpt_spec(name: str, storage: str, args: argparse.Namespace, tokenizer: str) -> str:
    tok = f", tokenizer: bpe, vocab_size: {args.vocab}" if tokenizer == "bpe" else ""
    return f"""
kind: train
name: {name}
seed: 0
model: {{preset: {args.bpe_preset}}}
data: {{path: "stdlib://", seq_len: {args.bpe_seq}, max_tokens: {args.bpe_bytes}{tok}}}
train: {{steps: {args.bpe_steps}, micro_batch_size: {args.bpe_mbs}, lr: 2.0e-3, warmup_steps: 20,
        eval_every: {args.bpe_steps}, eval_batches: {args.eval_batches}, log_every: 10}}
deepspeed: {{zero_stage: 2}}
resources: {{workers: 2, cpus_per_worker: 1}}
storage: {{path: {storage}}}
checkpoint: {{every: 100000, keep: 1}}
sample: {{max_new_tokens: 0}}
"""


def bpe(args: argparse.Namespace) -> None:
    import ray

    from raybig.cluster.ray_env import ensure_ray
    from raybig.data.text import split_texts
    from raybig.spec import load_spec
    from raybig.tokenizer import BYTES, BpeTokenizer
    from raybig.train.runner import run_train

    ensure_ray(None, num_cpus=3)
    tmp = tempfile.mkdtemp(prefix="raybig-bpebench-")
    out, loads = {}, [_load()]
    for kind in ("bytes", "bpe"):
        spec = load_spec(_write(tmp, kind, gpt_spec(kind, tmp, args, kind)))
        t0 = time.time()
        res = run_train(spec)
        wall = time.time() - t0
        tok = BpeTokenizer.load(os.path.join(res.run_dir, "tokenizer.json")) if kind == "bpe" else BYTES
        _, val = split_texts(spec.data)
        n_bytes = sum(len(t.encode("utf-8")) for t in val)
        n_tok = sum(len(tok.encode(t)) for t in val)
        vals = [h["val_loss"] for h in res.history if "val_loss" in h]
        steps_t = [h["step_time_s"] for h in res.history if "step_time_s" in h]
        out[kind] = {"val_loss": vals[-1], "tok_per_byte": n_tok / n_bytes, "wall": wall,
                     "step": statistics.median(steps_t), "vocab": tok.vocab_size,
                     "bpb": vals[-1] / math.log(2) * n_tok / n_bytes}
        print(f"  {kind}: {out[kind]} ({_load()})", flush=True)
        loads.append(_load())
    b, p = out["bytes"], out["bpe"]
    tokens = args.bpe_steps * args.bpe_mbs * args.bpe_seq * 2
    print(f"\n{args.bpe_preset}, stdlib corpus ({args.bpe_bytes:,} bytes), {args.bpe_steps} steps x 2 workers x "
          f"micro-batch {args.bpe_mbs} x seq {args.bpe_seq} = {tokens:,} training tokens each, ZeRO-2; "
          f"{loads[0]} at start, {loads[-1]} at end\n")
    print("| | bytes | BPE | BPE / bytes |")
    print("|---|---:|---:|---:|")
    print(f"| vocabulary | {b['vocab']} | {p['vocab']} | |")
    print(f"| validation loss (nats/token) | {b['val_loss']:.3f} | {p['val_loss']:.3f} | |")
    print(f"| tokens per byte (validation split) | {b['tok_per_byte']:.3f} | {p['tok_per_byte']:.3f} | "
          f"{p['tok_per_byte'] / b['tok_per_byte']:.3f} |")
    print(f"| **validation bits per byte** | {b['bpb']:.3f} | {p['bpb']:.3f} | {p['bpb'] / b['bpb']:.3f} |")
    print(f"| median step time | {b['step'] * 1e3:.0f} ms | {p['step'] * 1e3:.0f} ms | {p['step'] / b['step']:.2f} |")
    print(f"| wall, run_train to result (BPE training included) | {b['wall']:.0f} s | {p['wall']:.0f} s | "
          f"{p['wall'] / b['wall']:.2f} |")
    ray.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", action="store_true")
    ap.add_argument("--zinit", action="store_true")
    ap.add_argument("--bpe", action="store_true")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="steps left out; a multiple of --log-every")
    ap.add_argument("--log-every", type=int, default=2)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--zinit-preset", default="gpt-1.3b")
    ap.add_argument("--bpe-preset", default="gpt-tiny")
    ap.add_argument("--bpe-steps", type=int, default=200)
    ap.add_argument("--bpe-mbs", type=int, default=16)
    ap.add_argument("--bpe-seq", type=int, default=128)
    ap.add_argument("--bpe-bytes", type=int, default=4_000_000)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--eval-batches", type=int, default=16)
    a = ap.parse_args()
    if not (a.step or a.zinit or a.bpe):
        ap.error("give --step, --zinit and/or --bpe")
    for flag, fn in ((a.step, step), (a.zinit, zinit), (a.bpe, bpe)):
        if flag:
            fn(a)

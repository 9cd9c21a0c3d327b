"""Data pipeline benchmarks: prepare throughput (Ray Data vs one process), per-rank RSS, batch latency.

    .venv/bin/python benchmarks/data_bench.py                       # small: 20 MB corpus, 10 vs 100 MB
    .venv/bin/python benchmarks/data_bench.py --mb 200 --large-mb 1000 --tokenizer bpe

1. Prepare: the same corpus (generated jsonl) and tokenizer, `prepare(use_ray=False)` (a plain
   loop in this process) against `prepare(use_ray=True)` (Ray Data tasks on a fresh local Ray with
   `--cpus` CPUs). Ray is timed twice: cold (workers start and import) and warm. With `--tokenizer
   bpe` a byte-level BPE is trained locally (HF `tokenizers`) and used through transformers, with
   `TOKENIZERS_PARALLELISM=false` so the single-process baseline really is single-threaded.
2. RSS: a fresh process opens rank 0 of 2 on a small and a large prepared text set and samples
   `--steps` batches (B=8, T=256); its peak RSS is compared (target ratio <= 1.1), for local
   reads by pread (default) and by np.memmap (whose mapped page-cache pages count as RSS).
3. Latency: mean seconds per `get(step, micro)` in that process (the time a rank waits for data).
4. `--wait-run RUN_DIR [RUN_DIR ...]`: from finished runs' metrics.jsonl, the share of step time
   rank 0 waited for batches (`data_wait_frac`, reported by the training loop per log window) and
   the step time, e.g. after `raybig run jobs/quickstart.yaml` and `raybig run jobs/instruction.yaml`.

Prints markdown tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = np.array(("the of and to in is was for on that with as by at from it his an were are which "
                  "this be or has had not but first one their its new after who they have her she two "
                  "been other when there all during into school time may years more most only over city "
                  "some world would where later up such used many can state about national out known "
                  "university united then made").split())


def make_jsonl(path: str, mb: float, seed: int = 0) -> None:
    """Generated English-like jsonl records of `{"text": ...}` totalling about `mb` megabytes."""
    rng = np.random.default_rng(seed)
    target = int(mb * 1e6)
    written = 0
    with open(path, "w") as fh:
        while written < target:
            lines = []
            for _ in range(200):
                text = " ".join(WORDS[rng.integers(0, len(WORDS), rng.integers(50, 400))])
                lines.append(json.dumps({"text": text}))
            blob = "\n".join(lines) + "\n"
            fh.write(blob)
            written += len(blob)


def make_text(path: str, mb: float, seed: int = 0) -> None:
    """A plain text file of about `mb` megabytes of random lowercase letters and spaces."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     \n", np.uint8)
    with open(path, "wb") as fh:
        left = int(mb * 1e6)
        while left > 0:
            n = min(left, 1 << 24)
            fh.write(alphabet[rng.integers(0, len(alphabet), n)].tobytes())
            left -= n


def bpe_tokenizer(corpus: str, vocab: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    with open(corpus) as fh:
        sample = [json.loads(next(fh))["text"] for _ in range(500)]
    tk.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", name_or_path="bench-bpe")


def bench_prepare(work: str, mb: float, tokenizer: str, cpus: int) -> dict:
    import ray

    from raybig.data.prepare import PrepareOptions, prepare

    src = os.path.join(work, "corpus")
    os.makedirs(src, exist_ok=True)
    for i in range(4):  # several files, so both paths see the same work items
        make_jsonl(os.path.join(src, f"part{i}.jsonl"), mb / 4, seed=i)
    tok = bpe_tokenizer(os.path.join(src, "part0.jsonl")) if tokenizer == "bpe" else None
    opts = PrepareOptions(path=src, chunk_bytes=4 << 20, val_fraction=0.01)
    t = time.perf_counter()
    local = prepare(opts, os.path.join(work, "single"), tok, use_ray=False)
    single_s = time.perf_counter() - t

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        t = time.perf_counter()
        cold = prepare(opts, os.path.join(work, "ray-cold"), tok)
        cold_s = time.perf_counter() - t
        t = time.perf_counter()
        warm = prepare(opts, os.path.join(work, "ray-warm"), tok)
        warm_s = time.perf_counter() - t
    finally:
        ray.shutdown()
    assert local.tokens == cold.tokens == warm.tokens
    return {"mb": mb, "tokenizer": tokenizer, "tokens": local.tokens, "cpus": cpus,
            "single_tok_s": local.tokens / single_s, "ray_cold_tok_s": cold.tokens / cold_s,
            "ray_warm_tok_s": warm.tokens / warm_s,
            "ratio_cold": single_s / cold_s, "ratio_warm": single_s / warm_s}


def rss_child(uri: str, steps: int, local_io: str) -> None:
    import psutil

    from raybig.data.shards import ShardBatches

    proc = psutil.Process()
    base = proc.memory_info().rss
    b = ShardBatches(uri, 256, 8, seed=0, rank=0, world_size=2, local_io=local_io)
    peak = 0
    t = time.perf_counter()
    for s in range(steps):
        b.get(s, 0)
        if s % 10 == 0:
            peak = max(peak, proc.memory_info().rss)
    per_get = (time.perf_counter() - t) / steps
    peak = max(peak, proc.memory_info().rss)
    print(json.dumps({"rss_peak": peak, "rss_base": base, "s_per_get": per_get,
                      "bytes_read": b.bytes_read()["train"], "share_bytes": b.share_bytes()}))


def bench_rss(work: str, small_mb: float, large_mb: float, steps: int) -> dict:
    from raybig.data.prepare import PrepareOptions, prepare

    out: dict = {}
    for label, mb in (("small", small_mb), ("large", large_mb)):
        d = os.path.join(work, f"rss-{label}")
        os.makedirs(d, exist_ok=True)
        make_text(os.path.join(d, "corpus.txt"), mb, seed=1)
        s = prepare(PrepareOptions(path=os.path.join(d, "corpus.txt"), val_fraction=0.01),
                    os.path.join(d, "out"), use_ray=False)
        for io in ("pread", "mmap"):
            r = subprocess.run([sys.executable, __file__, "--rss-child", s.uri, "--steps", str(steps),
                                "--local-io", io], capture_output=True, text=True, check=True, cwd=ROOT)
            out[f"{label}-{io}"] = {"mb": mb, "io": io, "tokens": s.tokens,
                                    **json.loads(r.stdout.strip().splitlines()[-1])}
    for io in ("pread", "mmap"):
        out[f"rss_ratio_{io}"] = out[f"large-{io}"]["rss_peak"] / out[f"small-{io}"]["rss_peak"]
    return out


def wait_table(run_dirs: list[str]) -> dict:
    """Mean `data_wait_frac` and step time of each run's log windows (the first window, which holds
    start-up and the step-0 evaluation, is left out)."""
    out = {}
    print("\n### Time a rank waits for data, as a share of step time\n")
    print("| run | model | seq_len x micro batch | windows | mean step s | data wait share (mean) | max |\n"
          "|---|---|---|---:|---:|---:|---:|")
    for d in run_dirs:
        import yaml

        spec = yaml.safe_load(open(os.path.join(d, "spec.yaml")))
        rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if line.strip()]
        w = [r for r in rows if "data_wait_frac" in r][1:]
        if not w:
            continue
        mean = sum(r["data_wait_frac"] for r in w) / len(w)
        step = sum(r["step_time_s"] for r in w) / len(w)
        model = spec["model"].get("preset") or spec["model"].get("hf") or "custom"
        print(f"| {spec['name']} | {model} | {spec['data']['seq_len']} x {spec['train']['micro_batch_size']} | "
              f"{len(w)} | {step:.3f} | {100 * mean:.2f}% | {100 * max(r['data_wait_frac'] for r in w):.2f}% |")
        out[spec["name"]] = {"mean_wait_frac": mean, "mean_step_s": step, "windows": len(w)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20, help="prepare corpus size in MB")
    ap.add_argument("--tokenizer", choices=["bytes", "bpe"], default="bpe")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--small-mb", type=float, default=10)
    ap.add_argument("--large-mb", type=float, default=100)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--skip-prepare", action="store_true")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--local-io", default="pread", help=argparse.SUPPRESS)
    ap.add_argument("--wait-run", nargs="+", metavar="RUN_DIR", help="only: data-wait share of finished runs")
    a = ap.parse_args()
    if a.wait_run:
        print(json.dumps(wait_table(a.wait_run)))
        return
    if a.rss_child:
        rss_child(a.rss_child, a.steps, a.local_io)
        return
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="raybig-data-bench-") as work:
        if not a.skip_prepare:
            p = res["prepare"] = bench_prepare(work, a.mb, a.tokenizer, a.cpus)
            print(f"\n### Prepare throughput ({p['mb']:.0f} MB jsonl, {p['tokenizer']} tokenizer, "
                  f"{p['tokens']:,} tokens, {p['cpus']} CPUs)\n")
            print("| path | tokens/s | vs single process |\n|---|---:|---:|")
            print(f"| single process | {p['single_tok_s']:,.0f} | 1.00x |")
            print(f"| Ray Data (cold) | {p['ray_cold_tok_s']:,.0f} | {p['ratio_cold']:.2f}x |")
            print(f"| Ray Data (warm) | {p['ray_warm_tok_s']:,.0f} | {p['ratio_warm']:.2f}x |")
        r = res["rss"] = bench_rss(work, a.small_mb, a.large_mb, a.steps)
        print(f"\n### Per-rank memory while sampling ({a.steps} batches of 8x256, rank 0 of 2)\n")
        print("| corpus | local io | tokens | peak RSS MB | bytes read MB | share MB | ms per batch |\n"
              "|---|---|---:|---:|---:|---:|---:|")
        for k in ("small-pread", "large-pread", "small-mmap", "large-mmap"):
            v = r[k]
            print(f"| {v['mb']:.0f} MB | {v['io']} | {v['tokens']:,} | {v['rss_peak'] / 2**20:.1f} | "
                  f"{v['bytes_read'] / 2**20:.1f} | {v['share_bytes'] / 2**20:.1f} | {v['s_per_get'] * 1e3:.2f} |")
        print(f"\nRSS ratio large/small: pread {r['rss_ratio_pread']:.3f}, mmap {r['rss_ratio_mmap']:.3f} "
              "(target <= 1.1)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()

"""Evaluation throughput: raybig's perplexity path against lm-eval's own `hf` runner, same export, same task.

    .venv/bin/python benchmarks/eval_bench.py [--preset gpt-tiny] [--repeats 3] [--threads 1]

One raybig GPT (random init, the preset's shape) is exported as a `GPT2LMHeadModel` folder; both
sides score the shipped rolling-loglikelihood task `raybig_stdlib_docs` (20 stdlib docstrings) with
the same disjoint windows (context = the model's block size, a newline as the first token's prefix):

- raybig: `raybig.eval.perplexity.perplexity_of_text` on raybig's GPT loaded from the export
  (`raybig.train.export.load_model`), batch 8 windows;
- lm-eval: `raybig.eval.harness.run_harness` (lm-eval `simple_evaluate`, model `hf`, batch 8) on
  the export folder; its wall time includes lm-eval building the task and loading the model, so
  the model load is also timed alone and reported.

Prints one JSON line per repeat and a markdown table of medians. Bits per byte of both sides must
agree (they score the same tokens); the script asserts it to 1e-4 relative.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt-tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from raybig.eval.harness import TASKS_DIR, run_harness
    from raybig.eval.perplexity import perplexity_of_text
    from raybig.model import GPT, GPTConfig
    from raybig.spec.models import PRESETS
    from raybig.tokenizer import get_tokenizer
    from raybig.train.export import load_model
    from raybig.train.export_hf import export_raybig_gpt

    tmp = tempfile.mkdtemp(prefix="raybig-eval-bench-")
    os.environ.setdefault("HF_DATASETS_CACHE", f"{tmp}/ds-cache")
    torch.manual_seed(0)
    cfg = GPTConfig(**PRESETS[args.preset], vocab_size=256)
    tok = get_tokenizer("bytes")
    export = f"{tmp}/export"
    export_raybig_gpt(GPT(cfg).eval(), cfg, tok, export)
    docs = [json.loads(line)["text"] for line in open(TASKS_DIR / "stdlib_docs.jsonl")]
    tokens = sum(len(tok.encode(d)) for d in docs)
    rows = []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        model, _ = load_model(export)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = None
        for d in docs:
            r = perplexity_of_text(model, d, tok.encode, cfg.block_size, batch_size=8, bos_id=10)
            res = r if res is None else res.merge(r)
        t_ours = time.perf_counter() - t0
        assert res is not None
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        AutoModelForCausalLM.from_pretrained(export)
        t_hf_load = time.perf_counter() - t0
        h = run_harness(export, ["raybig_stdlib_docs"], batch_size=8)
        bpb = h.metric("raybig_stdlib_docs", "bits_per_byte")
        assert abs(bpb - res.bits_per_byte) <= 1e-4 * res.bits_per_byte, (bpb, res.bits_per_byte)
        row = {"repeat": rep, "tokens": tokens, "raybig_s": t_ours, "raybig_load_s": t_load,
               "lm_eval_s": h.elapsed_s, "hf_load_s": t_hf_load, "bits_per_byte": res.bits_per_byte}
        rows.append(row)
        print(json.dumps(row), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("raybig_s", "raybig_load_s", "lm_eval_s", "hf_load_s")}
    print(f"\n{args.preset}, {tokens:,} tokens (raybig_stdlib_docs), {args.threads} thread(s), "
          f"median of {len(rows)}:\n")
    print("| | scoring time | tokens/s | model load |")
    print("|---|---:|---:|---:|")
    print(f"| raybig `perplexity_of_text` | {med['raybig_s']:.2f} s | {tokens / med['raybig_s']:,.0f} | "
          f"{med['raybig_load_s']:.2f} s |")
    print(f"| lm-eval `hf` (simple_evaluate, task build + load included) | {med['lm_eval_s']:.2f} s | "
          f"{tokens / med['lm_eval_s']:,.0f} | {med['hf_load_s']:.2f} s |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

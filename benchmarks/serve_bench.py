"""Serving benchmark: continuous vs static batching, Serve overhead, KV cache, int8. Prints markdown.

    .venv/bin/python benchmarks/serve_bench.py [--preset gpt-tiny] [--max-tokens 32]
    .venv/bin/python benchmarks/serve_bench.py --skip-engine --skip-serve --cb   # issue 16's figures

`--cb`: continuous (`batching.mode: continuous`) against the static `@serve.batch` engine
(`batching.mode: static`), both max_num_seqs 32, at 8 and 32 streaming clients whose max_tokens are
drawn uniformly from 16..256 (same draws for both): throughput (generated tokens/s) and p99 time to
first token (first streamed event), and the latency Serve adds over the in-process engine at 1 client.

Weights are random (throughput does not depend on training). Starts its own embedded Ray and a
Serve proxy on free ports; everything is shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import torch

from raybig.model import GPT, GPTConfig
from raybig.serve.engine import Batch, Engine, Row, quantize_int8
from raybig.spec.models import PRESETS
from raybig.tokenizer import encode
from raybig.train.export import load_model, write_export

PROMPT = "def fibonacci(n):\n    "


def make_export(preset: str, root: str, block_size: int | None = None) -> str:
    torch.manual_seed(0)
    cfg = GPTConfig(**{**PRESETS[preset], **({"block_size": block_size} if block_size else {})})
    model = GPT(cfg)
    write_export(f"{root}/run", model.state_dict(), cfg.to_dict(), tied=GPT.tied_keys, name=preset)
    return f"{root}/run"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def load(url: str, clients: int, requests_n: int, max_tokens: int) -> dict[str, float]:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    lat: list[float] = []

    def one(_: int) -> None:
        t = time.perf_counter()
        r = requests.post(f"{url}/completions", json=body, timeout=600)
        r.raise_for_status()
        lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests_n)))
    wall = time.perf_counter() - t0
    return {"rps": requests_n / wall, "p50": pct(lat, 0.5) * 1e3, "p99": pct(lat, 0.99) * 1e3}


def in_process_latency(ckpt: str, max_tokens: int, n: int = 20) -> float:
    model, _ = load_model(ckpt)
    torch.set_num_threads(1)  # as in the replica (num_cpus 1)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        b = Batch(model, [Row(encode(PROMPT), max_tokens, 0.0)])
        while not b.all_done:
            b.step()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def serve_section(ckpt: str, max_tokens: int, batch_wait: float) -> list[str]:
    import ray
    from ray import serve

    from raybig.cluster.ray_env import ensure_ray, free_port
    from raybig.serve.deploy import deploy, wait_running
    from raybig.spec import load_spec_text

    info = ensure_ray(num_cpus=4, dashboard=True)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    dash = f"http://{info['dashboard_url']}"
    urls = {}
    on = f"{{max_batch_size: 32, max_ongoing_requests: 64, batch_wait_timeout_s: {batch_wait}}}"
    for name, batching in (("b-on", on),
                           ("b-off", "{enabled: false, max_ongoing_requests: 64}")):
        spec = load_spec_text(f"kind: serve\nname: {name}\ncheckpoint: {ckpt}\nroute_prefix: /{name}\n"
                              f"resources: {{num_cpus: 1}}\nbatching: {batching}\n"
                              f"generation: {{max_tokens: {max_tokens}, max_new_tokens: {max_tokens}}}\n")
        deploy(spec, dash)
        urls[name] = wait_running(name, dash, timeout_s=300)["url"]
    for u in urls.values():  # warm up
        load(u, 2, 4, max_tokens)
    rows = ["| clients | batching on: req/s | p50 ms | p99 ms | batching off: req/s | p50 ms | p99 ms "
            "| throughput on/off |", "|---|---|---|---|---|---|---|---|"]
    res: dict[tuple[str, int], dict[str, float]] = {}
    for clients in (1, 8, 32):
        n = max(16, clients * 4)
        for name in ("b-on", "b-off"):
            res[(name, clients)] = load(urls[name], clients, n, max_tokens)
        a, b = res[("b-on", clients)], res[("b-off", clients)]
        rows.append(f"| {clients} | {a['rps']:.1f} | {a['p50']:.0f} | {a['p99']:.0f} | {b['rps']:.1f} | "
                    f"{b['p50']:.0f} | {b['p99']:.0f} | **{a['rps'] / b['rps']:.2f}x** |")
    inproc = in_process_latency(ckpt, max_tokens)
    served = res[("b-off", 1)]["p50"]
    rows += ["", "| 1 client, batching off | p50 latency ms |", "|---|---|",
             f"| in-process generate (same engine, 1 thread) | {inproc:.1f} |",
             f"| over Serve HTTP | {served:.1f} |",
             f"| added by Serve | {served - inproc:.1f} ms (**{served / inproc:.2f}x**) |"]
    serve.shutdown()
    ray.shutdown()
    return rows


def tokens_per_s(model: torch.nn.Module, rows: int, new: int, use_cache: bool = True) -> float:
    t = time.perf_counter()
    if use_cache:
        b = Batch(model, [Row(encode(PROMPT), new, 0.0) for _ in range(rows)])
        while not b.all_done:
            b.step()
    else:
        model.generate(torch.tensor([encode(PROMPT)] * rows), new, temperature=0, use_cache=False)
    return rows * new / (time.perf_counter() - t)


def paired(a: Any, b: Any, reps: int) -> tuple[float, float, float]:
    """Interleave a and b `reps` times (a shared, noisy box hits both alike); medians and median ratio."""
    xs, ys = [], []
    for _ in range(reps):
        xs.append(a())
        ys.append(b())
    ratio = statistics.median(y / x for x, y in zip(xs, ys, strict=True))
    return statistics.median(xs), statistics.median(ys), ratio


def engine_section(preset: str, kv_preset: str, reps: int) -> list[str]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    small = GPT(GPTConfig(**PRESETS[kv_preset])).eval()
    nokv, kv, r_kv = paired(lambda: tokens_per_s(small, 1, 128, False), lambda: tokens_per_s(small, 1, 128), reps)
    m = GPT(GPTConfig(**PRESETS[preset])).eval()
    q = quantize_int8(m)
    f1, i1, r1 = paired(lambda: tokens_per_s(m, 1, 32), lambda: tokens_per_s(q, 1, 32), reps)
    f8, i8, r8 = paired(lambda: tokens_per_s(m, 8, 32), lambda: tokens_per_s(q, 8, 32), reps)
    return [f"| 1 torch thread, medians of {reps} interleaved pairs | tokens/s | ratio (median of pairs) |",
            "|---|---|---|",
            f"| {kv_preset}: 128 new tokens, no KV cache (recompute) | {nokv:.0f} | 1.00x |",
            f"| {kv_preset}: 128 new tokens, KV cache | {kv:.0f} | **{r_kv:.2f}x** |",
            f"| {preset}: fp32, batch 1, 32 tokens | {f1:.0f} | 1.00x |",
            f"| {preset}: int8 dynamic, batch 1, 32 tokens | {i1:.0f} | **{r1:.2f}x** |",
            f"| {preset}: fp32, batch 8, 32 tokens | {f8:.0f} | 1.00x |",
            f"| {preset}: int8 dynamic, batch 8, 32 tokens | {i8:.0f} | **{r8:.2f}x** |"]


def stream_one(url: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed greedy request: (time to first token s, latency s, completion tokens)."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t = time.perf_counter()
    ttft, toks = None, 0
    with requests.post(f"{url}/completions", json=body, stream=True, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            if ttft is None:
                ttft = time.perf_counter() - t
            ev = json.loads(line[6:])
            if ev.get("usage"):
                toks = ev["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - t, toks


def cb_load(url: str, clients: int, draws: list[int]) -> dict[str, float]:
    """`clients` closed-loop clients work through `draws` (one request per max_tokens value)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        res = list(pool.map(lambda m: stream_one(url, m), draws))
    wall = time.perf_counter() - t0
    return {"tok_s": sum(r[2] for r in res) / wall, "rps": len(draws) / wall,
            "ttft_p50": pct([r[0] for r in res], 0.5) * 1e3, "ttft_p99": pct([r[0] for r in res], 0.99) * 1e3,
            "lat_p50": pct([r[1] for r in res], 0.5) * 1e3}


def cb_section(ckpt: str, per_client: int, seed: int) -> list[str]:
    import random

    import ray
    from ray import serve

    from raybig.cluster.ray_env import ensure_ray, free_port
    from raybig.serve.deploy import deploy, wait_running
    from raybig.spec import load_spec_text

    info = ensure_ray(num_cpus=4, dashboard=True)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    dash = f"http://{info['dashboard_url']}"
    urls = {}
    for mode in ("continuous", "static"):
        spec = load_spec_text(f"kind: serve\nname: cb-{mode}\ncheckpoint: {ckpt}\nroute_prefix: /cb-{mode}\n"
                              f"resources: {{num_cpus: 1}}\nbatching: {{mode: {mode}, max_num_seqs: 32, "
                              f"max_ongoing_requests: 64, batch_wait_timeout_s: 0.01}}\n"
                              f"generation: {{max_tokens: 16, max_new_tokens: 256, max_prompt_tokens: 64}}\n")
        deploy(spec, dash)
        urls[mode] = wait_running(spec.name, dash, timeout_s=300)["url"]
    for u in urls.values():
        cb_load(u, 2, [8, 8])  # warm up
    rng = random.Random(seed)
    rows = ["| clients | requests | continuous tok/s | static tok/s | **throughput ratio** | continuous p99 TTFT ms "
            "| static p99 TTFT ms | **p99 TTFT ratio** |", "|---|---|---|---|---|---|---|---|"]
    for clients in (8, 32):
        draws = [rng.randint(16, 256) for _ in range(clients * per_client)]
        c, st = cb_load(urls["continuous"], clients, draws), cb_load(urls["static"], clients, draws)
        rows.append(f"| {clients} | {len(draws)} | {c['tok_s']:.0f} | {st['tok_s']:.0f} | "
                    f"**{c['tok_s'] / st['tok_s']:.2f}x** | {c['ttft_p99']:.0f} | {st['ttft_p99']:.0f} | "
                    f"**{c['ttft_p99'] / st['ttft_p99']:.2f}x** |")
    # Serve-added latency at 1 client: the continuous app vs the same engine in-process.
    model, _ = load_model(ckpt)
    torch.set_num_threads(1)
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        e = Engine(model, 32, 64 + 256)
        e.add([Row(encode(PROMPT), 32, 0.0)], lambda toks: None)
        while e.has_work:
            e.step()
        ts.append(time.perf_counter() - t)
    inproc = statistics.median(ts) * 1e3
    served = load(urls["continuous"], 1, 10, 32)["p50"]
    rows += ["", "| 1 client, 32 tokens, continuous | p50 latency ms |", "|---|---|",
             f"| in-process engine (1 thread) | {inproc:.1f} |", f"| over Serve HTTP | {served:.1f} |",
             f"| Serve-added | {served - inproc:.1f} ms (**{served / inproc:.2f}x**) |"]
    serve.shutdown()
    ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt-tiny")
    ap.add_argument("--engine-preset", default="gpt-mini", help="model for fp32 vs int8")
    ap.add_argument("--kv-preset", default="gpt-tiny", help="model for KV cache vs none")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--batch-wait", type=float, default=0.05, help="batch_wait_timeout_s with batching on")
    ap.add_argument("--cb", action="store_true", help="continuous vs static batching (issue 16)")
    ap.add_argument("--per-client", type=int, default=2, help="--cb: requests per client")
    a = ap.parse_args()
    if a.cb:
        with tempfile.TemporaryDirectory() as root:
            ckpt = make_export(a.preset, root, block_size=512)
            out = ["", f"### Continuous vs static batching ({a.preset}, block 512, 1 replica of 1 CPU, "
                   "max_tokens ~ U[16, 256], streamed, greedy)", ""] + cb_section(ckpt, a.per_client, 0)
            print("\n".join(out), flush=True)
    with tempfile.TemporaryDirectory() as root:
        ckpt = make_export(a.preset, root)
        if not a.skip_engine:
            out: list[Any] = ["### Engine (random weights)", ""] + engine_section(a.engine_preset, a.kv_preset,
                                                                                 a.reps)
            print("\n".join(out), flush=True)
        if not a.skip_serve:
            out = ["", f"### Ray Serve ({a.preset}, 1 replica of 1 CPU, {a.max_tokens} new tokens/request, "
                   f"batch_wait_timeout_s {a.batch_wait})", ""] + serve_section(ckpt, a.max_tokens, a.batch_wait)
            print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()

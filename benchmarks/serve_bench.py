"""Serving benchmark: batching, Serve overhead, KV cache, int8. Prints markdown tables.

    .venv/bin/python benchmarks/serve_bench.py [--preset gpt-tiny] [--max-tokens 32]

Weights are random (throughput does not depend on training). Starts its own embedded Ray and a
Serve proxy on free ports; everything is shut down at the end.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
import torch

from raybig.serve.engine import Batch, Row, quantize_int8
from raybig.spec.models import PRESETS
from raybig.train.data import encode
from raybig.train.export import load_model, write_export
from raybig.train.model import GPT, GPTConfig

PROMPT = "def fibonacci(n):\n    "


def make_export(preset: str, root: str) -> str:
    torch.manual_seed(0)
    cfg = GPTConfig(**PRESETS[preset])
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


def serve_section(ckpt: str, max_tokens: int) -> list[str]:
    import ray
    from ray import serve

    from raybig.ray_env import ensure_ray, free_port
    from raybig.serve.deploy import deploy, wait_running
    from raybig.spec import load_spec_text

    info = ensure_ray(num_cpus=4, dashboard=True)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    dash = f"http://{info['dashboard_url']}"
    urls = {}
    for name, batching in (("b-on", "{max_batch_size: 32, max_ongoing_requests: 64, batch_wait_timeout_s: 0.005}"),
                           ("b-off", "{enabled: false, max_ongoing_requests: 64}")):
        spec = load_spec_text(f"kind: serve\nname: {name}\ncheckpoint: {ckpt}\nroute_prefix: /{name}\n"
                              f"resources: {{num_cpus: 1}}\nbatching: {batching}\n"
                              f"generation: {{max_new_tokens: {max_tokens}}}\n")
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


def tokens_per_s(model: torch.nn.Module, rows: int, new: int, use_cache: bool = True, reps: int = 3) -> float:
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        if use_cache:
            b = Batch(model, [Row(encode(PROMPT), new, 0.0) for _ in range(rows)])
            while not b.all_done:
                b.step()
        else:
            model.generate(torch.tensor([encode(PROMPT)] * rows), new, temperature=0, use_cache=False)
        best = max(best, rows * new / (time.perf_counter() - t))
    return best


def engine_section(preset: str) -> list[str]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = GPT(GPTConfig(**PRESETS[preset])).eval()
    kv = tokens_per_s(m, 1, 128, True)
    nokv = tokens_per_s(m, 1, 128, False)
    q = quantize_int8(m)
    f32 = {b: tokens_per_s(m, b, 64) for b in (1, 8)}
    i8 = {b: tokens_per_s(q, b, 64) for b in (1, 8)}
    return [f"| {preset}, 1 thread | tokens/s | ratio |", "|---|---|---|",
            f"| 128 new tokens, no KV cache (recompute) | {nokv:.0f} | 1.00x |",
            f"| 128 new tokens, KV cache | {kv:.0f} | **{kv / nokv:.2f}x** |",
            f"| fp32, batch 1, 64 tokens | {f32[1]:.0f} | 1.00x |",
            f"| int8 dynamic, batch 1, 64 tokens | {i8[1]:.0f} | **{i8[1] / f32[1]:.2f}x** |",
            f"| fp32, batch 8, 64 tokens | {f32[8]:.0f} | 1.00x |",
            f"| int8 dynamic, batch 8, 64 tokens | {i8[8]:.0f} | **{i8[8] / f32[8]:.2f}x** |"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt-tiny")
    ap.add_argument("--engine-preset", default="gpt-mini")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip-serve", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        ckpt = make_export(a.preset, root)
        out: list[Any] = [f"### Engine ({a.engine_preset}, random weights)", ""] + engine_section(a.engine_preset)
        print("\n".join(out), flush=True)
        if not a.skip_serve:
            out = ["", f"### Ray Serve ({a.preset}, 1 replica of 1 CPU, {a.max_tokens} new tokens/request)",
                   ""] + serve_section(ckpt, a.max_tokens)
            print("\n".join(out), flush=True)


if __name__ == "__main__":
    main()

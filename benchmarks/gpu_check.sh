#!/usr/bin/env bash
# One GPU check (issue 14 item 7), at most ~8 minutes on one GPU machine:
#   1. GPT-2 125M (raybig's GPT), ZeRO-2, bf16: tokens/s and MFU;
#   2. a 1B-class Llama-shaped Hugging Face model (random init from hf_config) at ZeRO-3;
#   3. a served completion from the GPU.
# Run from the repo root with the venv active:  bash benchmarks/gpu_check.sh [OUT_DIR]
# Prints one JSON line per check to stdout and keeps the runs under OUT_DIR (default /tmp/raybig-gpu-check).
set -euo pipefail
OUT=${1:-/tmp/raybig-gpu-check}
mkdir -p "$OUT"
unset DS_ACCELERATOR  # DeepSpeed must pick CUDA (the worker env sets it too)
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# 1. GPT-2 125M, ZeRO-2, bf16, 1 worker x 1 GPU (MFU needs the GPU's peak: raybig.metrics knows A100/H100/H200).
cat > "$OUT/gpt2_125m.yaml" <<YAML
kind: train
name: gpu-gpt2-125m
model: {preset: gpt2-125m}
data: {path: "stdlib://", seq_len: 1024, max_tokens: 16000000}
train: {steps: 60, micro_batch_size: 16, lr: 6.0e-4, warmup_steps: 10, eval_every: 1000, eval_batches: 2, log_every: 10}
deepspeed: {zero_stage: 2, precision: bf16}
resources: {workers: 1, cpus_per_worker: 4, gpus_per_worker: 1}
storage: {path: $OUT/runs}
checkpoint: {every: 1000, keep: 1}
sample: {max_new_tokens: 0}
YAML
timeout 240 raybig run "$OUT/gpt2_125m.yaml" --json > "$OUT/gpt2_125m.json"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
hist = [json.loads(l) for l in open(f"{out}/runs/gpu-gpt2-125m/metrics.jsonl") if l.strip()]
last = [h for h in hist if "tokens_per_s" in h][-1]
import torch
from raybig.metrics import peak_flops
from raybig.model import GPTConfig, flops_per_token
peak = peak_flops(torch.cuda.get_device_name(0))
cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=256)
mfu = last["tokens_per_s"] * flops_per_token(cfg, 1024) / peak if peak else None
print(json.dumps({"check": "gpt2-125m zero2 bf16", "tokens_per_s": last["tokens_per_s"],
                  "mfu": mfu, "step_time_s": last["step_time_s"], "loss": last["loss"],
                  "peak_mem_gib": last["peak_mem_bytes"] / 2**30}))
PY

# 2. A 1B-class Llama shape (TinyLlama-1.1B: hidden 2048, 22 layers, GQA 32/4, SwiGLU 5632) at ZeRO-3,
#    built partitioned (zero.Init) from its config alone; byte tokens keep the data step trivial.
cat > "$OUT/llama_1b.yaml" <<YAML
kind: train
name: gpu-llama-1b-zero3
model:
  hf_config: {model_type: llama, vocab_size: 32000, hidden_size: 2048, intermediate_size: 5632,
              num_hidden_layers: 22, num_attention_heads: 32, num_key_value_heads: 4,
              max_position_embeddings: 2048, tie_word_embeddings: false}
data: {path: "stdlib://", seq_len: 1024, tokenizer: bytes, max_tokens: 8000000}
train: {steps: 20, micro_batch_size: 4, lr: 3.0e-4, warmup_steps: 2, eval_every: 1000, eval_batches: 1, log_every: 5,
        activation_checkpointing: true}
deepspeed: {zero_stage: 3, precision: auto}
resources: {workers: 1, cpus_per_worker: 4, gpus_per_worker: 1}
storage: {path: $OUT/runs}
checkpoint: {every: 1000, keep: 1}
sample: {max_new_tokens: 0}
YAML
raybig validate "$OUT/llama_1b.yaml"
timeout 300 raybig run "$OUT/llama_1b.yaml" --json > "$OUT/llama_1b.json"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
hist = [json.loads(l) for l in open(f"{out}/runs/gpu-llama-1b-zero3/metrics.jsonl") if l.strip()]
last = [h for h in hist if "tokens_per_s" in h][-1]
print(json.dumps({"check": "llama-1b zero3", "tokens_per_s": last["tokens_per_s"],
                  "loss": last["loss"], "peak_mem_gib": last["peak_mem_bytes"] / 2**30}))
PY

# 3. A served completion from the GPU: the 125M export of check 1 on a replica with num_gpus 1 (bf16
#    where native, else fp16), continuous batching; 8 concurrent greedy requests, then the stats.
timeout 240 python - "$OUT" <<'PY'
import json, sys, time
from concurrent.futures import ThreadPoolExecutor

import requests

from raybig.serve.local import start_serve
from raybig.spec import load_spec_text

out = sys.argv[1]
spec = load_spec_text(f"kind: serve\nname: gpu-serve\ncheckpoint: {out}/runs/gpu-gpt2-125m\n"
                      "resources: {num_cpus: 2, num_gpus: 1}\nbatching: {max_num_seqs: 16}\nport: 8011\n"
                      "generation: {max_tokens: 64, max_new_tokens: 128}\n")
res = start_serve(spec)
url = res["url"]
body = {"prompt": "def main():", "max_tokens": 64, "temperature": 0}
t = time.perf_counter()
with ThreadPoolExecutor(8) as pool:
    rs = list(pool.map(lambda _: requests.post(f"{url}/completions", json=body, timeout=120), range(8)))
wall = time.perf_counter() - t
assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
texts = {r.json()["choices"][0]["text"] for r in rs}
stats = requests.get(f"{url}/engine/stats", timeout=30).json()
print(json.dumps({"check": "serve gpu", "requests": 8, "wall_s": round(wall, 2), "same_greedy_text": len(texts) == 1,
                  "tokens_per_s": round(sum(r.json()["usage"]["completion_tokens"] for r in rs) / wall, 1),
                  "engine": stats}))
from ray import serve
serve.shutdown()
PY

# 4. engine: vllm (Ray Serve LLM) on the same export, only where vllm is installed: same routes.
if python -c "import vllm" 2>/dev/null; then
timeout 300 python - "$OUT" <<'PY'
import json, sys, time

import requests

from raybig.serve.local import start_serve
from raybig.spec import load_spec_text

out = sys.argv[1]
spec = load_spec_text(f"kind: serve\nname: gpu-vllm\ncheckpoint: {out}/runs/gpu-gpt2-125m\nengine: vllm\n"
                      "resources: {num_cpus: 2, num_gpus: 1}\nport: 8012\n"
                      "generation: {max_tokens: 64, max_new_tokens: 128}\n")
t = time.perf_counter()
res = start_serve(spec)
r = requests.post(f"{res['url']}/completions", json={"model": "gpu-vllm", "prompt": "def main():",
                  "max_tokens": 32, "temperature": 0}, timeout=120)
print(json.dumps({"check": "serve vllm", "status": r.status_code, "ready_s": round(time.perf_counter() - t, 1),
                  "text": r.json()["choices"][0]["text"][:80] if r.ok else r.text[:200]}))
from ray import serve
serve.shutdown()
PY
else
  echo '{"check": "serve vllm", "skipped": "vllm not installed"}'
fi

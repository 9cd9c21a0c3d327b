"""Hugging Face models, LoRA, BPE and zero.Init through the real path (issue 14): Ray Train + DeepSpeed.

The tiny Llama/GPT-2 folders come from scripts/make_tiny_hf.py (the `tiny_models` fixture), offline.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from raybig.spec import SpecError, load_spec_text

ROOT = pathlib.Path(__file__).resolve().parent.parent


def hf_spec(storage: str, name: str, folder: str, **sets) -> object:
    text = f"""
kind: train
name: {name}
seed: 1
model: {{hf: {folder}}}
data: {{seq_len: 32, max_tokens: 200000}}
train: {{steps: 12, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 1, eval_every: 6, eval_batches: 2, log_every: 1}}
deepspeed: {{zero_stage: 2}}
resources: {{workers: 2, cpus_per_worker: 1}}
storage: {{path: {storage}}}
checkpoint: {{every: 6, keep: 2, max_failures: 0}}
sample: {{max_new_tokens: 0}}
"""
    return load_spec_text(text, overrides=[f"{k}={v}" for k, v in sets.items()])


def val_losses(res) -> list[float]:
    return [h["val_loss"] for h in res.history if "val_loss" in h]


def ckpt_bytes(run_dir: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(f"{run_dir}/checkpoint_*/step_*/*") if os.path.isfile(f))


# --------------------------------------------------------------------------- real runs


@pytest.mark.ray
@pytest.mark.parametrize("stage", [2, 3])
def test_hf_full_finetune_lowers_val_loss_and_exports(stage, tiny_models, ray_local, storage_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raybig.train.runner import run_train

    res = run_train(hf_spec(storage_dir, f"hf-full-{stage}", tiny_models["llama"],
                            **{"deepspeed.zero_stage": stage}))
    vals = val_losses(res)
    assert abs(vals[0] - math.log(1024)) < 0.3, vals  # a random model: about ln(vocab)
    assert vals[-1] < vals[0] - 0.3, vals
    export = f"{res.run_dir}/export"
    model = AutoModelForCausalLM.from_pretrained(export)  # plain transformers, no raybig
    tok = AutoTokenizer.from_pretrained(export)
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == model.config.vocab_size


@pytest.mark.ray
def test_lora_trains_adapter_only_and_resume_matches(tiny_models, ray_local, storage_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from raybig.train.runner import run_train

    # The tiny model is random, so adapters on q/v alone barely move it; all-linear does.
    sets = {"finetune.method": "lora", "finetune.r": 4, "finetune.target_modules": "all-linear",
            "train.lr": 1.0e-2, "finetune.dropout": 0.0}
    full = run_train(hf_spec(storage_dir, "lora", tiny_models["llama"], **sets))
    vals = val_losses(full)
    assert vals[-1] < vals[0] - 0.03, vals
    # Only the adapter is checkpointed: its module state holds LoRA weights alone, and a whole
    # checkpoint (adapter + its Adam state, both ranks) is smaller than the frozen weights by far.
    import torch

    states = glob.glob(f"{full.run_dir}/checkpoint_*/step_*/mp_rank_00_model_states.pt")
    module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    assert module and all("lora_" in k for k in module), sorted(module)[:5]
    n_model = sum(os.path.getsize(f) for f in glob.glob(f"{tiny_models['llama']}/*.safetensors"))
    per_ckpt = ckpt_bytes(full.run_dir) / 2  # keep=2
    assert per_ckpt < n_model / 2, (per_ckpt, n_model)
    back = AutoModelForCausalLM.from_pretrained(f"{full.run_dir}/export")  # merged
    assert not any("lora" in k for k in back.state_dict())
    # Resume from the step-6 checkpoint: the same losses as the uninterrupted run.
    mid = next(d for d in glob.glob(f"{full.run_dir}/checkpoint_*") if glob.glob(f"{d}/step_00000006"))
    resumed = run_train(hf_spec(str(tmp_path / "runs2"), "lora", tiny_models["llama"], **sets), resume_from=mid)
    a = {h["step"]: h["loss"] for h in full.history if "loss" in h and h["step"] > 6}
    b = {h["step"]: h["loss"] for h in resumed.history if "loss" in h}
    assert a.keys() == b.keys() and a
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a[s], b[s])


@pytest.mark.ray
def test_bpe_gpt_trains_and_carries_tokenizer(ray_local, storage_dir):
    from raybig.tokenizer import BpeTokenizer
    from raybig.train.runner import run_train

    text = f"""
kind: train
name: bpe
seed: 3
model: {{preset: gpt-debug}}
data: {{seq_len: 32, max_tokens: 200000, tokenizer: bpe, vocab_size: 512}}
train: {{steps: 12, micro_batch_size: 4, lr: 3.0e-3, warmup_steps: 1, eval_every: 6, eval_batches: 2, log_every: 1}}
deepspeed: {{zero_stage: 2}}
resources: {{workers: 2, cpus_per_worker: 1}}
storage: {{path: {storage_dir}}}
checkpoint: {{every: 12, keep: 1, max_failures: 0}}
sample: {{prompt: "def ", max_new_tokens: 12, temperature: 0.0}}
"""
    res = run_train(load_spec_text(text), sample=True)
    vals = val_losses(res)
    assert vals[-1] < vals[0] - 0.3, vals
    # The end-of-run sample is decoded with the run's BPE (a byte decode would mangle ids >= 256).
    from raybig.train.sample import generate_text

    assert res.sample.startswith("def ") and res.sample == generate_text(f"{res.run_dir}/export", "def ", 12, 0.0, 3)
    tok = BpeTokenizer.load(f"{res.run_dir}/tokenizer.json")
    assert 300 < tok.vocab_size <= 512
    assert os.path.exists(f"{res.run_dir}/export/tokenizer.json")
    with open(f"{res.run_dir}/export/config.json") as f:
        cfg = json.load(f)
    assert tok.vocab_size in (cfg.get("vocab_size"), cfg.get("raybig", {}).get("model", {}).get("vocab_size"))


# A random-init Llama shape from an inline config (model.hf_config): bytes vocabulary, ~0.1M params.
TINY_LLAMA_CONFIG = ("{model_type: llama, vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
                     "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 64}")


@pytest.mark.ray
def test_hf_config_lora_at_zero3_writes_peft_adapter(ray_local, storage_dir):
    """One short run covers three paths: `model.hf_config` (random init, no folder) training, LoRA
    under ZeRO-3 (zero.Init-partitioned base, unpartitioned adapters), and `merge: false` (peft's
    adapter folder alone, loadable by `PeftModel.from_pretrained`)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raybig.train.runner import run_train

    text = f"""
kind: train
name: cfg-lora3
seed: 2
model: {{hf_config: {TINY_LLAMA_CONFIG}}}
data: {{seq_len: 32, max_tokens: 200000}}
finetune: {{method: lora, r: 4, alpha: 8, dropout: 0.0, target_modules: all-linear, merge: false}}
train: {{steps: 8, micro_batch_size: 4, lr: 1.0e-2, warmup_steps: 1, eval_every: 4, eval_batches: 2, log_every: 1}}
deepspeed: {{zero_stage: 3}}
resources: {{workers: 2, cpus_per_worker: 1}}
storage: {{path: {storage_dir}}}
checkpoint: {{every: 8, keep: 1, max_failures: 0}}
sample: {{max_new_tokens: 0}}
"""
    res = run_train(load_spec_text(text))
    vals = val_losses(res)
    assert abs(vals[0] - math.log(256)) < 0.3 and vals[-1] < vals[0], vals
    export = pathlib.Path(res.run_dir) / "export"
    names = set(os.listdir(export))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names, names
    assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names), names
    saved = load_file(str(export / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert any(bool(v.abs().sum() > 0) for k, v in saved.items() if "lora_B" in k)  # trained (B starts at 0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(cfg), str(export))
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    by_suffix = {k.split("model.layers.", 1)[1]: v for k, v in loaded.items()}
    for k, v in saved.items():
        key = k.split("model.layers.", 1)[1].replace(".weight", ".default.weight")
        assert torch.equal(by_suffix[key], v), k


# --------------------------------------------------------------------------- zero.Init (one process)

ZINIT = """
import json, sys
import deepspeed, deepspeed.ops, torch
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo")
from raybig.spec.models import TrainSpec
from raybig.spec.deepspeed import build_ds_config
from raybig.train.build import build
out = {}
for stage in (2, 3):
    spec = TrainSpec(name="z", model={"preset": "gpt-debug"}, data={"seq_len": 32},
                     deepspeed={"zero_stage": stage}, resources={"workers": 1})
    ds = build_ds_config(spec, on_cuda=False)
    torch.manual_seed(0)
    b = build(spec, ds)
    eng, *_ = deepspeed.initialize(model=b.model, model_parameters=list(b.model.parameters()), config=ds)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)
    w = b.model.h[0].attn.c_proj.weight
    out[stage] = {"loss": b.loss(eng, x, y).item(), "partitioned": hasattr(w, "ds_id") and w.numel() == 0}
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
def test_zero_init_gpt_first_loss_equals_whole_build():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    r = subprocess.run([sys.executable, "-c", ZINIT], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    assert res["3"]["partitioned"] and not res["2"]["partitioned"]
    assert res["3"]["loss"] == pytest.approx(res["2"]["loss"], rel=1e-6)


# --------------------------------------------------------------------------- bad input at validate

BASE = """\
kind: train
name: t
model: {{hf: {folder}}}
data: {{seq_len: 32}}
{extra}
"""


def _issue(text: str):
    with pytest.raises(SpecError) as e:
        load_spec_text(text, source="job.yaml")
    return e.value.issues[0]


def _bad_folders(tiny, tmp_path):
    import shutil

    no_cfg = tmp_path / "no-config"
    no_cfg.mkdir()
    no_w = tmp_path / "no-weights"
    shutil.copytree(tiny, no_w)
    os.remove(no_w / "model.safetensors")
    unknown = tmp_path / "unknown-arch"
    shutil.copytree(tiny, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-arch"}))
    remote = tmp_path / "remote-code"
    shutil.copytree(tiny, remote)
    (remote / "config.json").write_text(json.dumps({**cfg, "model_type": "my-arch",
                                                   "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    big_tok = tmp_path / "big-tokenizer"
    shutil.copytree(tiny, big_tok)
    (big_tok / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    return {"no-config": no_cfg, "no-weights": no_w, "unknown": unknown, "remote": remote, "big-tok": big_tok}


@pytest.mark.unit
def test_bad_hf_inputs_name_path_and_line(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    b = _bad_folders(tiny_models["llama"], tmp_path)
    llama = tiny_models["llama"]
    cases = [
        (BASE.format(folder=tmp_path / "missing", extra=""), "model.hf", 3, "no such folder"),
        (BASE.format(folder=b["no-config"], extra=""), "model.hf", 3, "no config.json"),
        (BASE.format(folder=b["no-weights"], extra=""), "model.hf", 3, "no weights"),
        (BASE.format(folder=b["unknown"], extra=""), "model.hf", 3, "not a causal LM"),
        (BASE.format(folder=b["remote"], extra=""), "model.hf", 3, "trust_remote_code"),
        (BASE.format(folder="someorg/not-cached-model", extra=""), "model.hf", 3, "not in the local Hugging Face cache"),
        (BASE.format(folder=b["big-tok"], extra=""), "model.hf", 3, "embedding rows"),
        (BASE.format(folder=llama, extra="finetune: {method: lora, target_modules: [nope_proj]}"),
         "finetune.target_modules", 5, "match no layer"),
        (BASE.format(folder=llama, extra="data: {seq_len: 32, tokenizer: bpe, vocab_size: 5000}").replace(
            "data: {seq_len: 32}\n", ""), "data.tokenizer", 4, "embedding rows"),
        ("kind: train\nname: t\nmodel: {preset: gpt-debug}\ndata: {tokenizer: model}\n", "data.tokenizer", 4,
         "needs model.hf"),
        ("kind: train\nname: t\nmodel: {preset: gpt-debug}\nresources: {gpus_per_worker: 0.5}\n",
         "resources.gpus_per_worker", 4, "0 (CPU) or 1"),
        ("kind: train\nname: t\nmodel: {preset: gpt-debug}\nresources: {gpus_per_worker: 2}\n",
         "resources.gpus_per_worker", 4, "0 (CPU) or 1"),
        ("kind: train\nname: t\nmodel: {preset: gpt-debug}\ndata: {vocab_size: 1000}\n", "data.vocab_size", 4,
         "tokenizer: bpe"),
        (BASE.format(folder=llama, extra="").replace("model: {", "model: {preset: gpt-tiny, "), "model.preset", 3,
         "does not apply"),
    ]
    for text, path, line, msg in cases:
        issue = _issue(text)
        assert ".".join(map(str, issue.path)) == path, (issue.render(), text)
        assert issue.line == line, issue.render()
        assert msg in issue.message, issue.render()
        assert "job.yaml" in issue.render()


@pytest.mark.unit
def test_validate_cli_exit_2_and_counts(tiny_models, tmp_path):
    from raybig.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.format(folder=tmp_path / "missing", extra=""))
    r = CliRunner().invoke(main, ["validate", str(bad)])
    assert r.exit_code == 2 and f"{bad}:3: model.hf" in r.output, r.output
    good = tmp_path / "good.yaml"
    good.write_text(BASE.format(folder=tiny_models["llama"], extra="finetune: {method: lora, r: 4}"))
    r = CliRunner().invoke(main, ["validate", str(good), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).parameters())
    lora = out.get("trainable_params") or out.get("summary", {}).get("trainable_params")
    assert lora == 2 * 4 * ((64 + 64) + (64 + 32)), out  # q (64x64) + v (32x64), 2 layers, r=4
    assert out.get("params", out.get("summary", {}).get("params")) == n + lora


@pytest.mark.unit
def test_lora_shrinks_optimizer_estimate(tiny_models):
    from raybig.spec.memory import estimate

    full = estimate(hf_spec("/tmp/x", "a", tiny_models["llama"]))
    lora = estimate(hf_spec("/tmp/x", "a", tiny_models["llama"], **{"finetune.method": "lora"}))
    assert lora.optim_bytes < full.optim_bytes / 20 and lora.grad_bytes < full.grad_bytes / 20


@pytest.mark.unit
def test_precision_auto_and_gpu_config():
    from raybig.spec.deepspeed import build_ds_config, resolve_precision

    spec = load_spec_text("kind: train\nname: t\nmodel: {preset: gpt-debug}\nresources: {gpus_per_worker: 1}\n")
    assert resolve_precision(spec, True, (9, 0)) == "bf16" and resolve_precision(spec, True, (8, 0)) == "bf16"
    assert resolve_precision(spec, True, (7, 5)) == "fp16" and resolve_precision(spec, False) == "fp32"
    gpu = build_ds_config(spec, on_cuda=True, capability=(7, 0))
    assert gpu["fp16"]["enabled"] and gpu["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert gpu["zero_optimization"]["overlap_comm"] and gpu["optimizer"]["params"]["fused"]
    cpu = build_ds_config(spec, on_cuda=False)
    assert not cpu["zero_optimization"]["overlap_comm"] and "fused" not in cpu["optimizer"]["params"]


@pytest.mark.unit
def test_worker_env_never_sends_cpu_accelerator_to_gpu_runs(monkeypatch):
    from raybig.cluster.ray_env import worker_env

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert worker_env(True)["DS_ACCELERATOR"] == "cuda" and worker_env(False)["DS_ACCELERATOR"] == "cpu"


@pytest.mark.unit
@pytest.mark.parametrize("which", ["gpt", "gpt2"])
def test_lora_merge_of_state_dict_matches_peft(which, tiny_models):
    """The export's merge (works on a gathered ZeRO-3 state dict) equals peft's merge_and_unload."""
    import torch

    from raybig.train.build import build
    from raybig.train.loop import merge_lora_state_dict

    if which == "gpt":
        spec = load_spec_text("kind: train\nname: t\nmodel: {preset: gpt-debug}\ndata: {seq_len: 32}\n"
                              "finetune: {method: lora, r: 4, alpha: 8}\n")
    else:
        spec = hf_spec("/tmp/x", "t", tiny_models["gpt2"], **{"finetune.method": "lora", "finetune.r": 4})
    torch.manual_seed(0)
    built = build(spec)
    assert built.lora and all("lora_" in n for n, p in built.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for n, p in built.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    cfg = built.model.peft_config["default"]
    mine = merge_lora_state_dict(built.model.state_dict(), cfg.lora_alpha / cfg.r, bool(cfg.fan_in_fan_out))
    ref = built.model.merge_and_unload().state_dict()
    assert mine.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(mine[k], ref[k], atol=1e-6), k

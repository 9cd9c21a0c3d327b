"""Exports every tool loads (issue 14, item 5): raybig's GPT as a `GPT2LMHeadModel` save_pretrained
folder, read back by plain transformers (without raybig importable) and by raybig's `load_model`;
old exports; atomic writes; `raybig export` from DeepSpeed checkpoints of every ZeRO stage.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from raybig.cli import main
from raybig.model import GPT, GPTConfig
from raybig.tokenizer import BYTES, train_bpe
from raybig.train.export import load_model, load_tokenizer, read_config, resolve_export, write_export

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPTS = ["def main(argv):\n    ", "héllo wörld ✓ "]


def _gpt(bias: bool = False, vocab: int = 256, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab, bias=bias)).eval()
    if bias:  # GPT-2 init zeroes biases; make them matter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def _greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    return model.generate(x, n, temperature=0)[0, len(ids):].tolist()


# Runs with raybig made unimportable: only transformers reads the folders.
PLAIN_TRANSFORMERS = textwrap.dedent("""
    import json, sys
    sys.modules["raybig"] = None  # any `import raybig...` now raises ImportError
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = {}
    for folder, prompts, n in json.loads(sys.argv[1]):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        rows = []
        for p in prompts:
            ids = tok(p)["input_ids"]
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(x).logits[0].tolist()
                gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                     pad_token_id=0)[0, len(ids):].tolist()
            rows.append({"ids": ids, "logits": logits, "greedy": gen, "text": tok.decode(gen)})
        out[folder] = {"rows": rows, "arch": model.config.architectures}
    print(json.dumps(out))
""")


def _plain_transformers(jobs: list[tuple[str, list[str], int]]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, json.dumps(jobs)], capture_output=True,
                       text=True, env=env, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.unit
def test_plain_transformers_loads_export_with_same_logits_and_greedy_text(tmp_path):
    """bytes (bias off and on, sharded) and a trained BPE: logits within 1e-5, identical greedy text."""
    texts = ["def main(argv):\n    return len(argv)\n", "héllo wörld ✓ the cat sat on the mat\n"] * 40
    bpe = train_bpe(texts, 300)
    cases = {"bytes": (_gpt(False), BYTES), "bias": (_gpt(True, seed=1), "bytes"),
             "bpe": (_gpt(False, vocab=300, seed=2), bpe)}
    folders = {}
    for name, (model, tok) in cases.items():
        shard = "20KB" if name == "bias" else None
        folders[name] = write_export(str(tmp_path / name), model.state_dict(), model.config.to_dict(),
                                     tied=GPT.tied_keys, tokenizer=tok, max_shard_size=shard)
    assert (pathlib.Path(folders["bias"]) / "model.safetensors.index.json").exists()
    for f in folders.values():
        names = set(os.listdir(f))
        assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
        cfg = read_config(f)
        assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["raybig"]["format"] == 2
    n = 12
    got = _plain_transformers([(f, PROMPTS, n) for f in folders.values()])
    for name, (model, tok) in cases.items():
        ours_tok = BYTES if tok == "bytes" else tok
        res = got[folders[name]]
        assert res["arch"] == ["GPT2LMHeadModel"]
        for p, row in zip(PROMPTS, res["rows"], strict=True):
            ids = ours_tok.encode(p)
            assert row["ids"] == ids, name
            with torch.no_grad():
                want = model(torch.tensor([ids]))[0]
            assert torch.allclose(torch.tensor(row["logits"]), want, atol=1e-5, rtol=0), name
            greedy = _greedy(model, ids, n)
            assert row["greedy"] == greedy and row["text"] == ours_tok.decode(greedy), name
        assert load_tokenizer(folders[name]).encode(PROMPTS[1]) == ours_tok.encode(PROMPTS[1])


@pytest.mark.unit
@pytest.mark.parametrize("bias", [False, True])
def test_load_model_round_trip_is_exact(tmp_path, bias):
    model = _gpt(bias)
    run = str(tmp_path / "run")
    out = write_export(run, model.state_dict(), model.config.to_dict(), tied=GPT.tied_keys, name="r",
                       max_shard_size="30KB")
    assert resolve_export(run) == resolve_export(out) == out == f"{run}/export"
    assert resolve_export(f"file://{run}") == out
    back, meta = load_model(run)
    assert meta["model"] == model.config.to_dict() and meta["tokenizer"] == "bytes" and meta["name"] == "r"
    assert back.lm_head.weight is back.wte.weight  # tied again
    x = torch.tensor([BYTES.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert _greedy(back, x[0].tolist(), 16) == _greedy(model, x[0].tolist(), 16)


@pytest.mark.unit
def test_run_bpe_tokenizer_is_exported(tmp_path):
    """With no tokenizer given, a run's tokenizer.json (its trained BPE) goes into the export."""
    bpe = train_bpe(["abc abd abe " * 50, "the cat " * 50], 270)
    run = tmp_path / "run"
    run.mkdir()
    bpe.save(str(run))
    model = _gpt(vocab=270)
    out = write_export(str(run), model.state_dict(), model.config.to_dict(), tied=GPT.tied_keys)
    assert read_config(out)["raybig"]["tokenizer"] == "bpe"
    assert load_tokenizer(out).encode("the cat abd") == bpe.encode("the cat abd")


def _write_old_export(run: pathlib.Path, model: GPT) -> str:
    """The export layout before save_pretrained (raybig 0.x): raw state dict + {"model", "tied", ...}."""
    from safetensors.torch import save_file

    out = run / "export"
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({"model": model.config.to_dict(), "tokenizer": "bytes",
                                                 "precision": "fp32", "name": "old", "tied": ["lm_head.weight"]}))
    return str(out)


@pytest.mark.unit
def test_old_export_loads_and_converts(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _gpt(True, seed=3)
    old = _write_old_export(tmp_path / "run", model)
    back, meta = load_model(str(tmp_path / "run"))
    x = torch.tensor([BYTES.encode(PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(back(x), model(x)) and meta["name"] == "old"
    r = CliRunner().invoke(main, ["export", old])  # an export needs --out
    assert r.exit_code == 2 and "--out" in r.output and "Traceback" not in r.output
    new = str(tmp_path / "new")
    r = CliRunner().invoke(main, ["export", old, "--out", new])
    assert r.exit_code == 0, r.output
    hf = AutoModelForCausalLM.from_pretrained(new).eval()
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-5, rtol=0)
        assert torch.equal(load_model(new)[0](x), model(x))


@pytest.mark.unit
def test_failed_export_leaves_nothing_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import raybig.train.export_hf as export_hf

    model = _gpt()
    run = tmp_path / "run"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export_hf, "_save_tokenizer", boom)  # after the weights are written
    with pytest.raises(OSError, match="disk full"):
        write_export(str(run), model.state_dict(), model.config.to_dict(), tied=GPT.tied_keys)
    assert not run.exists() or os.listdir(run) == []
    with pytest.raises(FileNotFoundError):
        resolve_export(str(run))
    monkeypatch.undo()
    write_export(str(run), model.state_dict(), model.config.to_dict(), tied=GPT.tied_keys)
    before = {f: (run / "export" / f).read_bytes() for f in os.listdir(run / "export")}
    other = _gpt(seed=9)
    monkeypatch.setattr(export_hf, "_save_tokenizer", boom)
    with pytest.raises(OSError):
        write_export(str(run), other.state_dict(), other.config.to_dict(), tied=GPT.tied_keys)
    assert os.listdir(run) == ["export"]  # no temp folder left beside it
    assert {f: (run / "export" / f).read_bytes() for f in os.listdir(run / "export")} == before


@pytest.mark.unit
def test_export_cli_errors_are_one_line(tmp_path):
    cases = []
    cases.append(([str(tmp_path / "nope")], 2, "no such run"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    cases.append(([str(tmp_path / "junk")], 2, "is not a run directory"))
    ck = tmp_path / "ck"  # a checkpoint whose manifest lists a shard that never arrived
    (ck / "step_00000002").mkdir(parents=True)
    (ck / "latest").write_text("step_00000002")
    (ck / "raybig-manifest-rank0.json").write_text(json.dumps(
        {"rank": 0, "world_size": 1, "step": 2, "files": {"step_00000002/mp_rank_00_model_states.pt": 10}}))
    cases.append(([str(ck), "--spec", str(ROOT / "jobs" / "quickstart.yaml")], 1, "incomplete"))
    cases.append(([str(ck)], 2, "needs --spec"))
    for args, code, msg in cases:
        r = CliRunner().invoke(main, ["export", *args])
        assert r.exit_code == code and msg in r.output, (args, r.output)
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output


# --------------------------------------------------------------------------- DeepSpeed checkpoints

ZERO_STAGES = textwrap.dedent("""
    # One process (world size 1, gloo): train a few steps at each ZeRO stage, save a checkpoint.
    import json, os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, deepspeed
    from raybig.model import GPT, GPTConfig
    from raybig.train.loop import disable_shm_comm_build
    from safetensors.torch import save_file
    disable_shm_comm_build()
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (0, 1, 2, 3):
        torch.manual_seed(stage)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32))
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
               "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
               "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        for _ in range(2):
            x = torch.randint(0, 256, (2, 16))
            loss = engine(x, x)
            engine.backward(loss)
            engine.step()
        d = os.path.join(sys.argv[1], f"stage{stage}")
        engine.save_checkpoint(d, tag="step_00000002", client_state={"step": 2})
        sd = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
        save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}, d + "-want.safetensors")
    # A Hugging Face model (a tiny Llama from scripts/make_tiny_hf.py) at stage 3.
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(sys.argv[3])
    engine, *_ = deepspeed.initialize(model=hf, model_parameters=hf.parameters(), config=cfg)
    for _ in range(2):
        x = torch.randint(0, 100, (2, 16))
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    d = os.path.join(sys.argv[1], "hf")
    engine.save_checkpoint(d, tag="step_00000002", client_state={"step": 2})
    sd = engine._zero3_consolidated_16bit_state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, d + "-want.safetensors")
""")


@pytest.mark.unit
def test_export_consolidates_every_zero_stage(tmp_path):
    """`raybig export CHECKPOINT --spec` on stage 0-3 checkpoints equals the engine's own weights;
    a Hugging Face model's stage-3 checkpoint comes back as its own class."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raybig.cluster.ray_env import free_port

    spec_mod = importlib.util.spec_from_file_location("make_tiny_hf", ROOT / "scripts" / "make_tiny_hf.py")
    make_tiny = importlib.util.module_from_spec(spec_mod)
    spec_mod.loader.exec_module(make_tiny)
    llama = make_tiny.make_tiny(str(tmp_path / "llama"), "llama", seed=0)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "-c", ZERO_STAGES, str(tmp_path), str(free_port()), llama], env=env,
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"kind: train\nname: z\nmodel: {{n_layer: 2, n_head: 2, n_embd: 32, block_size: 32}}\n"
                    f"data: {{seq_len: 32}}\nstorage: {{path: {tmp_path}}}\n")
    x = torch.tensor([BYTES.encode(PROMPTS[0])])
    for stage in (0, 1, 2, 3):
        out = str(tmp_path / f"out{stage}")
        res = CliRunner().invoke(main, ["export", str(tmp_path / f"stage{stage}"), "--spec", str(spec),
                                        "--out", out])
        assert res.exit_code == 0, res.output
        want = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
        want.load_state_dict(load_file(str(tmp_path / f"stage{stage}-want.safetensors")), strict=False)
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            assert torch.allclose(hf(x).logits, want(x), atol=1e-5, rtol=0), stage
            assert torch.equal(load_model(out)[0](x), want(x)), stage
    # The Hugging Face model comes back in its own class, with its own tokenizer.
    spec.write_text(f"kind: train\nname: h\nmodel: {{hf: {llama}}}\ndata: {{seq_len: 32}}\n"
                    f"storage: {{path: {tmp_path}}}\n")
    out = str(tmp_path / "out-hf")
    res = CliRunner().invoke(main, ["export", str(tmp_path / "hf"), "--spec", str(spec), "--out", out])
    assert res.exit_code == 0, res.output
    want = AutoModelForCausalLM.from_pretrained(llama).eval()
    missing, unexpected = want.load_state_dict(load_file(str(tmp_path / "hf-want.safetensors")), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(got) is type(want) and AutoTokenizer.from_pretrained(out)("def f")["input_ids"] == \
        AutoTokenizer.from_pretrained(llama)("def f")["input_ids"]
    ids = torch.tensor([AutoTokenizer.from_pretrained(llama)("def main(argv):")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, want(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.ray
def test_zero3_two_workers_cli_export_matches_training_export(ray_local, tmp_path):
    """A 2-worker ZeRO-3 run; `raybig export RUN` (its shards consolidated by DeepSpeed) loads with
    transformers and equals the export written at the end of training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raybig.spec import load_spec_text
    from raybig.train.runner import run_train

    spec = load_spec_text(f"""
kind: train
name: z3
seed: 3
model: {{preset: gpt-debug}}
data: {{seq_len: 32, max_tokens: 100000}}
train: {{steps: 3, micro_batch_size: 2, lr: 3.0e-3, warmup_steps: 1, eval_every: 3, eval_batches: 1, log_every: 1}}
deepspeed: {{zero_stage: 3}}
resources: {{workers: 2, cpus_per_worker: 1}}
storage: {{path: {tmp_path}}}
checkpoint: {{every: 3, keep: 1}}
sample: {{max_new_tokens: 0}}
""")
    res = run_train(spec)
    trained = resolve_export(res.run_dir)
    out = str(tmp_path / "from-ckpt")
    r = CliRunner().invoke(main, ["export", res.run_dir, "--out", out, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["export"] == out
    x = torch.tensor([BYTES.encode(PROMPTS[0])])
    a = AutoModelForCausalLM.from_pretrained(trained).eval()
    b = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out)(PROMPTS[0])["input_ids"] == x[0].tolist()
    with torch.no_grad():
        assert torch.allclose(a(x).logits, b(x).logits, atol=1e-5, rtol=0)
        ours = load_model(res.run_dir)[0](x)
        assert torch.allclose(ours, b(x).logits, atol=1e-5, rtol=0)

"""Hugging Face groundwork (issue 14): folders, counts, LoRA counts, tokenizers, exports, ZeRO-3 load.

Offline: the tiny Llama- and GPT-2-shaped models come from `scripts/make_tiny_hf.py`, built once per
session in a temporary folder.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from raybig.errors import RaybigError
from raybig.spec import hf_params as hp
from raybig.tokenizer import BYTES, BpeTokenizer, train_bpe

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.unit


def _script():
    spec = importlib.util.spec_from_file_location("make_tiny_hf", ROOT / "scripts" / "make_tiny_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{"llama": folder, "gpt2": folder (sharded, with an index)} made by scripts/make_tiny_hf.py."""
    base = tmp_path_factory.mktemp("tiny_hf")
    mk = _script()
    return {"llama": mk.make_tiny(str(base / "llama"), "llama", seed=0),
            "gpt2": mk.make_tiny(str(base / "gpt2"), "gpt2", seed=0, max_shard_size="100KB")}


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _one_line(e: RaybigError) -> str:
    msg = str(e)
    assert "\n" not in msg and msg
    assert e.exit_code == 2
    return msg


# --------------------------------------------------------------------------- fixtures and counts


def test_tiny_models_load_and_counts_match(tiny_dirs):
    from raybig.train.hf import load_causal_lm

    for folder in tiny_dirs.values():
        model = load_causal_lm(folder)
        n = _numel(model)
        assert 100_000 < n < 1_000_000, n
        info = hp.inspect_folder(folder)
        assert hp.count_params(folder) == n
        assert sum(math.prod(s) for s in hp.config_shapes(info.config).values()) == n
        assert hp.weight_shapes(info) == {k: tuple(v.shape) for k, v in model.state_dict().items()
                                          if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    assert len(hp.inspect_folder(tiny_dirs["gpt2"]).weight_files) > 1  # sharded with an index


CONFIGS = [
    {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
     "num_hidden_layers": 2, "num_attention_heads": 4},
    {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": True,
     "mlp_bias": True, "tie_word_embeddings": True, "head_dim": 16},
    {"model_type": "mistral", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    {"model_type": "qwen2", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
    {"model_type": "qwen3", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
    {"model_type": "gpt2", "vocab_size": 300, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4},
    {"model_type": "gpt2", "vocab_size": 300, "n_positions": 64, "n_embd": 32, "n_layer": 1, "n_head": 4,
     "n_inner": 40},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["model_type"])
def test_config_shapes_match_transformers(cfg):
    from raybig.train.hf import build_from_config

    model = build_from_config(cfg, seed=0)
    want = {k: tuple(p.shape) for k, p in model.named_parameters()}  # tied head listed once
    assert hp.config_shapes(cfg) == want
    assert hp.count_params(cfg) == _numel(model)


def test_count_falls_back_to_index_total_size(tiny_dirs, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_dirs["gpt2"], folder)
    want = hp.count_params(str(folder))
    shard = hp.inspect_folder(str(folder)).weight_files[0]
    (folder / shard).write_bytes(b"\x01")  # unreadable header: fall back to total_size / 4 (fp32)
    assert hp.count_params(str(folder)) == want


def test_count_reads_remote_headers_without_download(tiny_dirs):
    import fsspec

    mem = fsspec.filesystem("memory")
    mem.put(tiny_dirs["gpt2"] + "/", "/countme/", recursive=True)
    try:
        assert hp.count_params("memory://countme") == hp.count_params(tiny_dirs["gpt2"])
    finally:
        mem.rm("/countme", recursive=True)


@pytest.mark.parametrize("arch,targets", [("llama", ["q_proj", "v_proj"]), ("llama", "all-linear"),
                                          ("gpt2", ["c_attn"]), ("gpt2", "all-linear"),
                                          ("llama", r".*\.mlp\.(gate|up)_proj")])
def test_lora_count_matches_peft(tiny_dirs, arch, targets):
    from peft import LoraConfig, get_peft_model

    from raybig.train.hf import load_causal_lm

    model = load_causal_lm(tiny_dirs[arch])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    want = peft_model.get_nb_trainable_parameters()[0]
    shapes = hp.weight_shapes(hp.inspect_folder(tiny_dirs[arch]))
    assert hp.lora_trainable_params(shapes, 4, targets) == want
    # the same from the config alone (model.hf_config)
    assert hp.lora_trainable_params(hp.config_shapes(hp.inspect_folder(tiny_dirs[arch]).config), 4, targets) == want


@pytest.mark.parametrize("bias", [False, True])
def test_raybig_gpt_shapes_and_lora(bias):
    from peft import LoraConfig, get_peft_model

    from raybig.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=bias))
    shapes = hp.raybig_gpt_shapes(2, 32, 256, 64, bias)
    assert shapes == {k: tuple(p.shape) for k, p in model.named_parameters()}
    targets = ["c_attn", "c_proj"]
    want = get_peft_model(model, LoraConfig(r=4, target_modules=targets)).get_nb_trainable_parameters()[0]
    assert hp.lora_trainable_params(shapes, 4, targets) == want


def test_lora_targets_matching_nothing(tiny_dirs):
    shapes = hp.weight_shapes(hp.inspect_folder(tiny_dirs["llama"]))
    with pytest.raises(hp.LoraTargetError) as e:
        hp.lora_trainable_params(shapes, 8, ["c_attn"])
    assert "q_proj" in _one_line(e.value)


def test_validate_side_imports_no_torch(tiny_dirs):
    code = (f"import sys; from raybig.spec import hf_params as hp; hp.count_params({tiny_dirs['gpt2']!r}); "
            "hp.inspect_folder(" + repr(tiny_dirs["llama"]) + "); assert hp.known_causal_lm_types(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --------------------------------------------------------------------------- bad input


def _folder(tmp_path, name, config=None, weights=True) -> str:
    d = tmp_path / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if weights:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    return str(d)


def test_bad_folders(tmp_path):
    from raybig.train.hf import load_causal_lm, resolve_model_source

    llama = {"model_type": "llama"}
    cases = [
        (str(tmp_path / "nope"), hp.ModelFolderError, "no such folder"),
        (_folder(tmp_path, "noconfig"), hp.ModelFolderError, "no config.json"),
        (_folder(tmp_path, "noweights", llama, weights=False), hp.ModelFolderError, "no weights"),
        (_folder(tmp_path, "unknown", {"model_type": "not-a-model"}), hp.UnknownArchitectureError,
         "not-a-model"),
        (_folder(tmp_path, "notype", {"hidden_size": 3}), hp.UnknownArchitectureError, "no `model_type`"),
        (_folder(tmp_path, "remote", {"model_type": "my-own", "auto_map": {
            "AutoModelForCausalLM": "modeling_my.MyForCausalLM"}}), hp.RemoteCodeRequiredError,
         "trust_remote_code"),
    ]
    pickled = _folder(tmp_path, "pickled", llama, weights=False)
    pathlib.Path(pickled, "pytorch_model.bin").write_bytes(b"x")
    cases.append((pickled, hp.ModelFolderError, "safetensors"))
    shards = _folder(tmp_path, "shards", llama, weights=False)
    pathlib.Path(shards, "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    cases.append((shards, hp.ModelFolderError, "missing shards"))
    for folder, err, text in cases:
        with pytest.raises(err) as e:
            resolve_model_source(folder)
        assert text in _one_line(e.value), (folder, str(e.value))
        assert isinstance(e.value, RaybigError)
    with pytest.raises(hp.ModelFolderError):
        load_causal_lm(_folder(tmp_path, "noconfig2"))
    # trust_remote_code on: the folder passes the torch-free checks
    assert hp.inspect_folder(cases[5][0], trust_remote_code=True).model_type == "my-own"
    # config-only sources need no weights
    assert resolve_model_source(cases[2][0], require_weights=False)


def test_bad_hf_config():
    from raybig.train.hf import build_from_config

    with pytest.raises(hp.UnknownArchitectureError):
        build_from_config({"model_type": "not-a-model"})
    with pytest.raises(hp.UnknownArchitectureError) as e:
        hp.config_shapes({"model_type": "phi"})
    assert "safetensors" in _one_line(e.value)


def _fake_hub_cache(cache: pathlib.Path, repo: str, src: str) -> None:
    # huggingface_hub's layout: models--org--name/{refs/main, snapshots/<commit>/<files>}
    commit = "0" * 40
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(src, root / "snapshots" / commit)


def test_hub_id_only_from_local_cache(tiny_dirs, tmp_path):
    from raybig.train.hf import resolve_model_source

    cache = tmp_path / "hub"
    cache.mkdir()
    with pytest.raises(hp.HubModelNotCachedError) as e:
        resolve_model_source("meta-llama/Llama-3.2-1B", hub_cache_dir=str(cache))
    assert "save_pretrained" in _one_line(e.value)
    _fake_hub_cache(cache, "acme/tiny-llama", tiny_dirs["llama"])
    found = resolve_model_source("acme/tiny-llama", hub_cache_dir=str(cache))
    assert found.endswith("snapshots/" + "0" * 40)


def test_tokenizer_larger_than_model(tiny_dirs, tmp_path):
    from raybig.train.hf import load_tokenizer

    folder = tmp_path / "small_vocab"
    shutil.copytree(tiny_dirs["gpt2"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = 500
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hp.TokenizerMismatchError) as e:
        load_tokenizer(str(folder))
    assert "1024 tokens" in _one_line(e.value) and "500" in str(e.value)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_dirs["gpt2"], no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(hp.ModelFolderError):
        load_tokenizer(str(no_tok))


def test_remote_folder_fetched_once(tiny_dirs, tmp_path, monkeypatch):
    import fsspec

    from raybig.train.hf import resolve_model_source

    mem = fsspec.filesystem("memory")
    mem.put(tiny_dirs["llama"] + "/", "/remote-llama/", recursive=True)
    calls = []
    orig = type(mem).get_file
    monkeypatch.setattr(type(mem), "get_file", lambda self, *a, **k: (calls.append(a[0]), orig(self, *a, **k))[1])
    cache = str(tmp_path / "cache")
    try:
        first = resolve_model_source("memory://remote-llama", cache_dir=cache)
        n = len(calls)
        assert n == len(os.listdir(tiny_dirs["llama"]))
        assert resolve_model_source("memory://remote-llama", cache_dir=cache) == first
        assert len(calls) == n  # cached: nothing fetched again
        assert not [p for p in os.listdir(cache) if ".tmp-" in p]
        mem.pipe("/remote-llama/extra.txt", b"changed")  # a change in the folder -> a new copy
        assert resolve_model_source("memory://remote-llama", cache_dir=cache) != first
    finally:
        mem.rm("/remote-llama", recursive=True)


_RANK_FETCH = """
import json, sys, time
import fsspec
from fsspec.implementations.local import LocalFileSystem

class CountFS(LocalFileSystem):
    # A slow "remote" filesystem that logs every file it serves (appends are atomic on Linux).
    protocol = "countfs"
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        return LocalFileSystem._strip_protocol(str(path).replace("countfs://", "", 1))

    def get_file(self, rpath, lpath, **kw):
        with open(sys.argv[2], "a") as f:
            f.write(rpath + "\\n")
        time.sleep(0.05)
        return super().get_file(rpath, lpath, **kw)

fsspec.register_implementation("countfs", CountFS, clobber=True)
from raybig.train.hf import resolve_model_source
print("PATH", resolve_model_source("countfs://" + sys.argv[1], cache_dir=sys.argv[3]))
"""


def test_remote_folder_fetched_once_per_node_not_per_rank(tiny_dirs, tmp_path):
    """Two processes (the ranks of one node) resolve one remote folder at once: one download."""
    log, cache = tmp_path / "served.log", tmp_path / "cache"
    script = tmp_path / "rank.py"
    script.write_text(_RANK_FETCH)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), tiny_dirs["llama"], str(log), str(cache)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].split("PATH", 1)[1].strip() for o in outs}
    served = log.read_text().splitlines()
    assert len(paths) == 1 and len(served) == len(os.listdir(tiny_dirs["llama"])), served
    assert len(served) == len(set(served))  # every file once, not once per rank
    assert not [p for p in os.listdir(cache) if ".tmp-" in p]


def test_remote_tokenizer_and_config_fetch_leave_weights(tiny_dirs, tmp_path, monkeypatch):
    """The driver needs the tokenizer (and export the config), never the weights: none are fetched."""
    import fsspec

    from raybig.train.hf import build_from_config, load_tokenizer

    mem = fsspec.filesystem("memory")
    mem.put(tiny_dirs["llama"] + "/", "/remote-tok/", recursive=True)
    calls: list[str] = []
    orig = type(mem).get_file
    monkeypatch.setattr(type(mem), "get_file", lambda self, *a, **k: (calls.append(a[0]), orig(self, *a, **k))[1])
    monkeypatch.setenv("RAYBIG_HF_CACHE", str(tmp_path / "cache"))
    try:
        tok = load_tokenizer("memory://remote-tok")
        assert tok.vocab_size == 1024 and calls
        model = build_from_config("memory://remote-tok")
        assert type(model).__name__ == "LlamaForCausalLM"
        assert not [c for c in calls if c.endswith(".safetensors")], calls
    finally:
        mem.rm("/remote-tok", recursive=True)


# --------------------------------------------------------------------------- tokenizers


def test_hf_tokenizer_bos_eos(tiny_dirs):
    from raybig.train.hf import load_tokenizer

    llama, gpt2 = load_tokenizer(tiny_dirs["llama"]), load_tokenizer(tiny_dirs["gpt2"])
    text = "def f(x):\n    return x  # ünïcode"
    assert llama.adds_bos and llama.encode(text)[0] == llama.bos_id
    assert not gpt2.adds_bos and gpt2.encode(text)[0] != gpt2.bos_id
    for tok in (llama, gpt2):
        assert tok.decode(tok.encode(text)) == text
        assert tok.encode_document(text)[-1] == tok.eos_id
        assert tok.vocab_size == 1024 and max(tok.encode(text)) < tok.vocab_size
    chat = llama.hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                        add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n")


def _stdlib_texts():
    return _script().stdlib_texts(max_bytes=300_000)


def test_bpe_train_save_load(tmp_path):
    tok = train_bpe(_stdlib_texts(), 400)
    assert tok.vocab_size == 400 and tok.name == "bpe" and tok.eos_id == 0
    text = "import os\nprint('héllo wörld 🤖')\x00\r\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())
    again = BpeTokenizer.load(tok.save(str(tmp_path)))
    assert again.encode(text) == ids and again.vocab_size == 400
    with pytest.raises(ValueError):
        train_bpe(["abc"], 200)


def test_byte_tokenizer_export_is_identical():
    from raybig.train.export_hf import byte_level_hf_tokenizer

    hf = byte_level_hf_tokenizer()
    assert len(hf) == 256
    rng = random.Random(0)
    texts = ["", " a  b\t\n", "héllo 🤖 ÿ\u0100", "<|endoftext|> <s>", chr(0x10FFFF)]
    texts += ["".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD800),
                                      rng.randrange(0xE000, 0x110000)])) for _ in range(40)) for _ in range(50)]
    for t in texts:
        assert hf(t)["input_ids"] == BYTES.encode(t), t
        assert hf.decode(BYTES.encode(t)) == t
    rb = [rng.randrange(256) for _ in range(400)]  # invalid UTF-8 decodes the same way
    assert hf.decode(rb) == BYTES.decode(rb)


# --------------------------------------------------------------------------- exports

NO_RAYBIG = textwrap.dedent("""
    import json, sys
    sys.modules["raybig"] = None  # any import of raybig now fails: plain transformers only
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    prompt, out = sys.argv[1], sys.argv[2]
    res = {}
    for i, d in enumerate(sys.argv[3:]):
        model = AutoModelForCausalLM.from_pretrained(d).eval()
        tok = AutoTokenizer.from_pretrained(d)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            save_file({"logits": model(ids).logits.contiguous()}, f"{out}/logits{i}.safetensors")
            gen = model.generate(ids, max_new_tokens=20, do_sample=False)
        res[d] = {"ids": ids[0].tolist(), "gen": gen[0].tolist(),
                  "text": tok.decode(gen[0, ids.shape[1]:]), "cls": type(model).__name__}
    json.dump(res, open(f"{out}/res.json", "w"))
""")


def _run_without_raybig(tmp_path, prompt, folders):
    out = tmp_path / "plain"
    out.mkdir()
    subprocess.run([sys.executable, "-c", NO_RAYBIG, prompt, str(out), *folders], check=True,
                   cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    from safetensors.torch import load_file

    res = json.loads((out / "res.json").read_text())
    return [(res[f], load_file(str(out / f"logits{i}.safetensors"))["logits"]) for i, f in enumerate(folders)]


def test_raybig_gpt_export_loads_in_plain_transformers(tmp_path):
    from raybig.model import GPT, GPTConfig
    from raybig.train.export_hf import export_raybig_gpt

    prompt = "The quick brown fox, ünïcode 🤖"
    models, folders = [], []
    for bias, tok_name in ((False, "bytes"), (True, "bpe")):
        torch.manual_seed(0)
        tok = BYTES if tok_name == "bytes" else train_bpe(_stdlib_texts(), 320)
        cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=tok.vocab_size, bias=bias)
        model = GPT(cfg).eval()
        if bias:  # nonzero biases, so a wrong mapping of them would show
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("bias"):
                        p.normal_(0, 0.02)
        folder = str(tmp_path / f"export_{tok_name}")
        export_raybig_gpt(model, cfg, tok, folder, max_shard_size="60KB" if bias else "2GB")
        models.append((model, tok))
        folders.append(folder)
    assert os.path.exists(os.path.join(folders[0], "model.safetensors"))
    assert os.path.exists(os.path.join(folders[1], "model.safetensors.index.json"))
    for (model, tok), (res, logits) in zip(models, _run_without_raybig(tmp_path, prompt, folders), strict=True):
        assert res["cls"] == "GPT2LMHeadModel"
        ids = tok.encode(prompt)
        assert res["ids"] == ids  # the exported tokenizer gives raybig's ids
        x = torch.tensor([ids])
        with torch.no_grad():
            ref = model(x)
            gen = model.generate(x, 20, temperature=0)
        assert (logits - ref).abs().max().item() < 1e-5
        assert res["gen"] == gen[0].tolist()
        assert res["text"] == tok.decode(gen[0, len(ids):].tolist())


def test_end_of_run_sample_decodes_with_the_runs_tokenizer(tiny_dirs, tmp_path):
    """The sample of a BPE run is BPE-decoded (not bytes); an HF model's export samples with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raybig.model import GPT, GPTConfig
    from raybig.train.export import write_export
    from raybig.train.sample import generate_text

    bpe = train_bpe(["def main(argv):\n    return len(argv)\n", "the cat sat on the mat\n"] * 40, 300)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=bpe.vocab_size)).eval()
    ex = write_export(str(tmp_path / "bpe"), gpt.state_dict(), gpt.config.to_dict(), tied=GPT.tied_keys,
                      tokenizer=bpe)
    prompt = "def main"
    ids = bpe.encode(prompt)
    with torch.no_grad():
        want = gpt.generate(torch.tensor([ids]), 10, temperature=0.0)[0].tolist()
    assert max(want) >= 256  # ids a byte decode would mangle
    got = generate_text(ex, prompt, 10, temperature=0.0)
    assert got == bpe.decode(want) and got.startswith(prompt)
    assert got != BYTES.decode(want)
    # A Llama export (plain save_pretrained, its own tokenizer): sampled by transformers.
    folder = tiny_dirs["llama"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = tok(prompt, return_tensors="pt")["input_ids"]
    ref = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                         pad_token_id=tok.eos_token_id)[0].tolist()
    assert generate_text(folder, prompt, 6, temperature=0.0) == tok.decode(ref, skip_special_tokens=True)
    assert generate_text(folder, prompt, 6, temperature=0.8, seed=3) == generate_text(folder, prompt, 6, 0.8, seed=3)


def test_export_is_atomic(tmp_path, monkeypatch):
    from raybig.model import GPT, GPTConfig
    from raybig.train import export_hf

    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)
    model = GPT(cfg)
    out = tmp_path / "export"
    export_hf.export_raybig_gpt(model, cfg, "bytes", str(out))
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export_hf, "save_safetensors", boom)
    with pytest.raises(OSError):
        export_hf.export_raybig_gpt(GPT(cfg), cfg, "bytes", str(out))
    with pytest.raises(OSError):
        export_hf.export_raybig_gpt(GPT(cfg), cfg, "bytes", str(tmp_path / "fresh"))
    assert (out / "model.safetensors").read_bytes() == before  # the old export is untouched
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no half-written folder, no temp leftovers
    with pytest.raises(ValueError):
        export_hf.gpt2_state_dict({"wte.weight": torch.zeros(4, 2), "foo": torch.zeros(1)}, cfg)


def test_hf_export_roundtrip_with_merged_lora(tiny_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raybig.train.export_hf import save_hf_export
    from raybig.train.hf import load_causal_lm, load_tokenizer

    model = load_causal_lm(tiny_dirs["llama"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a trained-looking adapter, so merging changes the outputs
    x = torch.tensor([[1, 5, 9, 200, 17]])
    with torch.no_grad():
        ref = peft_model(x).logits
    out = save_hf_export(peft_model, load_tokenizer(tiny_dirs["llama"]), str(tmp_path / "export"))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(os.listdir(out))
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert (back(x).logits - ref).abs().max().item() < 1e-5
    assert AutoTokenizer.from_pretrained(out)("hi")["input_ids"][0] == 0  # BOS kept


# --------------------------------------------------------------------------- ZeRO-3 load path

ZERO3 = textwrap.dedent("""
    import json, os, sys, time
    import deepspeed, deepspeed.ops, torch
    from safetensors.torch import load_file
    t0 = time.time()
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # as the loop does: no 100 s JIT build
    deepspeed.init_distributed(dist_backend="gloo")
    from raybig.train.hf import load_causal_lm
    folder = sys.argv[1]
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
          "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    model = load_causal_lm(folder, dtype="fp32", zero3_config=ds)
    ref = load_file(folder + "/model.safetensors")
    p = model.model.layers[0].self_attn.q_proj.weight
    partitioned = hasattr(p, "ds_id") and p.numel() == 0  # zero.Init: only a partition on this rank
    with deepspeed.zero.GatheredParameters([p]):
        same = torch.equal(p.data, ref["model.layers.0.self_attn.q_proj.weight"])
    from raybig.train.hf import build_from_config
    fresh = build_from_config(folder, zero3_config=ds, seed=0)  # model.hf_config at stage 3
    q = fresh.model.layers[0].self_attn.q_proj.weight
    partitioned = partitioned and hasattr(q, "ds_id") and q.numel() == 0 and q.ds_numel == 64 * 64
    del fresh
    model.train()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    x = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    print("RESULT", json.dumps({"partitioned": partitioned, "same": same, "losses": losses,
                                "s": time.time() - t0}))
""")


@pytest.mark.slow
def test_zero3_loads_into_partitions_and_steps(tiny_dirs, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    r = subprocess.run([sys.executable, "-c", ZERO3, tiny_dirs["llama"]], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    print(res)
    assert res["partitioned"] and res["same"]
    assert res["losses"][-1] < res["losses"][0]

"""Pure pieces of training: DeepSpeed config, ZeRO memory formula, model, data."""

from __future__ import annotations

import pytest
import torch

from raybig.data.text import Batches, read_corpus
from raybig.model import GPT, GPTConfig, KVCache, flops_per_token
from raybig.spec import load_spec_text
from raybig.spec.deepspeed import build_ds_config, resolve_precision
from raybig.spec.memory import count_params, model_state_bytes
from raybig.tokenizer import BYTE_VOCAB, ByteTokenizer, Tokenizer, decode, encode, get_tokenizer
from raybig.train.build import build_model
from raybig.train.built import gpt_config

pytestmark = pytest.mark.unit


def spec(**sets):
    base = "kind: train\nname: u\nmodel: {preset: gpt-debug}\ndata: {seq_len: 64, max_tokens: 200000}\n"
    return load_spec_text(base, overrides=[f"{k}={v}" for k, v in sets.items()])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_per_stage(stage):
    cfg = build_ds_config(spec(**{"deepspeed.zero_stage": stage, "train.micro_batch_size": 4,
                                  "train.grad_accum": 3, "train.steps": 100}), on_cuda=False)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert "train_batch_size" not in cfg  # Ray decides world size; DeepSpeed derives it
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # no fused_adam JIT build
    assert cfg["scheduler"]["params"]["total_num_steps"] == 100
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 10  # default min(20, steps // 10)
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    assert ("stage3_gather_16bit_weights_on_model_save" in cfg["zero_optimization"]) == (stage == 3)


def test_ds_config_offload_and_precision():
    s = spec(**{"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": "cpu", "deepspeed.offload_param": "cpu"})
    cfg = build_ds_config(s, on_cuda=False)
    z = cfg["zero_optimization"]
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert "torch_adam" not in cfg["optimizer"]["params"]  # offload needs DeepSpeedCPUAdam
    assert resolve_precision(s, on_cuda=True) == "bf16" and resolve_precision(s, on_cuda=False) == "fp32"
    assert build_ds_config(s, on_cuda=True)["bf16"]["enabled"] is True


def test_ds_extra_merges_non_owned_keys():
    s = spec(**{"deepspeed.extra": "{zero_optimization: {reduce_bucket_size: 1000}, steps_per_print: 5}"})
    cfg = build_ds_config(s)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 1000 and cfg["steps_per_print"] == 5
    assert cfg["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("precision,stage,expected", [
    # ZeRO paper, mixed precision: 16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N
    ("bf16", 0, 16.0), ("bf16", 1, 4 + 12 / 4), ("bf16", 2, 2 + 14 / 4), ("bf16", 3, 16 / 4),
    # fp32: params 4Ψ, grads 4Ψ, Adam 8Ψ
    ("fp32", 0, 16.0), ("fp32", 1, 8 + 8 / 4), ("fp32", 2, 4 + 12 / 4), ("fp32", 3, 16 / 4),
])
def test_zero_memory_formula(precision, stage, expected):
    psi = 1_000_000
    est = model_state_bytes(psi, stage, 4, precision)
    assert est.total == pytest.approx(expected * psi)


def test_offload_moves_optimizer_state_to_host():
    est = model_state_bytes(1000, 2, 2, "bf16", offload_optimizer=True)
    assert est.offloaded_bytes == pytest.approx(est.optim_bytes + est.grad_bytes)


@pytest.mark.parametrize("preset", ["gpt-debug", "gpt-tiny", "gpt-mini"])
def test_analytic_param_count_matches_model(preset):
    s = spec(**{"model.preset": preset})
    assert count_params(s) == build_model(s).num_params()


def test_gpt2_125m_shape():
    s = spec(**{"model.preset": "gpt2-125m", "model.vocab_size": 50257, "data.seq_len": 1024})
    assert 123e6 < count_params(s) < 126e6


def test_kv_cache_generation_matches_full_recompute():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24)).eval()
    idx = torch.randint(0, 256, (2, 5))
    a = model.generate(idx, 30, temperature=0.0, use_cache=True)  # runs past block_size: window path too
    b = model.generate(idx, 30, temperature=0.0, use_cache=False)
    assert torch.equal(a, b)
    logits_full = model(idx)  # (B, T, V)
    cache = KVCache()
    logits_cached = model(idx[:, :3], cache=cache)  # (B, 1, V): last position only
    torch.testing.assert_close(logits_full[:, 2:3], logits_cached)
    for t in range(3, 5):  # one token at a time on top of the cache, positions from cache.length
        torch.testing.assert_close(logits_full[:, t:t + 1], model(idx[:, t:t + 1], cache=cache))
    assert cache.length == 5 and cache.layers[0][0].shape == (2, 2, 5, 16)


def test_forward_with_positions_and_key_mask_matches_unpadded_rows():
    """Left-padded rows with their own positions and a key mask give each row's unpadded logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24)).eval()
    a, b = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 4))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], dim=1)])  # (2, 6)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
    km = torch.tensor([[True] * 6, [False, False] + [True] * 4])
    with torch.no_grad():
        cache = KVCache()
        last = model(ids, positions=pos, key_mask=km, cache=cache)[:, -1]
        torch.testing.assert_close(last[0], model(a)[0, -1])
        torch.testing.assert_close(last[1], model(b)[0, -1])
        nxt = torch.tensor([[7], [9]])
        km = torch.cat([km, torch.ones(2, 1, dtype=torch.bool)], dim=1)
        step = model(nxt, positions=torch.tensor([[6], [4]]), key_mask=km, cache=cache)[:, -1]
        torch.testing.assert_close(step[0], model(torch.cat([a, nxt[:1]], 1))[0, -1])
        torch.testing.assert_close(step[1], model(torch.cat([b, nxt[1:]], 1))[0, -1])


def test_forward_loss_near_log_vocab_at_init():
    model = GPT(gpt_config(spec()))
    x, y = torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64))
    loss = model(x, y)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.3


def test_flops_per_token_by_hand():
    # gpt-debug-like: L=2, d=64, vocab 256, T=128: N = 12*2*64^2 + 256*64 = 114688
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=256)
    assert flops_per_token(cfg, 128) == 6 * 114688 + 12 * 2 * 64 * 128


def test_data_deterministic_and_disjoint():
    s = spec()
    tokens = read_corpus(s.data)
    b0 = Batches.build(s.data, 4, seed=1, rank=0, world_size=2, tokens=tokens)
    b1 = Batches.build(s.data, 4, seed=1, rank=1, world_size=2, tokens=tokens)
    again = Batches.build(s.data, 4, seed=1, rank=0, world_size=2)
    assert torch.equal(b0.train_batch(5, 0)[0], again.train_batch(5, 0)[0])
    assert not torch.equal(b0.train_batch(5, 0)[0], b0.train_batch(6, 0)[0])
    # Rank shards do not overlap.
    assert b0.train.ctypes.data + b0.train.nbytes <= b1.train.ctypes.data
    x, y = b0.train_batch(0, 0)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_byte_tokenizer_roundtrip():
    assert decode(encode("héllo ✓")) == "héllo ✓"
    tok = get_tokenizer("bytes")
    assert isinstance(tok, Tokenizer) and isinstance(tok, ByteTokenizer)
    assert tok.vocab_size == BYTE_VOCAB == 256 and tok.name == "bytes"
    assert tok.encode("\ud800") == [63] and tok.decode([0xFF]) == "\ufffd"  # never raise
    with pytest.raises(KeyError, match="bytes"):
        get_tokenizer("bpe")

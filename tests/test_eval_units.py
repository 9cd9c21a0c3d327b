"""Issue 17 groundwork: perplexity / bits per byte, task strategies, distillation, digits classifiers,
and lm-eval tasks run offline on a tiny GPT-2-shaped export. No Ray."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
from torch.nn import functional as F

from raybig.eval.perplexity import PerplexityResult, evaluate_perplexity, perplexity_of_text, rolling_windows
from raybig.model import GPT, GPTConfig
from raybig.train.tasks import (
    Classification,
    Distillation,
    MaskedLM,
    TaskError,
    distill_loss,
    get_task,
)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]



def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256)).eval()


# --------------------------------------------------------------------------- perplexity


def test_perplexity_is_exp_of_independent_cross_entropy():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(1)
    windows = [(torch.randint(0, 256, (3, 16), generator=g), torch.randint(0, 256, (3, 16), generator=g))
               for _ in range(4)]
    res = evaluate_perplexity(model, windows)
    # Independent: the model's own training loss path, one batch at a time (equal-sized batches).
    with torch.no_grad():
        ce = sum(float(model(x, y)) for x, y in windows) / len(windows)
    assert res.tokens == 4 * 3 * 16
    assert res.mean_nll == pytest.approx(ce, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(ce), rel=1e-5)
    assert res.bits_per_byte is None
    with_bytes = evaluate_perplexity(model, windows, num_bytes=res.tokens)  # bytes tokenizer: 1 token = 1 byte
    assert with_bytes.bits_per_byte == pytest.approx(ce / math.log(2), rel=1e-5)


def test_ignore_index_and_merge():
    model = tiny_gpt()
    x = torch.randint(0, 256, (2, 8))
    y = torch.randint(0, 256, (2, 8))
    y_masked = y.clone()
    y_masked[:, :4] = -100
    r = evaluate_perplexity(model, [(x, y_masked)])
    with torch.no_grad():
        logits = model(x)
    ref = F.cross_entropy(logits[:, 4:].reshape(-1, 256), y[:, 4:].reshape(-1))
    assert r.tokens == 8 and r.mean_nll == pytest.approx(float(ref), rel=1e-5)
    m = PerplexityResult(2.0, 2, 4).merge(PerplexityResult(4.0, 2, 4))
    assert (m.mean_nll, m.num_bytes) == (1.5, 8)
    assert m.bits_per_byte == pytest.approx(6.0 / math.log(2) / 8)


def test_rolling_windows_score_every_token_once_and_text_bytes():
    ids = list(range(1, 40))
    ys = [t for _, y in rolling_windows(ids, seq_len=8, batch_size=2) for t in y.flatten().tolist()]
    assert ys == ids[1:]
    ys_bos = [t for _, y in rolling_windows(ids, seq_len=8, bos_id=0) for t in y.flatten().tolist()]
    assert ys_bos == ids
    text = "héllo wörld, " * 5
    r = perplexity_of_text(tiny_gpt(), text, lambda s: list(s.encode()), seq_len=16)
    assert r.tokens == len(text.encode()) - 1 and r.num_bytes == r.tokens
    assert math.isfinite(r.bits_per_byte) and r.bits_per_byte == pytest.approx(r.mean_nll / math.log(2))


def test_hf_causal_lm_accepted():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    x, y = torch.randint(0, 64, (2, 10)), torch.randint(0, 64, (2, 10))
    r = evaluate_perplexity(m, [(x, y)])
    with torch.no_grad():
        ref = F.cross_entropy(m(x).logits.reshape(-1, 64), y.reshape(-1))
    assert r.mean_nll == pytest.approx(float(ref), rel=1e-5)


# --------------------------------------------------------------------------- tasks and distillation


def test_distill_loss_known_values():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # teacher softmax at T=1: (3/4, 1/4)
    labels = torch.tensor([0])
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    ce = math.log(2.0)  # student uniform over 2 classes
    assert float(distill_loss(s, t, labels, temperature=1.0, alpha=1.0)) == pytest.approx(kl, rel=1e-6)
    assert float(distill_loss(s, t, labels, temperature=1.0, alpha=0.0)) == pytest.approx(ce, rel=1e-6)
    assert float(distill_loss(s, t, labels, 1.0, 0.3)) == pytest.approx(0.3 * kl + 0.7 * ce, rel=1e-6)
    # T = 2: teacher softmax(t / 2) = (sqrt3, 1) / (sqrt3 + 1); scaled by T^2 = 4.
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    kl2 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert float(distill_loss(s, t, labels, 2.0, 1.0)) == pytest.approx(4 * kl2, rel=1e-6)
    # Ignored positions leave both terms; identical logits give zero KL.
    s3 = torch.randn(4, 5)
    assert float(distill_loss(s3, s3.clone(), torch.tensor([1, -100, 2, 3]), 3.0, 1.0)) == pytest.approx(0, abs=1e-6)
    with pytest.raises(TaskError, match="differ"):
        distill_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]), 1.0, 0.5)


def test_causal_lm_strategy_matches_gpt_loss():
    model = tiny_gpt()
    x, y = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    loss, m = get_task("causal_lm").loss_and_metrics(model, (x, y))
    assert float(loss.detach()) == pytest.approx(float(model(x, y).detach()), rel=1e-5)
    assert set(m) == {"loss", "token_accuracy"} and 0 <= m["token_accuracy"] <= 1


def test_masked_lm_recipe_and_bert():
    from transformers import BertConfig, BertForMaskedLM

    V, MASK, PAD = 50, 4, 0
    task = MaskedLM(mask_token_id=MASK, vocab_size=V, special_ids=(0, 1, 2, 3), seed=0)
    ids = torch.randint(5, V, (64, 64))
    ids[:, 0], ids[:, -1] = 2, 3  # CLS ... SEP
    masked, labels = task.mask_tokens(ids)
    chosen = labels != -100
    frac = chosen[:, 1:-1].float().mean().item()
    assert 0.12 < frac < 0.18  # 15% of eligible tokens
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # specials never chosen
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    to_mask = (masked[chosen] == MASK).float().mean().item()
    kept = (masked[chosen] == ids[chosen]).float().mean().item()
    assert 0.74 < to_mask < 0.86 and 0.05 < kept < 0.16  # 80% [MASK], ~10% unchanged (+ random hits)
    # A tiny BERT lowers its masked-LM loss in a few steps (fixed batch).
    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD))
    opt = torch.optim.AdamW(bert.parameters(), lr=3e-3)
    batch = {"input_ids": ids[:8, :32], "attention_mask": torch.ones(8, 32, dtype=torch.long)}
    first = None
    for _ in range(30):
        loss, m = task.loss_and_metrics(bert, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else m["loss"]
    assert m["loss"] < first and "masked_accuracy" in m


def test_classification_checks_labels_and_head():
    model = torch.nn.Linear(4, 3)
    task = Classification(num_classes=3)
    loss, m = task.loss_and_metrics(model, {"x": torch.randn(5, 4), "y": torch.tensor([0, 1, 2, 1, 0])})
    assert loss.requires_grad and 0 <= m["accuracy"] <= 1
    with pytest.raises(TaskError, match=r"labels must be in \[0, 3\)"):
        task.loss_and_metrics(model, (torch.randn(2, 4), torch.tensor([0, 3])))
    with pytest.raises(TaskError, match="head has 3 outputs"):
        Classification(num_classes=10).loss_and_metrics(model, (torch.randn(2, 4), torch.tensor([0, 1])))
    with pytest.raises(TaskError, match="unknown task"):
        get_task("regression")


def test_classification_with_hf_sequence_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, num_labels=2))
    batch = {"input_ids": torch.randint(0, 30, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 0])}
    loss, m_ = get_task("classification", num_classes=2).loss_and_metrics(m, batch)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach())) and 0 <= m_["accuracy"] <= 1


def test_distillation_strategy_uses_same_inputs():
    teacher, student = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    d = Distillation(Classification(3), teacher, temperature=2.0, alpha=0.5)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss, m = d.loss_and_metrics(student, (x, y))
    loss.backward()
    assert teacher.weight.grad is None and student.weight.grad is not None
    ref = float(distill_loss(student(x), teacher(x), y, 2.0, 0.5).detach())
    soft = float(distill_loss(student(x), teacher(x), y, 2.0, 1.0).detach())  # T^2 * KL alone
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-6) and m["distill_loss"] == pytest.approx(soft)


# --------------------------------------------------------------------------- digits classifiers


def test_digits_split_is_stratified_and_seeded():
    from raybig.train.classifiers import load_digits_split

    a, b = load_digits_split(seed=3), load_digits_split(seed=3)
    assert a.x_train.dtype.name == "float32" and a.y_train.dtype.name == "int64"
    assert a.x_train.shape[1:] == (8, 8) and 0 <= a.x_train.min() and a.x_train.max() <= 1
    assert (a.x_val == b.x_val).all() and len(a.y_val) == 360
    counts = torch.bincount(torch.from_numpy(a.y_val), minlength=10)
    assert counts.min() >= 35  # ~36 per class


def test_check_arrays_bad_inputs():
    import numpy as np

    from raybig.train.classifiers import ClassifierDataError, build_classifier, check_arrays

    x, y = np.zeros((4, 8, 8), np.float32), np.array([0, 1, 2, 10])
    with pytest.raises(ClassifierDataError, match=r"labels must be in \[0, 10\)"):
        check_arrays(x, y, 10)
    with pytest.raises(ClassifierDataError, match="3 labels"):
        check_arrays(x, y[:3], 10)
    with pytest.raises(ClassifierDataError, match="expects"):
        check_arrays(x, np.array([0, 1, 2, 3]), 10, input_shape=(28, 28))
    with pytest.raises(ClassifierDataError, match="unknown classifier"):
        build_classifier("resnet", (8, 8), 10)


def _fit(model, split, epochs: int, lr: float, batch: int = 64) -> float:
    """The plain single-process PyTorch baseline (issue 17's benchmark compares against this)."""
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    xv, yv = torch.from_numpy(split.x_val), torch.from_numpy(split.y_val)
    task = Classification(split.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch):
            j = perm[i:i + batch]
            loss, _ = task.loss_and_metrics(model, (xt[j], yt[j]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        _, m = task.loss_and_metrics(model, (xv, yv))
    return m["accuracy"]


@pytest.mark.parametrize("name,epochs", [("mlp", 10), ("cnn", 5)])
def test_digits_plain_loop_reaches_90_percent(name, epochs):
    from raybig.train.classifiers import build_classifier, load_digits_split

    split = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = build_classifier(name, split.example_shape, split.num_classes)
    t0 = time.perf_counter()
    acc = _fit(model, split, epochs=epochs, lr=3e-3)
    assert acc >= 0.90, f"{name}: {acc:.3f}"
    assert time.perf_counter() - t0 < 30


# --------------------------------------------------------------------------- lm-eval, offline


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A GPT-2-shaped transformers model + a byte-level BPE tokenizer trained here, save_pretrained."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from raybig.eval.harness import TASKS_DIR

    out = tmp_path_factory.mktemp("export")
    corpus = [json.loads(line)["text"] for line in open(TASKS_DIR / "stdlib_docs.jsonl")]
    corpus += [f"Question: What is {a} + {b}?\nAnswer: {a + b}" for a in range(20) for b in range(5)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return str(out)


def test_lm_eval_shipped_tasks_offline(tiny_export, monkeypatch):
    from raybig.eval.harness import list_tasks, run_harness

    monkeypatch.setenv("HF_DATASETS_CACHE", str(__import__("pathlib").Path(tiny_export).parent / "ds-cache"))
    assert list_tasks() == ["raybig_arith_mc", "raybig_stdlib_docs"]
    hub_offline_before = os.environ.get("HF_HUB_OFFLINE")  # offline() restores it afterwards
    t0 = time.perf_counter()
    res = run_harness(tiny_export, ["raybig_arith_mc", "raybig_stdlib_docs"], batch_size=16)
    assert time.perf_counter() - t0 < 90
    mc, roll = res.metrics["raybig_arith_mc"], res.metrics["raybig_stdlib_docs"]
    assert 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0
    for k in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert math.isfinite(roll[k]) and roll[k] > 0
    assert res.samples == {"raybig_arith_mc": 50, "raybig_stdlib_docs": 20}
    assert "HF_HUB_OFFLINE" not in os.environ or os.environ["HF_HUB_OFFLINE"] == hub_offline_before
    # An untrained model over ~400 tokens: about log2(400) bits per token, a few bits per byte.
    assert 0.5 < roll["bits_per_byte"] < 12


@pytest.mark.parametrize("body,match", [
    ("task: [unclosed\n", r"bad\.yaml:\d+: not valid YAML"),
    ("- a list\n", "must be a YAML mapping"),
    ("task: t\ndataset_path: json\noutput_type: multiple_choice\ndoc_to_target: a\n", "needs 'doc_to_choice'"),
    ("task: t\ndataset_path: EleutherAI/x\noutput_type: loglikelihood\ndoc_to_target: a\n", "fetched from the Hub"),
    ("task: t\ndataset_path: json\noutput_type: loglikelihood\ndoc_to_target: a\ntest_split: test\n"
     "dataset_kwargs: {data_files: {test: nope.jsonl}}\n", "does not exist"),
    ("task: t\ndataset_path: json\noutput_type: loglikelihood\ndoc_to_target: a\ntest_split: test\n"
     "dataset_kwargs: {data_files: {test: d.jsonl}}\n", r"d\.jsonl:2: t: not valid JSON"),
    ("task: t\noutput_type: rank\n", "missing required key 'dataset_path'"),
])
def test_malformed_task_file_is_one_line_error(tmp_path, body, match):
    from raybig.errors import RaybigError
    from raybig.eval.harness import EvalTaskError, load_task_config

    (tmp_path / "d.jsonl").write_text('{"a": 1}\n{"a": \n')
    (tmp_path / "bad.yaml").write_text(body)
    with pytest.raises(EvalTaskError, match=match) as e:
        load_task_config(str(tmp_path / "bad.yaml"))
    assert isinstance(e.value, RaybigError) and e.value.exit_code == 2 and "\n" not in str(e.value)
    with pytest.raises(EvalTaskError, match="no file"):
        load_task_config("no_such_task")


def test_raybig_export_bits_per_byte_matches_lm_eval(tmp_path, monkeypatch):
    """raybig's GPT, its GPT2LMHeadModel export, and lm-eval's `hf` runner agree on bits per byte.

    Our windows with `bos_id` are lm-eval's rolling windows (disjoint, context = the previous
    window's tokens), so the totals match to float precision, not just roughly.
    """
    import json

    export_hf = pytest.importorskip("raybig.train.export_hf")
    if not hasattr(export_hf, "export_raybig_gpt"):
        pytest.skip("raybig.train.export_hf.export_raybig_gpt not available")
    from transformers import AutoModelForCausalLM

    from raybig.eval.harness import TASKS_DIR, run_harness
    from raybig.tokenizer import get_tokenizer

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, vocab_size=256)
    model = GPT(cfg).eval()
    out = str(tmp_path / "export")
    tok = get_tokenizer("bytes")
    export_hf.export_raybig_gpt(model, cfg, tok, out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    docs = [json.loads(line)["text"] for line in open(TASKS_DIR / "stdlib_docs.jsonl")][:5]
    ours = hf_ours = None
    for d in docs:  # newline: the prefix the adapter gives a tokenizer without BOS/EOS
        a = perplexity_of_text(model, d, tok.encode, 128, bos_id=10)
        b = perplexity_of_text(hf, d, tok.encode, 128, bos_id=10)
        ours = a if ours is None else ours.merge(a)
        hf_ours = b if hf_ours is None else hf_ours.merge(b)
    assert ours.num_bytes == sum(len(d.encode()) for d in docs)
    assert hf_ours.nll_sum == pytest.approx(ours.nll_sum, rel=1e-5)
    res = run_harness(out, ["raybig_stdlib_docs"], limit=5)
    assert res.metric("raybig_stdlib_docs", "bits_per_byte") == pytest.approx(ours.bits_per_byte, rel=1e-4)

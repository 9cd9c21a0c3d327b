"""Issue 17 tasks beyond causal LM, without Ray or DeepSpeed: the CNN on parquet/npz arrays, masked-LM
batches (deterministic BERT masking), the Hugging Face sequence classifier, distillation's teacher
in the loss, and the bad inputs validation names with their YAML path and line."""

from __future__ import annotations

import json
import os
import pathlib
import random

import numpy as np
import pytest
import torch

from raybig.spec import SpecError, load_spec_text

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


def make_tiny_bert(out: str, vocab: int = 400, seed: int = 0) -> str:
    """A tiny BERT (masked-LM head) and a WordPiece tokenizer trained here on stdlib sources: offline."""
    import glob
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    texts = [open(p, encoding="utf-8", errors="replace").read()
             for p in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:30]]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    cfg = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(seed)
    BertForMaskedLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("bert") / "tiny-bert"))


def _issue(text: str):
    with pytest.raises(SpecError) as e:
        load_spec_text(text, source="job.yaml")
    return e.value.issues[0]


# --------------------------------------------------------------------------- CNN on arrays


def test_cnn_reads_parquet_reshapes_and_fits_digits(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raybig.train.classifiers import ArrayBatches, build_classifier, load_arrays, load_digits_split

    split = load_digits_split(seed=0)
    x = np.concatenate([split.x_train, split.x_val]).reshape(-1, 64)  # flat rows, as tables hold them
    y = np.concatenate([split.y_train, split.y_val])
    part = ["train"] * len(split.y_train) + ["val"] * len(split.y_val)
    path = str(tmp_path / "digits.parquet")
    pq.write_table(pa.table({"x": [list(r) for r in x], "digit": y, "split": part}), path)
    got = load_arrays(path, input_shape=(8, 8), label_field="digit")
    assert got.example_shape == (8, 8) and got.num_classes == 10
    np.testing.assert_array_equal(got.x_val, split.x_val) and np.testing.assert_array_equal(got.y_train, split.y_train)
    # The CNN learns it in plain PyTorch (the Ray test trains it through DeepSpeed).
    torch.manual_seed(0)
    model = build_classifier("cnn", got.example_shape, 10, hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    b = ArrayBatches.build(got, 64, 0, 0, 1, 1)
    for step in range(150):
        xb, yb = b.train_batch(step, 0)
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xv, yv = b.val_batch(0)
    with torch.no_grad():
        assert (model(xv).argmax(-1) == yv).float().mean() >= 0.9


def test_bad_arrays_are_named_at_validate_time(tmp_path):
    from raybig.train.classifiers import load_digits_split

    s = load_digits_split(seed=0)
    np.savez(tmp_path / "ok.npz", x_train=s.x_train, y_train=s.y_train, x_val=s.x_val, y_val=s.y_val)
    np.savez(tmp_path / "flat.npz", x=s.x_train.reshape(-1, 64), y=s.y_train)
    head = "kind: train\nname: c\ntask: classification\n"
    cases = [
        (head + f"classifier: {{dataset: {tmp_path}/ok.npz, num_classes: 5}}\n", "classifier.num_classes", 4,
         "outside [0, 5)"),
        (head + f"classifier: {{arch: cnn, dataset: {tmp_path}/ok.npz, input_shape: [7, 7]}}\n",
         "classifier.input_shape", 4, "not [7, 7]"),
        (head + f"classifier: {{arch: cnn, dataset: {tmp_path}/flat.npz}}\n", "classifier.arch", 4,
         "set classifier.input_shape"),
        (head + "classifier: {arch: cnn, input_shape: [64]}\n", "classifier.input_shape", 4, "(H, W) or (C, H, W)"),
        (head + "classifier: {dataset: digits.csv}\n", "classifier.dataset", 4, ".parquet"),
    ]
    for text, path, line, msg in cases:
        issue = _issue(text)
        assert ".".join(map(str, issue.path)) == path and issue.line == line, (issue.render(), text)
        assert msg in issue.message and "job.yaml" in issue.render(), issue.render()
    # Flat rows with the shape given validate.
    load_spec_text(head + f"classifier: {{arch: cnn, dataset: {tmp_path}/flat.npz, input_shape: [8, 8]}}\n")


# --------------------------------------------------------------------------- masked LM


def _prepared_bytes(tmp_path) -> str:
    from raybig.data.prepare import prepare_spec
    from raybig.spec.models import DataSpec
    from raybig.tokenizer import BYTES

    (tmp_path / "t.txt").write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                                            for i in range(2000)))
    return prepare_spec(DataSpec(path=str(tmp_path / "t.txt"), seq_len=32), str(tmp_path / "prep"), BYTES,
                        use_ray=False).uri


def test_masked_batches_are_bert_masking_keyed_on_step(tmp_path):
    from raybig.data.shards import ShardBatches
    from raybig.train.tasks import IGNORE_INDEX, MaskedBatches, MaskedLM

    uri = _prepared_bytes(tmp_path)
    masker = MaskedLM(mask_token_id=256, vocab_size=257, special_ids=[10], seed=0)

    def batches(rank: int) -> MaskedBatches:
        return MaskedBatches(ShardBatches(uri, 32, 64, 7, rank, 2), masker, seed=7, rank=rank)

    a, b = batches(0), batches(0)
    a.get(5, 0)  # another step first: the masks do not depend on what was drawn before (resume is exact)
    x1, x2 = a.get(3, 1), b.get(3, 1)
    assert np.array_equal(x1.x, x2.x) and np.array_equal(x1.y, x2.y)
    assert not np.array_equal(a.get(4, 1).y, x1.y) and not np.array_equal(batches(1).get(3, 1).y, x1.y)
    raw = a.base.get(3, 1).x
    chosen = x1.y != IGNORE_INDEX
    assert np.array_equal(x1.y[chosen], raw[chosen]) and np.array_equal(x1.x[~chosen], raw[~chosen])
    assert not chosen[raw == 10].any()  # specials are never chosen
    # Over many rows: 15% chosen; of those 80% [MASK], 10% random, 10% kept (Devlin et al. 2019).
    ys, xs, raws = zip(*[(m.y, m.x, a.base.get(s, 0).x) for s in range(30) for m in [a.get(s, 0)]], strict=False)
    y, x, r = np.concatenate(ys), np.concatenate(xs), np.concatenate(raws)
    c = y != IGNORE_INDEX
    assert c[r != 10].mean() == pytest.approx(0.15, abs=0.01)
    assert (x[c] == 256).mean() == pytest.approx(0.8, abs=0.02)
    assert (x[c] == r[c]).mean() == pytest.approx(0.1 + 0.1 / 256, abs=0.02)
    # Validation masks are the same every evaluation.
    assert torch.equal(a.val_batch(1)[1], b.val_batch(1)[1])


def test_masked_lm_build_and_loss_on_tiny_bert(tiny_bert, tmp_path):
    from raybig.data.shards import ShardBatches
    from raybig.train.build import build

    spec = load_spec_text(f"kind: train\nname: m\ntask: masked_lm\nmodel: {{hf: {tiny_bert}}}\n"
                          f"data: {{path: stdlib://, seq_len: 32, tokenizer: model, max_tokens: 20000}}\n"
                          f"storage: {{path: {tmp_path}}}\n")
    b = build(spec, None)
    assert type(b.model).__name__ == "BertForMaskedLM" and b.wrap_batches is not None
    from raybig.data.prepare import prepare_spec, prepared_root
    from raybig.train.built import run_tokenizer

    tok = run_tokenizer(spec, None)
    uri = prepare_spec(spec.data, prepared_root(spec.data, spec.storage.path), tok, use_ray=False).uri
    mb = b.wrap_batches(ShardBatches(uri, 32, 8, 0, 0, 1), 0)
    bt = mb.get(0, 0)
    assert (bt.x == tok.hf.mask_token_id).any()  # the tokenizer's own [MASK]
    opt = torch.optim.AdamW(b.model.parameters(), lr=3e-3)
    first = None
    for _step in range(25):
        bt = mb.get(0, 0)  # one batch, same mask: the loss must fall
        loss = b.loss(b.model, torch.from_numpy(bt.x), torch.from_numpy(bt.y))
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first * 0.8 and 0.0 <= b.metrics["masked_accuracy"] <= 1.0


def test_task_and_head_mismatches_are_spec_errors(tiny_models, tiny_bert, tmp_path):
    gpt2 = tiny_models["gpt2"]
    cases = [
        (f"kind: train\nname: m\ntask: masked_lm\nmodel: {{hf: {gpt2}}}\n", "model.hf", 4, "no masked-LM head"),
        ("kind: train\nname: m\ntask: masked_lm\nmodel: {preset: gpt-debug}\n", "model", 4, "Hugging Face encoder"),
        ("kind: train\nname: m\ntask: masked_lm\nmodel: {hf_config: {model_type: bert, vocab_size: 256, "
         "hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}}\n"
         "data: {tokenizer: bytes}\n", "model.hf_config", 4, "[MASK] id"),
        ("kind: train\nname: m\nmasked_lm: {probability: 0.2}\n", "masked_lm", 3, "applies to task: masked_lm"),
        (f"kind: train\nname: m\ntask: masked_lm\nmodel: {{hf: {tiny_bert}}}\n"
         "data: {packed: true}\n", "data", 5, "plain text"),
        (f"kind: train\nname: m\ntask: masked_lm\nmodel: {{hf: {tiny_bert}}}\n"
         "finetune: {method: lora}\n", "finetune.method", 5, "trains in full"),
    ]
    for text, path, line, msg in cases:
        issue = _issue(text)
        assert ".".join(map(str, issue.path)) == path and issue.line == line, (issue.render(), text)
        assert msg in issue.message, issue.render()


# --------------------------------------------------------------------------- Hugging Face sequence classifier


def _sentiment(path) -> str:
    rnd = random.Random(0)
    words = {0: ["good", "great", "fine", "happy", "love"], 1: ["bad", "awful", "sad", "hate", "poor"]}
    with open(path, "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": " ".join(rnd.choice(words[i % 2]) for _ in range(5)),
                                "label": ["pos", "neg"][i % 2]}) + "\n")
    return str(path)


def test_hf_sequence_classifier_learns_text_labels(tiny_bert, tmp_path):
    from raybig.train.build import build
    from raybig.train.classifiers import batches_for_spec

    data = _sentiment(tmp_path / "s.jsonl")
    spec = load_spec_text(f"kind: train\nname: sc\ntask: classification\nmodel: {{hf: {tiny_bert}}}\n"
                          f"data: {{path: {data}, text_field: text, seq_len: 16, tokenizer: model}}\n"
                          "train: {micro_batch_size: 16, eval_batches: 1}\n")
    b = build(spec, None)
    assert type(b.model).__name__ == "BertForSequenceClassification" and b.model.config.num_labels == 2
    bs = batches_for_spec(spec, 0, 1)
    opt = torch.optim.AdamW(b.model.parameters(), lr=3e-3)
    for step in range(40):
        bt = bs.get(step, 0)
        loss = b.loss(b.model, torch.from_numpy(bt.x), torch.from_numpy(bt.y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    b.model.eval()
    xv, yv = bs.val_batch(0)
    b.loss(b.model, xv, yv)
    assert b.metrics["accuracy"] >= 0.9


def test_eval_of_a_hf_sequence_classifier_export_scores_the_runs_text_split(tiny_bert, tmp_path):
    """`raybig eval`'s classifier path on a transformers export: the run's own text split and tokenizer."""
    import shutil

    from raybig.eval.run import run_classification
    from raybig.train.build import build
    from raybig.train.classifiers import split_for_spec

    data = _sentiment(tmp_path / "s.jsonl")
    spec = load_spec_text(f"kind: train\nname: sc\ntask: classification\nmodel: {{hf: {tiny_bert}}}\n"
                          f"data: {{path: {data}, text_field: text, seq_len: 16, tokenizer: model}}\n")
    b = build(spec, None)
    export = tmp_path / "run" / "export"
    b.model.save_pretrained(export)
    for f in pathlib.Path(tiny_bert).glob("tokenizer*"):
        shutil.copy(f, export)
    split = split_for_spec(spec)
    b.model.eval()
    with torch.no_grad():  # the same model scored directly, padding masked as in training
        x, y = torch.from_numpy(split.x_val), torch.from_numpy(split.y_val)
        b.loss(b.model, x, y, validation=True)
        want = b.metrics["accuracy"]
    got = run_classification(spec, str(export))
    assert got["examples"] == len(split.y_val) > 0 and got["val_accuracy"] == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------- distillation


def _classifier_export(run_dir, hidden, num_classes=10, shape=(8, 8)):
    from raybig.train.classifiers import build_from_config, classifier_config
    from raybig.train.export import write_export

    cfg = classifier_config("mlp", shape, num_classes, hidden)
    write_export(str(run_dir), build_from_config(**cfg["kwargs"]).state_dict(), cfg, tied=(), precision="fp32",
                 name="t")
    return str(run_dir)


def test_distillation_mixes_teacher_in_training_not_in_validation(tmp_path):
    from raybig.train.build import build
    from raybig.train.classifiers import load_digits_split
    from raybig.train.tasks import distill_loss

    teacher = _classifier_export(tmp_path / "teacher", [64])
    spec = load_spec_text("kind: train\nname: s\ntask: classification\nclassifier: {arch: cnn, hidden: [16]}\n"
                          f"distill: {{teacher: {teacher}, temperature: 3.0, alpha: 0.6}}\n")
    b = build(spec, None)
    s = load_digits_split(seed=0)
    x, y = torch.from_numpy(s.x_train[:32]), torch.from_numpy(s.y_train[:32])
    b.model.train()
    loss = b.loss(b.model, x, y)
    t = b.task.teacher
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    with torch.no_grad():
        want = distill_loss(b.model(x), t(x), y, 3.0, 0.6)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5) and "distill_loss" in b.metrics
    loss.backward()
    assert all(p.grad is None for p in t.parameters())  # the teacher never learns
    b.model.eval()  # validation (loop.evaluate says so): the student's own cross-entropy
    with torch.no_grad():
        assert float(b.loss(b.model, x, y, validation=True)) == pytest.approx(
            float(torch.nn.functional.cross_entropy(b.model(x), y)), rel=1e-5)


def test_causal_lm_distillation_from_a_gpt_export(tmp_path):
    """A raybig GPT student distils from a raybig GPT teacher export: next-token logits, same bytes."""
    from raybig.model import GPT, GPTConfig
    from raybig.train.build import build
    from raybig.train.export import write_export
    from raybig.train.tasks import distill_loss

    torch.manual_seed(1)
    tcfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=256, dropout=0.0, bias=False)
    teacher = GPT(tcfg).eval()
    export = write_export(str(tmp_path / "teacher"), teacher.state_dict(), tcfg.to_dict(), tied=("lm_head.weight",))
    spec = load_spec_text("kind: train\nname: s\nmodel: {preset: gpt-debug}\ndata: {seq_len: 16}\n"
                          f"distill: {{teacher: {export}, temperature: 2.0, alpha: 0.7}}\n")
    b = build(spec, None, vocab_size=256)
    x = torch.randint(0, 256, (3, 16))
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    b.model.train()
    loss = b.loss(b.model, x, y)
    with torch.no_grad():
        want = distill_loss(_logits(b.model, x), teacher(x), y, 2.0, 0.7)
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5) and b.metrics["distill_loss"] > 0
    loss.backward()
    assert all(p.grad is None for p in b.task.teacher.parameters())
    with torch.no_grad():  # validation: the student's own next-token loss
        own = torch.nn.functional.cross_entropy(_logits(b.model, x).reshape(-1, 256), y.reshape(-1))
        assert float(b.loss(b.model, x, y, validation=True)) == pytest.approx(float(own), rel=1e-5)


def _logits(model, x):
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def test_bad_teachers_are_spec_errors(tiny_models, tmp_path):
    head = "kind: train\nname: s\ntask: classification\n"
    five = _classifier_export(tmp_path / "five", [8], num_classes=5)
    gpt2 = tiny_models["gpt2"]  # a Hugging Face causal LM with a 1,024-token BPE
    cases = [
        (head + f"distill: {{teacher: {tmp_path}/nowhere}}\n", "distill.teacher", 4, "no export there"),
        (head + f"distill: {{teacher: {five}}}\n", "distill.teacher", 4, "5 classes, the student 10"),
        (head + f"distill: {{teacher: {gpt2}}}\n", "distill.teacher", 4, "not a built-in classifier"),
        # raybig's GPT on bytes (256 ids) cannot learn from a 1,024-id teacher: different tokenizers.
        (f"kind: train\nname: s\nmodel: {{preset: gpt-debug}}\ndistill: {{teacher: {gpt2}}}\n", "distill.teacher",
         4, "vocabulary has 1024 ids, the student's 256"),
        (f"kind: train\nname: s\ntask: masked_lm\nmodel: {{hf_config: {{model_type: bert, vocab_size: 1024}}}}\n"
         f"data: {{tokenizer: bpe, vocab_size: 1000}}\ndistill: {{teacher: {gpt2}}}\n", "distill.teacher", 6,
         "not a model with the masked_lm head"),
    ]
    for text, path, line, msg in cases:
        issue = _issue(text)
        assert ".".join(map(str, issue.path)) == path and issue.line == line, (issue.render(), text)
        assert msg in issue.message, issue.render()
    # A run this storage has yet to write (an earlier job's) is checked when the workers load it.
    load_spec_text(head + f"storage: {{path: {tmp_path}/runs}}\ndistill: {{teacher: {tmp_path}/runs/digits}}\n")

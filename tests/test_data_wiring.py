"""The data layer wired into specs and training: DataSpec fields, prepare-or-reuse, packed masks, loss masks.

All in-process (no Ray): `prepare_spec(..., use_ray=False)` runs the same per-item code Ray Data runs.
The end-to-end `raybig run` on jsonl instruction data is tests/test_data_train_ray.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from raybig.data.prepare import PrepareOptions, describe, prepare_spec, prepared_root
from raybig.data.shards import IGNORE_INDEX, ShardBatches, check_shares
from raybig.data.sources import DataError
from raybig.errors import SpecError
from raybig.model import GPT, GPTConfig
from raybig.spec import load_spec_text

pytestmark = pytest.mark.unit


def _records(n: int = 40) -> list[dict[str, str]]:
    return [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i), "note": "x"} for i in range(n)]


@pytest.fixture
def jsonl(tmp_path):
    p = tmp_path / "data" / "qa.jsonl"
    p.parent.mkdir()
    p.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return str(p)


def _spec(data: str, workers: int = 2, storage: str = "/tmp/unused-runs", **train):
    t = {"steps": 4, "micro_batch_size": 2, **train}
    text = f"""kind: train
name: d
model: {{preset: gpt-debug}}
data:
{data}
train: {json.dumps(t)}
resources: {{workers: {workers}}}
storage: {{path: {storage}}}
"""
    return load_spec_text(text, source="job.yaml")


def _issues(data: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(SpecError) as e:
        _spec(data)
    return [(".".join(map(str, i.path)), i.line, i.message) for i in e.value.issues]


# --- spec fields ---------------------------------------------------------------------------------


def test_instruction_fields_validate_and_map_to_prepare_options(jsonl):
    s = _spec(f"  path: {jsonl}\n  seq_len: 64\n  prompt_template: \"Q: {{prompt}}\\nA: \"\n"
              "  response_field: answer\n  split_seed: 7\n  max_tokens: 5000\n  on_bad_record: skip")
    d = s.data
    assert (d.file_format(), d.example_format(), d.is_packed(), d.token_limit()) == ("jsonl", "instruction", True, 5000)
    o = PrepareOptions.from_spec(d)
    assert (o.format, o.file_type, o.prompt_template, o.response_field, o.split_seed, o.max_tokens,
            o.on_bad_record) == ("instruction", "auto", "Q: {prompt}\nA: ", "answer", 7, 5000, "skip")
    assert o.columns() == ["prompt", "answer"]
    from raybig.data.formats import DEFAULT_INSTRUCTION_TEMPLATE
    from raybig.spec.models import DEFAULT_PROMPT_TEMPLATE

    assert DEFAULT_PROMPT_TEMPLATE == DEFAULT_INSTRUCTION_TEMPLATE  # spec/ cannot import data/: kept equal here


def test_text_defaults_list_paths_and_val_fraction_zero(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.md"
    a.write_text("x" * 100)
    b.write_text("y" * 100)
    d = _spec(f"  path: [{a}, {b}]\n  val_fraction: 0").data
    assert d.example_format() == "text" and not d.is_packed() and d.file_format() == "text"
    assert PrepareOptions.from_spec(d).path == (str(a), str(b)) and d.val_fraction == 0
    assert _spec("  path: stdlib://\n  packed: true").data.is_packed()


@pytest.mark.parametrize("data,where,words", [
    ("  path: {j}\n  response_field: reply", "data.response_field", ["'reply'", "qa.jsonl:1", "'answer'"]),
    ("  path: {j}\n  prompt_template: 'Q: {{question}}'\n  response_field: answer", "data.prompt_template",
     ["needs field 'question'"]),
    ("  path: {j}\n  prompt_template: 'Q: {{0}}'", "data.prompt_template", ["positional"]),
    ("  path: {j}\n  prompt_template: 'Q: {{oops'", "data.prompt_template", ["format template"]),
    ("  path: {j}\n  prompt_template: 'no fields'", "data.prompt_template", ["names no record field"]),
    ("  path: {j}\n  messages_field: chat\n  response_field: answer", "data.response_field", ["chat"]),
    ("  path: {j}\n  text_field: question\n  response_field: answer", "data.text_field", ["drop one"]),
    ("  path: {j}\n  text_field: body", "data.text_field", ["'body'"]),
    ("  path: {j}\n  messages_field: msgs", "data.messages_field", ["'msgs'"]),
    ("  path: {j}\n  format: text\n  response_field: answer", "data.response_field", ["data.format is text"]),
    ("  path: stdlib://\n  response_field: answer", "data.response_field", ["read as text files"]),
    ("  path: {j}\n  on_bad_record: ignore\n  response_field: answer", "data.on_bad_record", ["fail"]),
    ("  path: {j}\n  max_tokens: 100\n  max_bytes: 20000", "data.max_bytes", ["max_tokens"]),
    ("  path: []", "data.path", ["at least one"]),
    ("  path: stdlib://\n  val_fraction: 0.5", "data.val_fraction", ["0.5"]),
    ("  path: stdlib://\n  fromat: jsonl", "data.fromat", ["did you mean 'format'"]),
])
def test_bad_data_fields_are_spec_errors_with_path_and_line(jsonl, data, where, words):
    issues = _issues(data.format(j=jsonl))
    assert len(issues) == 1, issues
    path, line, msg = issues[0]
    assert path == where and line is not None and line >= 4, issues
    for w in words:
        assert w in msg, msg


def test_max_bytes_is_a_deprecated_alias_of_max_tokens():
    from raybig.spec.summary import validate_summary

    s = _spec("  path: stdlib://\n  max_bytes: 20000")
    assert s.data.token_limit() == 20000
    assert PrepareOptions.from_spec(s.data).max_tokens == 20000
    warnings = validate_summary(s)["warnings"]
    assert any("data.max_bytes is deprecated" in w and "max_tokens: 20000" in w for w in warnings), warnings


def test_validate_never_imports_torch_for_data_checks(jsonl, tmp_path):
    import subprocess
    import sys

    spec = tmp_path / "j.yaml"
    spec.write_text(f"kind: train\nname: j\nmodel: {{preset: gpt-debug}}\n"
                    f"data: {{path: {jsonl}, response_field: answer, prompt_template: '{{prompt}}'}}\n")
    code = ("import sys; from raybig.spec import load_spec; load_spec(sys.argv[1]); "
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(spec)], check=True)


# --- prepare once, reuse, re-prepare when stale -------------------------------------------------------


def test_prepare_spec_reuses_then_reprepares_when_a_source_changes(jsonl, tmp_path):
    s = _spec(f"  path: {jsonl}\n  seq_len: 32\n  prompt_template: \"Q: {{prompt}}\\nA: \"\n  response_field: answer",
              storage=str(tmp_path / "runs"))
    root = prepared_root(s.data, s.storage.path)
    assert root == f"{tmp_path}/runs/.prepared"
    first = prepare_spec(s.data, root, use_ray=False)
    again = prepare_spec(s.data, root, use_ray=False)
    assert not first.reused and again.reused and again.uri == first.uri
    assert "reusing prepared" in describe(again) and "0 bad records skipped" in describe(again)
    with open(jsonl, "a") as fh:
        fh.write(json.dumps({"prompt": "new?", "answer": "yes"}) + "\n")
    third = prepare_spec(s.data, root, use_ray=False)
    assert not third.reused and third.uri != first.uri and third.documents == first.documents + 1
    # Another option (the split seed) is another fingerprint too.
    s2 = _spec(f"  path: {jsonl}\n  response_field: answer\n  prompt_template: \"Q: {{prompt}}\\nA: \"\n"
               "  split_seed: 1", storage=str(tmp_path / "runs"))
    assert prepare_spec(s2.data, root, use_ray=False).uri not in (first.uri, third.uri)


def test_bad_records_skip_counts_them(tmp_path):
    p = tmp_path / "mixed.jsonl"
    recs = [json.dumps(r) for r in _records(30)] + ["{not json", json.dumps({"prompt": "no answer"})]
    p.write_text("\n".join(recs) + "\n")
    s = _spec(f"  path: {p}\n  response_field: answer\n  prompt_template: '{{prompt}}'\n  on_bad_record: skip",
              storage=str(tmp_path / "runs"))
    summ = prepare_spec(s.data, prepared_root(s.data, s.storage.path), use_ray=False)
    assert summ.bad_records == 2 and summ.documents == 30
    assert "2 bad records skipped" in describe(summ) and "mixed.jsonl:31" in summ.bad_examples[0]


def test_check_shares_refuses_a_corpus_too_small_for_every_rank(tmp_path):
    p = tmp_path / "small.txt"
    p.write_text("a few bytes of text, and a little more\n" * 3)
    s = _spec(f"  path: {p}\n  seq_len: 64\n  val_fraction: 0", storage=str(tmp_path / "runs"))
    uri = prepare_spec(s.data, prepared_root(s.data, s.storage.path), use_ray=False).uri
    with pytest.raises(DataError, match="corpus too small"):
        check_shares(uri, 64, 2, 0, 2)
    check_shares(uri, 16, 2, 0, 2)  # a shorter row fits


# --- what the model sees: response-only loss, packed examples kept apart ---------------------------------------


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=256)).eval()


def test_packed_rows_do_not_attend_across_examples():
    m = _tiny_gpt()
    a, b = torch.randint(0, 256, (1, 10)), torch.randint(0, 256, (1, 7))
    row = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(10), torch.arange(7)]).view(1, -1)
    docs = torch.tensor([[0] * 10 + [1] * 7])
    with torch.no_grad():
        packed = m(row, positions=pos, doc_ids=docs)
        alone_a, alone_b = m(a), m(b)
        unmasked = m(row)
    torch.testing.assert_close(packed[:, :10], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 10:], alone_b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[:, 10:], alone_b, atol=1e-3)  # without the mask b sees a
    with pytest.raises(ValueError, match="doc_ids"):
        m(row, doc_ids=docs, key_mask=torch.ones(1, 17, dtype=torch.bool))


def test_instruction_batches_take_the_loss_on_response_tokens_only(tmp_path):
    """A known example: the prompt's targets are IGNORE_INDEX, the response's (and EOS separator's) are kept."""
    p = tmp_path / "one.jsonl"
    p.write_text("".join(json.dumps({"q": f"say {w}", "a": w.upper()}) + "\n" for w in ["hi", "yo", "ok"] * 4))
    s = _spec(f"  path: {p}\n  seq_len: 24\n  prompt_template: 'Q:{{q}}|'\n  response_field: a\n  val_fraction: 0",
              storage=str(tmp_path / "runs"))
    uri = prepare_spec(s.data, prepared_root(s.data, s.storage.path), use_ray=False).uri
    bt = ShardBatches(uri, 24, 2, 0, 0, 1).get(0, 0)
    for r in range(2):
        ids = bt.doc_ids[r]
        for k in set(ids[ids >= 0].tolist()):
            sel = ids == k
            x, y = bt.x[r][sel], bt.y[r][sel]
            text = bytes(x.tolist()).decode()
            prompt_len = text.index("|") + 1  # 'Q:say hi|' then 'HI' and the '\n\n' separator
            assert (y[:prompt_len - 1] == IGNORE_INDEX).all(), (text, y)
            kept = bytes(y[prompt_len - 1:].tolist()).decode()
            assert kept == text[prompt_len:] + "\n" and kept.strip() in ("HI", "YO", "OK"), (text, kept)
            assert (bt.positions[r][sel] == np.arange(sel.sum())).all()
    # The model's loss is the mean over the kept targets only.
    m = _tiny_gpt()
    x, y = torch.from_numpy(bt.x), torch.from_numpy(bt.y)
    with torch.no_grad():
        loss = m(x, y, positions=torch.from_numpy(bt.positions), doc_ids=torch.from_numpy(bt.doc_ids))
        logits = m(x, positions=torch.from_numpy(bt.positions), doc_ids=torch.from_numpy(bt.doc_ids))
    keep = y != IGNORE_INDEX
    by_hand = F.cross_entropy(logits[keep].float(), y[keep])
    torch.testing.assert_close(loss, by_hand)


def test_built_loss_passes_packing_to_each_model_kind():
    from raybig.train.built import Built

    calls = []

    def engine(*a, **k):
        calls.append((len(a), sorted(k)))
        return type("Out", (), {"loss": torch.tensor(1.0)})() if "input_ids" in k else torch.tensor(1.0)

    x = y = pos = docs = torch.zeros(1, 4, dtype=torch.long)
    Built(torch.nn.Identity(), "gpt").loss(engine, x, y, pos, docs)
    Built(torch.nn.Identity(), "gpt").loss(engine, x, y)
    Built(torch.nn.Identity(), "hf").loss(engine, x, y, pos, docs)
    assert calls == [(2, ["doc_ids", "positions"]), (2, []), (0, ["input_ids", "labels", "position_ids",
                                                                    "shift_labels"])]


def test_hf_model_keeps_packed_examples_apart_from_position_ids():
    """transformers builds a block-diagonal mask from position_ids that restart (what Built.loss passes)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    a, b = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 5))
    pos = torch.cat([torch.arange(6), torch.arange(5)]).view(1, -1)
    with torch.no_grad():
        packed = m(input_ids=torch.cat([a, b], 1), position_ids=pos, use_cache=False).logits
        alone = m(input_ids=b, use_cache=False).logits
    torch.testing.assert_close(packed[:, 6:], alone, rtol=1e-4, atol=1e-4)


def test_loop_without_a_driver_prepares_in_process(tmp_path, monkeypatch):
    """A launcher other than Ray Train (torchrun benchmark): rank 0 prepares, then every rank opens it."""
    from raybig.train import loop

    monkeypatch.chdir(tmp_path)
    s = _spec("  path: stdlib://\n  max_tokens: 200000", storage=str(tmp_path / "runs"), workers=1)
    uri = loop._prepare_here(s, None, 0, None)
    assert uri.startswith(f"{tmp_path}/runs/.prepared/") and os.path.exists(f"{uri}/index.json")


def test_prepare_cli_prepares_once_then_reuses(jsonl, tmp_path, monkeypatch):
    """`raybig prepare SPEC --local` (in this process; without --local it runs Ray Data tasks)."""
    from click.testing import CliRunner

    from raybig.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.yaml").write_text(f"kind: train\nname: p\nmodel: {{preset: gpt-debug}}\n"
                                       f"data: {{path: {jsonl}, response_field: answer, seq_len: 32}}\n"
                                       "storage: {path: ./runs}\n")
    cli = CliRunner()
    first = cli.invoke(main, ["prepare", "job.yaml", "--local"])
    assert first.exit_code == 0, first.output
    assert "data: prepared" in first.output and "40 documents" in first.output and "0 bad records" in first.output
    again = cli.invoke(main, ["prepare", "job.yaml", "--local", "--json"])
    assert again.exit_code == 0, again.output
    d = json.loads(again.output)
    assert d["reused"] and d["documents"] == 40 and d["uri"].startswith(str(tmp_path / "runs" / ".prepared"))
    bad = cli.invoke(main, ["prepare", "job.yaml", "--local", "--set", "data.response_field=reply"])
    assert bad.exit_code == 2 and "data.response_field" in bad.output
    (tmp_path / "serve.yaml").write_text("kind: serve\nname: s\ncheckpoint: ./runs/p\n")
    other = cli.invoke(main, ["prepare", "serve.yaml", "--local"])
    assert other.exit_code == 2 and "takes a train spec" in other.output

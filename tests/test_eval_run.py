"""`raybig eval` on a run directory, in process (no Ray): a run made by hand with the loop's own
validation code, so perplexity == exp(val_loss) is checked against an independent computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from raybig.cli import main
from raybig.spec import freeze, load_spec_text

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]



def fake_run(tmp_path, tokenizer: str = "bytes", eval_section: str = ""):
    """A finished 2-worker run: spec.yaml, export/ of a random GPT, metrics.jsonl whose val_loss is
    what the training loop itself computes: `raybig.train.loop.evaluate` on each rank's `ShardBatches`
    of the data the driver prepared (`runner.prepare_data`), then the mean over ranks."""
    from raybig.data.shards import ShardBatches
    from raybig.train.build import build
    from raybig.train.built import gpt_config, run_tokenizer
    from raybig.train.export import write_export
    from raybig.train.loop import evaluate
    from raybig.train.runner import prepare_data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(12):
        (corpus / f"doc{d:02d}.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + 'héllo'\n"
                                                   for i in range(d * 40, d * 40 + 40)))
    text = f"""
kind: train
name: ev
model: {{n_layer: 1, n_head: 2, n_embd: 32, block_size: 64}}
data: {{path: {corpus}, seq_len: 32, tokenizer: {tokenizer}{', vocab_size: 300' if tokenizer == 'bpe' else ''}, val_fraction: 0.2}}
train: {{steps: 1, micro_batch_size: 4, eval_batches: 3}}
resources: {{workers: 2}}
storage: {{path: {tmp_path / 'runs'}}}
{eval_section}"""
    spec = load_spec_text(text)
    run_dir = tmp_path / "runs" / "ev"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(freeze(spec))
    prepared = prepare_data(spec, str(run_dir))
    tok = run_tokenizer(spec, str(run_dir))
    torch.manual_seed(0)
    built = build(spec, None, vocab_size=tok.vocab_size)
    model = built.model.eval()
    per_rank = [evaluate(model, ShardBatches(prepared, 32, 4, spec.seed, rank, 2, packed=False), 3,
                         torch.device("cpu"), built) for rank in range(2)]
    val_loss = sum(per_rank) / 2
    write_export(str(run_dir), model.state_dict(), gpt_config(spec, tok.vocab_size).to_dict(),
                 tied=("lm_head.weight",), name="ev", tokenizer=tok)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0, "val_loss": val_loss}) + "\n")
    return spec, run_dir, val_loss


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_eval_perplexity_is_exp_val_loss(tmp_path, tokenizer):
    from raybig.eval.run import EvalReport, evaluate_run

    spec, run_dir, val_loss = fake_run(tmp_path, tokenizer)
    rep = evaluate_run(spec, str(run_dir))
    p = rep.perplexity
    assert p["batches"] == 6 and p["tokens"] == 6 * 4 * 32
    # Same batches, same weights, float32 logits and a float64 sum: equal to float rounding.
    assert p["mean_nll"] == pytest.approx(val_loss, rel=1e-5)
    assert p["perplexity"] == pytest.approx(math.exp(val_loss), rel=1e-5)
    assert rep.val_loss == val_loss and rep.step == 1
    if tokenizer == "bytes":
        assert p["bits_per_byte"] == pytest.approx(val_loss / math.log(2), rel=1e-5)
    else:  # a BPE token is several bytes: fewer bits per byte than bits per token
        assert 0 < p["bits_per_byte"] < val_loss / math.log(2)
    again = EvalReport.from_run_dir(str(run_dir))
    assert again.perplexity["perplexity"] == p["perplexity"]


def test_eval_cli_json_table_and_bad_input(tmp_path, monkeypatch):
    spec, run_dir, val_loss = fake_run(tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["eval", str(run_dir), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["perplexity"]["perplexity"] == pytest.approx(math.exp(val_loss), rel=1e-5)
    assert json.loads((run_dir / "eval.json").read_text())["perplexity"] == data["perplexity"]
    r = runner.invoke(main, ["eval", str(run_dir)])
    assert r.exit_code == 0 and "perplexity" in r.stdout and "bits_per_byte" in r.stdout
    job = tmp_path / "job.yaml"  # the spec file names the same run directory
    job.write_text(freeze(spec))
    r = runner.invoke(main, ["eval", str(job), "--json", "--batches", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["perplexity"]["batches"] == 2  # 1 per worker
    # An unknown task: exit 2, one line, before any model loads.
    r = runner.invoke(main, ["eval", str(run_dir), "--task", "raybig_arith"])
    assert r.exit_code == 2 and "did you mean 'raybig_arith_mc'" in r.output
    r = runner.invoke(main, ["eval", str(tmp_path)])
    assert r.exit_code == 2 and "neither a train spec file nor a run directory" in r.output
    (run_dir / "export" / "config.json").unlink()
    r = runner.invoke(main, ["eval", str(run_dir)])
    assert r.exit_code == 1 and "has no export yet" in r.output


def test_eval_lm_eval_shipped_tasks_on_run_export(tmp_path, monkeypatch):
    """The shipped lm-eval tasks run offline against a raybig export; the rolling task's bits per byte
    is finite and the MC accuracy a fraction."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    spec, run_dir, _ = fake_run(tmp_path, eval_section="eval: {tasks: [raybig_arith_mc, raybig_stdlib_docs], limit: 4}")
    r = CliRunner().invoke(main, ["eval", str(run_dir), "--json", "--no-perplexity"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["perplexity"] is None
    assert data["harness_samples"] == {"raybig_arith_mc": 4, "raybig_stdlib_docs": 4}
    assert 0 <= data["harness"]["raybig_arith_mc"]["acc"] <= 1
    assert math.isfinite(data["harness"]["raybig_stdlib_docs"]["bits_per_byte"])


def test_eval_spec_section_bad_input_at_validate(tmp_path):
    from raybig.errors import SpecError

    bad = tmp_path / "bad_task.yaml"
    bad.write_text("task: t\ndataset_path: json\noutput_type: multiple_choice\ndoc_to_target: a\n")
    text = f"kind: train\nname: x\neval:\n  tasks:\n    - raybig_arith_mc\n    - {bad}\n"
    with pytest.raises(SpecError) as e:
        load_spec_text(text, source="job.yaml")
    (issue,) = e.value.issues
    assert issue.render().startswith("job.yaml:6: eval.tasks[1]:") and "needs 'doc_to_choice'" in issue.message
    with pytest.raises(SpecError) as e:
        load_spec_text("kind: train\nname: x\neval: {tasks: [raybig_stdlib]}\n", source="job.yaml")
    (issue,) = e.value.issues
    assert issue.render().startswith("job.yaml:3: eval.tasks[0]:") and "did you mean 'raybig_stdlib_docs'" in issue.message


def test_eval_hugging_face_run(tmp_path, tiny_models):
    """A `model.hf` run (tiny Llama with its own BPE tokenizer): perplexity on the loop's own validation
    batches equals exp of the loop's val_loss; bits per byte counts the scored tokens' bytes."""
    from raybig.data.shards import ShardBatches
    from raybig.eval.run import evaluate_run
    from raybig.train.build import build
    from raybig.train.built import run_tokenizer
    from raybig.train.export_hf import save_hf_export
    from raybig.train.loop import evaluate
    from raybig.train.runner import prepare_data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(10):
        (corpus / f"d{d}.txt").write_text(" ".join(f"word{i} and more text {i * d}" for i in range(300)))
    spec = load_spec_text(f"""
kind: train
name: hfev
model: {{hf: {tiny_models['llama']}}}
data: {{path: {corpus}, seq_len: 32, val_fraction: 0.2}}
train: {{steps: 1, micro_batch_size: 2, eval_batches: 2}}
resources: {{workers: 2}}
storage: {{path: {tmp_path / 'runs'}}}
""")
    run_dir = tmp_path / "runs" / "hfev"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(freeze(spec))
    prepared = prepare_data(spec, str(run_dir))
    tok = run_tokenizer(spec, str(run_dir))
    built = build(spec, None)
    model = built.model.eval()
    val_loss = sum(evaluate(model, ShardBatches(prepared, 32, 2, spec.seed, r, 2, packed=False), 2,
                            torch.device("cpu"), built) for r in range(2)) / 2
    save_hf_export(model, tok, str(run_dir / "export"))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_loss": val_loss}) + "\n")
    p = evaluate_run(spec, str(run_dir)).perplexity
    assert p["batch_mean_nll"] == pytest.approx(val_loss, rel=1e-5)
    assert p["perplexity"] == pytest.approx(math.exp(val_loss), rel=1e-4)
    assert 0 < p["bits_per_byte"] < p["mean_nll"] / math.log(2)  # a BPE token covers several bytes

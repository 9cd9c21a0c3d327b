"""Serving without Ray: spec, batched KV-cache generation, int8, request schema, Serve config."""

from __future__ import annotations

import json

import pytest
import torch

from raybig.model import GPT, GPTConfig
from raybig.serve.engine import Batch, Row, generate_batch, quantize_int8
from raybig.serve.schema import ApiError, build_job, parse_request
from raybig.spec import SpecError, load_spec_text
from raybig.spec.serve import GenerationSpec
from raybig.tokenizer import decode, encode

pytestmark = pytest.mark.unit

BASE = "kind: serve\nname: t\ncheckpoint: /x\n"


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)).eval()


def test_serve_spec_defaults_and_registry():
    s = load_spec_text(BASE)
    assert s.kind == "serve" and s.batching.ongoing >= s.batching.max_batch_size
    assert s.autoscaling.min_replicas == 1 and s.quantize == "none"


@pytest.mark.parametrize("extra,path,words", [
    ("batching: {max_batch_size: 8, max_ongoing_requests: 4}\n", "batching.max_ongoing_requests", "cap"),
    ("autoscaling: {min_replicas: 3, max_replicas: 2}\n", "autoscaling.min_replicas", "exceeds"),
    ("api_key_env: sk-abc123\n", "api_key_env", "NAME"),
    ("quantize: int4\n", "quantize", "int8"),
    ("route_prefix: api\n", "route_prefix", "start"),
    ("generation: {max_tokens: 500, max_new_tokens: 100}\n", "generation.max_tokens", "exceeds"),
    ("autoscalling: {}\n", "autoscalling", "did you mean 'autoscaling'"),
])
def test_serve_spec_errors_name_path_and_line(extra, path, words):
    with pytest.raises(SpecError) as e:
        load_spec_text(BASE + extra)
    issue = e.value.issues[0]
    assert ".".join(map(str, issue.path)) == path and issue.line == 4
    assert words in issue.message


def test_min_replicas_zero_allowed():
    assert load_spec_text(BASE + "autoscaling: {min_replicas: 0, max_replicas: 2}\n").autoscaling.min_replicas == 0


def test_batched_generation_matches_model_generate(gpt):
    prompts = [encode("def foo"), encode("import os\n"), encode("x")]  # ragged: left padding in play
    ref = [gpt.generate(torch.tensor([p]), 24, temperature=0)[0, len(p):].tolist() for p in prompts]
    assert [generate_batch(gpt, [Row(p, 24, 0.0)])[0] for p in prompts] == ref  # one row: bit-exact path
    assert generate_batch(gpt, [Row(p, 24, 0.0) for p in prompts]) == ref  # padded batch, same tokens


def test_rows_finish_independently_and_seeded_sampling_repeats(gpt):
    def run():
        rows = [Row(encode("ab"), 5, 1.0, 1.0, torch.Generator().manual_seed(7)),
                Row(encode("hello"), 12, 0.9, 0.9, torch.Generator().manual_seed(8))]
        return generate_batch(gpt, rows)
    a, b = run(), run()
    assert a == b and [len(x) for x in a] == [5, 12]


def test_kv_cache_matches_no_cache(gpt):
    idx = torch.tensor([encode("while True:")])
    a = gpt.generate(idx, 40, temperature=0, use_cache=True)
    b = gpt.generate(idx, 40, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def int8_closeness(model: torch.nn.Module, text: str) -> tuple[float, float]:
    """(top-1 agreement, mean KL(fp32 || int8)) of next-token predictions, teacher-forced on `text`."""
    q = quantize_int8(model)
    idx = torch.tensor([encode(text)])
    with torch.inference_mode():
        lp = torch.log_softmax(model(idx).float(), -1)[0]
        lq = torch.log_softmax(q(idx).float(), -1)[0]
    agree = (lp.argmax(-1) == lq.argmax(-1)).float().mean().item()
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    return agree, kl


def test_int8_stays_close_to_fp32(gpt):
    agree, kl = int8_closeness(gpt, "def main():\n    print('hello world')\n    return 0\n")
    assert agree >= 0.9 and kl < 0.05, (agree, kl)
    out = generate_batch(quantize_int8(gpt), [Row(encode("def "), 8, 0.0)])[0]
    assert len(out) == 8


GEN = GenerationSpec(max_new_tokens=64, max_prompt_tokens=100, max_n=2, max_prompts=3)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"max_tokens": 4}', 400, "prompt"),
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 65}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 120}', 400, "max_tokens"),
    (b'{"prompt": "' + b"y" * 101 + b'"}', 400, "prompt"),
    (b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
    (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "x", "n": 3}', 400, "n"),
    (b'{"prompt": ["a", "b", "c", "d"]}', 400, "prompt"),
    (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
    (b'{"prompt": ""}', 400, "prompt"),
    (b'{"prompt": "x", "model": "other"}', 404, "model"),
    (b"\xff\xfe", 400, None),
])
def test_bad_requests_become_openai_errors(body, status, param):
    with pytest.raises(ApiError) as e:
        build_job(parse_request(body), "t", GEN, context=100)
    assert e.value.status == status and e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_job_rows_choices_usage_and_stop():
    job = build_job(parse_request(json.dumps({"prompt": ["ab", "c"], "n": 2, "max_tokens": 6,
                                              "stop": "\n", "temperature": 0}).encode()), "t", GEN, 100)
    assert [c.index for c in job.choices] == [0, 1, 2, 3] and job.prompt_tokens == 3
    c = job.choices[0]
    for t in encode("hi\nthere"):
        c.row.out.append(t)
        c.feed(t)
    assert c.text == "hi" and c.finish_reason == "stop" and c.row.done


def test_streamed_deltas_hold_back_possible_stop_prefix_and_decode_utf8():
    job = build_job(parse_request(b'{"prompt": "a", "max_tokens": 10, "stop": "END"}'), "t", GEN, 100)
    c, seen = job.choices[0], []
    for t in encode("é xEN"):
        c.row.out.append(t)
        c.feed(t)
        seen.append(c.delta())
    assert "".join(seen) == "é x" and "\ufffd" not in "".join(seen)  # "EN" might begin "END"
    for t in encode("D"):
        c.row.out.append(t)
        c.feed(t)
    assert c.finish_reason == "stop" and c.text == "é x" and decode(encode(c.text)) == "é x"


def test_batch_plugin_models_without_cache():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(256, 256)

        def forward(self, idx):
            return self.emb(idx)

    b = Batch(Tiny().eval(), [Row(encode("ab"), 3, 0.0), Row(encode("xyz"), 2, 0.0)])
    while not b.all_done:
        b.step()
    assert [len(r.out) for r in b.rows] == [3, 2]


def test_serve_config_is_declarative_and_holds_no_key(tmp_path, monkeypatch, gpt):
    from raybig.serve.deploy import IMPORT_PATH, serve_config
    from raybig.train.export import write_export

    write_export(str(tmp_path / "run"), gpt.state_dict(), gpt.config.to_dict(), tied=GPT.tied_keys)
    monkeypatch.setenv("MY_KEY", "super-secret-key")
    spec = load_spec_text(f"kind: serve\nname: app\ncheckpoint: {tmp_path / 'run'}\napi_key_env: MY_KEY\n"
                          "autoscaling: {min_replicas: 0, max_replicas: 3}\nresources: {num_cpus: 0.5}\n")
    cfg = serve_config(spec)
    app = cfg["applications"][0]
    assert app["import_path"] == IMPORT_PATH and app["args"]["checkpoint"].endswith("/run/export")
    dep = app["deployments"][0]
    assert dep["autoscaling_config"]["max_replicas"] == 3 and dep["ray_actor_options"] == {"num_cpus": 0.5}
    assert dep["max_ongoing_requests"] >= app["args"]["max_num_seqs"]
    assert "super-secret-key" not in json.dumps(cfg) and len(app["args"]["api_key_sha256"]) == 64
    assert serve_config(spec) == cfg  # same spec, same config: redeploy is a no-op


def test_raybig_run_serve_user_errors_are_one_line(tmp_path, monkeypatch, gpt):
    from click.testing import CliRunner

    from raybig.cli import main
    from raybig.train.export import write_export

    spec = tmp_path / "serve.yaml"
    spec.write_text(f"kind: serve\nname: app\ncheckpoint: {tmp_path / 'nothing'}\n")
    res = CliRunner().invoke(main, ["run", str(spec)])
    assert res.exit_code == 1 and "holds no raybig export" in res.output and "Traceback" not in res.output
    write_export(str(tmp_path / "run"), gpt.state_dict(), gpt.config.to_dict(), tied=GPT.tied_keys)
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    spec.write_text(f"kind: serve\nname: app\ncheckpoint: {tmp_path / 'run'}\napi_key_env: NOT_SET_KEY\n")
    res = CliRunner().invoke(main, ["run", str(spec)])
    assert res.exit_code == 1 and "NOT_SET_KEY is not set" in res.output


def _with_vllm(monkeypatch):
    """Pretend vllm is importable (validation checks for the package; nothing here imports it)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "vllm" else real(n, *a))


def test_vllm_engine_config_is_ray_serve_llm_declarative(tmp_path, monkeypatch, gpt):
    from raybig.serve.deploy import VLLM_IMPORT_PATH, serve_config
    from raybig.train.export import write_export

    _with_vllm(monkeypatch)
    write_export(str(tmp_path / "run"), gpt.state_dict(), gpt.config.to_dict(), tied=GPT.tied_keys)
    spec = load_spec_text(f"kind: serve\nname: app\ncheckpoint: {tmp_path / 'run'}\nengine: vllm\n"
                          "resources: {num_gpus: 2}\nautoscaling: {min_replicas: 1, max_replicas: 4}\n"
                          "batching: {max_batch_size: 64}\n")
    app = serve_config(spec)["applications"][0]
    assert app["import_path"] == VLLM_IMPORT_PATH and "deployments" not in app
    (llm,) = app["args"]["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "app", "model_source": str(tmp_path / "run" / "export")}
    assert llm["engine_kwargs"]["tensor_parallel_size"] == 2 and llm["engine_kwargs"]["max_num_seqs"] == 64
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == 4
    # The export vLLM loads is a Hugging Face folder (raybig's GPT exports in GPT-2 layout).
    cfg = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"]


@pytest.mark.parametrize("extra,path,words", [
    ("", "resources.num_gpus", "whole GPUs"),
    ("resources: {num_gpus: 1}\nquantize: int8\n", "quantize", "vLLM"),
    ("resources: {num_gpus: 1}\napi_key_env: MY_KEY\n", "api_key_env", "no API key check"),
])
def test_vllm_engine_refuses_what_it_cannot_honour(extra, path, words, monkeypatch):
    _with_vllm(monkeypatch)
    with pytest.raises(SpecError) as e:
        load_spec_text(BASE + "engine: vllm\n" + extra)
    issue = e.value.issues[0]
    assert ".".join(map(str, issue.path)) == path and words in issue.message

"""Classifier serving: a digits classifier export answers `POST /v1/predict` over real HTTP on a real
Ray Serve, batched, with OpenAI-shaped 4xx errors; the LLM routes are 404 there and vice versa.

The export is what `task: classification` training writes: the model and config come from the
trainer's own builder (`raybig.train.classifiers.build_for_spec` on jobs/digits.yaml), fitted here
in-process for a few seconds, and written by the trainer's export writer (`write_export`), exactly
as `raybig.train.loop.export_final` does.
"""

from __future__ import annotations

import pathlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from raybig.serve.predict import ClassifierInfo, classifier_info, parse_predict
from raybig.serve.schema import ApiError
from raybig.spec import load_spec, load_spec_text

ROOT = pathlib.Path(__file__).resolve().parent.parent
INFO = ClassifierInfo((8, 8), 10, "mlp")


# --------------------------------------------------------------------------- request parsing (unit)


@pytest.mark.unit
def test_parse_predict_accepts_nested_and_flat_and_refuses_bad_inputs():
    ex = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    x = parse_predict(b'{"inputs": %s}' % str([ex.tolist()] * 2).encode(), INFO, "m")
    flat = parse_predict(b'{"inputs": %s}' % str([ex.ravel().tolist()]).encode(), INFO, "m")
    assert x.shape == (2, 8, 8) and x.dtype == np.float32 and np.array_equal(x[0], flat[0])
    bad = {b'{"inputs": []}': "non-empty", b'{"inputs": [[1, 2, 3]]}': "shape 3",
           b'{"inputs": [' + b",".join([b"[0]" * 1] * 2) + b"]}": "shape 1",
           b'{"inputs": [["a"]]}': "strings", b'{"inputs": [[true]]}': "booleans",
           b'{"inputs": [[NaN]]}': "parse", b'{"inputs": [[%s]]}' % ",".join(["1e39"] * 64).encode(): "finite",
           b'{"inputs": [[1], [1, 2]]}': "different shapes", b'{"inputs": [[null]]}': "null",
           b'{}': "Missing", b"[1]": "JSON object", b"{": "parse", b'{"inputs": 3}': "non-empty"}
    for raw, words in bad.items():
        with pytest.raises(ApiError, match=words) as e:
            parse_predict(raw, INFO, "m")
        assert e.value.status == 400, raw
    with pytest.raises(ApiError, match="at most 2") as e:
        parse_predict(b'{"inputs": %s}' % str([ex.ravel().tolist()] * 3).encode(), INFO, "m", max_inputs=2)
    with pytest.raises(ApiError, match="does not exist") as e:
        parse_predict(b'{"model": "other", "inputs": [[0]]}', INFO, "m")
    assert e.value.status == 404 and e.value.code == "model_not_found"


@pytest.mark.unit
def test_classifier_info_tells_classifier_exports_from_language_models():
    cfg = {"raybig": {"model": {"target": "raybig.train.classifiers:build_from_config",
                                "kwargs": {"arch": "cnn", "input_shape": [8, 8], "num_classes": 10}}}}
    assert classifier_info(cfg) == ClassifierInfo((8, 8), 10, "cnn")
    assert classifier_info({"raybig": {"model": {"n_layer": 2, "n_head": 2}}, "architectures": ["GPT2"]}) is None
    assert classifier_info({"architectures": ["GPT2LMHeadModel"]}) is None


# --------------------------------------------------------------------------- real Ray Serve, real HTTP


def _digits_export(run_dir: pathlib.Path):
    """Fit the trainer's digits model in-process (a few seconds) and write its export as training does."""
    import torch

    from raybig.train.classifiers import build_for_spec, split_for_spec
    from raybig.train.export import write_export

    spec = load_spec(str(ROOT / "jobs" / "digits.yaml"), [f"storage.path={run_dir.parent}"])
    torch.manual_seed(0)
    built = build_for_spec(spec)
    split = split_for_spec(spec)
    model = built.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    export = write_export(str(run_dir), model.state_dict(), built.config, precision="fp32", name=spec.name)
    return export, model, split


def _gpt_export(run_dir: pathlib.Path) -> str:
    """An untrained tiny raybig GPT, exported by the same writer (for the LLM app's side)."""
    import torch

    from raybig.model import GPT, GPTConfig
    from raybig.train.export import write_export

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=256, dropout=0.0, bias=False)
    return write_export(str(run_dir), GPT(cfg).state_dict(), cfg.to_dict(), tied=("lm_head.weight",))


@pytest.mark.ray
def test_classifier_export_serves_predictions_batched_with_4xx_errors(ray_local, tmp_path, one_torch_thread):
    import ray
    import torch
    from openai import NotFoundError, OpenAI
    from ray import serve

    from raybig.cluster.ray_env import free_port
    from raybig.serve.deploy import delete_app, deploy, wait_running

    export, model, split = _digits_export(tmp_path / "digits")
    gpt = _gpt_export(tmp_path / "gpt")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    url = ray_local.get("dashboard_url") or ray._private.worker.global_worker.node.address_info["webui_url"]
    dash = f"http://{url}"
    apps = {"t-digits": export, "t-lm": gpt}
    try:
        for name, ckpt in apps.items():
            deploy(load_spec_text(f"kind: serve\nname: {name}\ncheckpoint: {ckpt}\nroute_prefix: /{name}\n"
                                  "resources: {num_cpus: 0.25}\nmax_inputs: 100\n"
                                  "batching: {mode: static, max_num_seqs: 8, batch_wait_timeout_s: 0.2}\n"), dash)
        base = wait_running("t-digits", dash, timeout_s=180)["url"]
        lm = wait_running("t-lm", dash, timeout_s=180)["url"]

        models = requests.get(f"{base}/models", timeout=30).json()["data"][0]
        assert models["task"] == "classification" and models["input_shape"] == [8, 8] and models["num_classes"] == 10

        # Predictions equal the in-process model's (labels exactly, probabilities to float rounding).
        xv, yv = split.x_val[:40], split.y_val[:40]
        with torch.no_grad():
            want = torch.softmax(model(torch.from_numpy(xv)).double(), -1).numpy()
        r = requests.post(f"{base}/predict", json={"inputs": xv.tolist()}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "t-digits" and body["usage"] == {"inputs": 40} and len(body["data"]) == 40
        got = np.array([d["probabilities"] for d in body["data"]])
        assert [d["label"] for d in body["data"]] == want.argmax(1).tolist()
        assert np.allclose(got, want, atol=1e-5) and np.allclose(got.sum(1), 1.0)
        assert (got.argmax(1) == yv).mean() >= 0.9  # a trained digits classifier, over HTTP
        flat = requests.post(f"{base}/predict", json={"inputs": xv[:2].reshape(2, 64).tolist()}, timeout=60).json()
        assert [d["label"] for d in flat["data"]] == want[:2].argmax(1).tolist()

        # Concurrent requests are batched by @serve.batch, each answered with its own rows.
        def one(i: int) -> list[int]:
            rr = requests.post(f"{base}/predict", json={"inputs": split.x_val[i:i + 3].tolist()}, timeout=60)
            return [d["label"] for d in rr.json()["data"]]

        with ThreadPoolExecutor(8) as pool:
            labels = list(pool.map(one, range(0, 48, 3)))
        with torch.no_grad():
            ref = model(torch.from_numpy(split.x_val[:48])).argmax(1).tolist()
        assert [lab for ls in labels for lab in ls] == ref
        stats = requests.get(f"{base}/engine/stats", timeout=30).json()
        assert stats["max_batch_requests"] > 1 and stats["batches"] < stats["requests"], stats

        # Bad input: OpenAI-shaped 4xx, never 500.
        cases = [({"inputs": [[0.0] * 63]}, 400, "shape 63"), ({"inputs": [["x"] * 64]}, 400, "strings"),
                 ({"inputs": []}, 400, "non-empty"), ({"prompt": "hi"}, 400, "inputs"),
                 ({"inputs": [[0.0] * 64] * 101}, 400, "at most 100"),  # the spec's max_inputs
                 ({"model": "nope", "inputs": [[0.0] * 64]}, 404, "does not exist")]
        for payload, status, words in cases:
            rr = requests.post(f"{base}/predict", json=payload, timeout=60)
            assert rr.status_code == status and words in rr.json()["error"]["message"], (payload, rr.text)
        rr = requests.post(f"{base}/predict", data=b'{"inputs": [[NaN]]}', timeout=60,
                           headers={"content-type": "application/json"})
        assert rr.status_code == 400 and rr.json()["error"]["param"] is None
        rr = requests.post(f"{base}/predict", data=b"inputs=1", timeout=60, headers={"content-type": "text/plain"})
        assert rr.status_code == 415

        # The routes of the other kind of model: 404 naming the right route, on both apps.
        with pytest.raises(NotFoundError, match="classifier"):
            OpenAI(base_url=base, api_key="x", max_retries=0).completions.create(model="t-digits", prompt="a")
        rr = requests.post(f"{lm}/predict", json={"inputs": [[0.0] * 64]}, timeout=60)
        assert rr.status_code == 404 and rr.json()["error"]["code"] == "unsupported_route"
        assert "/v1/completions" in rr.json()["error"]["message"]
        ok = OpenAI(base_url=lm, api_key="x", max_retries=0).completions.create(model="t-lm", prompt="a",
                                                                                  max_tokens=2)
        assert ok.usage.completion_tokens == 2
    finally:
        for name in apps:
            delete_app(name, dash)

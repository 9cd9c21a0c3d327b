"""Serving on a real local Ray Serve over real HTTP, from a checkpoint trained by a tiny raybig run.

One session-scoped training run feeds every test; each test deploys its own app (own route prefix)
through the same declarative path `raybig submit` uses, on one Serve proxy on a free port.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from raybig.spec import load_spec_text

pytestmark = pytest.mark.ray

KEY_ENV = "RAYBIG_TEST_SERVE_KEY"
KEY = "test-key-0123456789abcdef"
PROMPT = "    def __init__(self, "

TRAIN = """
kind: train
name: serve-ckpt
model: {{preset: gpt-debug}}
data: {{path: "stdlib://", seq_len: 64, max_tokens: 200000}}
train: {{steps: 200, micro_batch_size: 16, lr: 2.0e-3, warmup_steps: 10, eval_every: 200, eval_batches: 2,
         log_every: 50}}
deepspeed: {{zero_stage: 0}}
resources: {{workers: 1, cpus_per_worker: 1}}
storage: {{path: {storage}}}
checkpoint: {{every: 200, keep: 1}}
sample: {{max_new_tokens: 0}}
"""


@pytest.fixture(scope="module")
def ckpt(ray_local, tmp_path_factory) -> str:
    from raybig.train.runner import run_train

    spec = load_spec_text(TRAIN.format(storage=tmp_path_factory.mktemp("serve_runs")))
    return run_train(spec).run_dir


@pytest.fixture(scope="module")
def dash(ray_local) -> str:
    """Serve's proxy on a free port; yields the dashboard address; removes this module's apps."""
    import ray
    from ray import serve

    from raybig.cluster.ray_env import free_port
    from raybig.serve.deploy import delete_app, status

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    url = ray_local.get("dashboard_url") or ray._private.worker.global_worker.node.address_info["webui_url"]
    address = f"http://{url}"
    yield address
    for name in status(address)["applications"]:
        if name.startswith("t-"):
            delete_app(name, address)


def deploy(name: str, ckpt: str, dash: str, extra: str = "") -> str:
    """Deploy a serve spec; returns its OpenAI base URL (…/v1)."""
    from raybig.serve.deploy import deploy as deploy_spec
    from raybig.serve.deploy import wait_running

    spec = load_spec_text(f"kind: serve\nname: {name}\ncheckpoint: {ckpt}\nroute_prefix: /{name}\n"
                          f"resources: {{num_cpus: 0.25}}\n{extra}")
    deploy_spec(spec, dash)
    return wait_running(name, dash, timeout_s=180)["url"]


@pytest.fixture(scope="module")
def main_app(ckpt, dash) -> str:
    os.environ[KEY_ENV] = KEY
    return deploy("t-main", ckpt, dash, f"api_key_env: {KEY_ENV}\n"
                  "generation: {max_tokens: 16, max_new_tokens: 48, max_prompt_tokens: 64}\n")


def in_process_greedy(ckpt: str, prompt: str, n: int, int8: bool = False) -> str:
    from raybig.serve.engine import quantize_int8
    from raybig.tokenizer import decode, encode
    from raybig.train.export import load_model

    model, _ = load_model(ckpt)
    model = quantize_int8(model) if int8 else model
    ids = torch.tensor([encode(prompt)])
    return decode(model.generate(ids, n, temperature=0)[0, ids.size(1):].tolist())


def test_openai_client_completion_stream_and_models(main_app):
    from openai import OpenAI

    client = OpenAI(base_url=main_app, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["t-main"]
    r = client.completions.create(model="t-main", prompt=PROMPT, max_tokens=24, temperature=0)
    text = r.choices[0].text
    assert isinstance(text, str) and len(text.encode()) <= 24 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(PROMPT) and r.usage.completion_tokens == 24
    chunks = list(client.completions.create(model="t-main", prompt=PROMPT, max_tokens=24, temperature=0,
                                            stream=True))
    assert len(chunks) > 1 and "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length"
    # n and a list of prompts, seeded sampling
    r2 = client.completions.create(model="t-main", prompt=["def ", "class "], n=2, max_tokens=8,
                                   temperature=1.0, seed=3)
    assert sorted(c.index for c in r2.choices) == [0, 1, 2, 3] and r2.usage.completion_tokens <= 32


def test_greedy_is_deterministic_and_matches_in_process(main_app, ckpt):
    from openai import OpenAI

    client = OpenAI(base_url=main_app, api_key=KEY, max_retries=0)
    texts = {client.completions.create(model="t-main", prompt=PROMPT, max_tokens=32, temperature=0)
             .choices[0].text for _ in range(3)}
    assert texts == {in_process_greedy(ckpt, PROMPT, 32)}, texts


def test_tiny_temperature_beside_greedy_requests_answers_200_and_leaves_them_unchanged(main_app, ckpt):
    """Issue 21: temperature 1e-39 overflowed logits / T in float32; the request and every greedy
    request batched with it got a 500."""
    auth = {"Authorization": f"Bearer {KEY}"}
    tiny = {"prompt": PROMPT, "max_tokens": 2, "temperature": 1e-39}
    greedy = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    bodies = [tiny, greedy] * 3  # sent together, so they share batches

    def post(body):
        return requests.post(f"{main_app}/completions", json=body, headers=auth, timeout=60)

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(post, bodies))
    want = in_process_greedy(ckpt, PROMPT, 16)
    for body, r in zip(bodies, answers, strict=True):
        if body is tiny:  # below raybig.model.GREEDY_BELOW: sampled as argmax, so a prefix of `want`
            assert r.status_code == 200 and want.startswith(r.json()["choices"][0]["text"]), (r.text, want)
        else:
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == want, (r.text, want)


def test_greedy_output_is_identical_alone_and_among_requests_joining_and_leaving(main_app, ckpt):
    """Continuous batching: other requests (streamed or not, of many lengths) join and leave while
    greedy PROMPT requests run; each still gets exactly the in-process greedy text."""
    auth = {"Authorization": f"Bearer {KEY}"}
    want = in_process_greedy(ckpt, PROMPT, 32)

    def greedy(delay: float) -> str:
        time.sleep(delay)
        r = requests.post(f"{main_app}/completions", headers=auth, timeout=60,
                          json={"prompt": PROMPT, "max_tokens": 32, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def other(i: int) -> int:
        time.sleep(0.02 * i)
        body = {"prompt": "x" * (1 + 5 * i), "max_tokens": 4 + 7 * i, "temperature": 0.8, "stream": i % 2 == 0}
        r = requests.post(f"{main_app}/completions", headers=auth, json=body, timeout=60)
        return r.status_code

    with ThreadPoolExecutor(10) as pool:
        others = [pool.submit(other, i) for i in range(6)]
        mine = [pool.submit(greedy, d) for d in (0.0, 0.05, 0.15, 0.3)]
        assert [f.result() for f in mine] == [want] * 4
        assert [f.result() for f in others] == [200] * 6
    stats = requests.get(f"{main_app}/engine/stats", headers=auth, timeout=30).json()
    assert stats["active"] == 0 and stats["waiting"] == 0


def test_logprobs_and_echo_match_teacher_forced_forward_and_chat_needs_a_template(main_app, ckpt):
    from openai import BadRequestError, OpenAI

    from raybig.tokenizer import encode
    from raybig.train.export import load_model

    client = OpenAI(base_url=main_app, api_key=KEY, max_retries=0)
    r = client.completions.create(model="t-main", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                  echo=True)
    lp = r.choices[0].logprobs
    ids = [ord(t) if len(t) == 1 else int(t[len("bytes:\\x"):], 16) for t in lp.tokens]  # byte tokens
    assert r.choices[0].text.startswith(PROMPT) and len(ids) == len(PROMPT) + 5 and ids[:len(PROMPT)] == encode(PROMPT)
    model, _ = load_model(ckpt)
    with torch.inference_mode():
        want = torch.log_softmax(model(torch.tensor([ids])).float(), -1)[0]
    assert lp.token_logprobs[0] is None
    assert max(abs(lp.token_logprobs[i] - float(want[i - 1, ids[i]])) for i in range(1, len(ids))) < 1e-4
    # max_tokens 0 with echo: the prompt's logprobs only (how harnesses score log-likelihoods)
    s = client.completions.create(model="t-main", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    assert s.choices[0].text == PROMPT and s.usage.completion_tokens == 0
    assert s.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(PROMPT)], abs=1e-4)
    for kwargs, param in (({"logprobs": 6}, "logprobs"), ({"max_tokens": 0}, "max_tokens")):
        with pytest.raises(BadRequestError) as e:
            client.completions.create(model="t-main", prompt=PROMPT, **kwargs)
        assert e.value.body["param"] == param
    for stream in (False, True):
        with pytest.raises(BadRequestError) as e:
            client.chat.completions.create(model="t-main", messages=[{"role": "user", "content": "hi"}],
                                           stream=stream)
        assert "model has no chat template" in str(e.value)
    auth = {"Authorization": f"Bearer {KEY}"}
    for msgs in ([{"role": "wizard", "content": "x"}], [{"content": "x"}], "x", []):
        r2 = requests.post(f"{main_app}/chat/completions", json={"messages": msgs}, headers=auth, timeout=30)
        assert r2.status_code == 400 and r2.json()["error"]["param"] == "messages", r2.text


def test_twenty_streams_closed_early_leave_no_row_generating(ckpt, dash):
    """Cancellation under load: every stream is closed after its first event; the engine's rows
    (running and waiting) drain at once, generation stops, and memory returns to the baseline."""
    url = deploy("t-cancel", ckpt, dash, "batching: {max_num_seqs: 4, max_ongoing_requests: 32}\n"
                 "generation: {max_tokens: 120, max_new_tokens: 120, max_prompt_tokens: 8}\n")
    base = requests.get(f"{url}/engine/stats", timeout=30).json()

    def stream(i: int) -> bool:
        with requests.post(f"{url}/completions", json={"prompt": "def ", "max_tokens": 120, "stream": True},
                           stream=True, timeout=60) as r:
            assert r.status_code == 200
            return next(r.iter_lines()).startswith(b"data: ")  # then closed: the client goes away

    with ThreadPoolExecutor(20) as pool:
        assert all(pool.map(stream, range(20)))
    deadline, st = time.monotonic() + 10, {}
    while time.monotonic() < deadline:
        st = requests.get(f"{url}/engine/stats", timeout=30).json()
        if st["active"] == 0 and st["waiting"] == 0:
            break
        time.sleep(0.05)
    assert st["active"] == 0 and st["waiting"] == 0, st
    time.sleep(0.5)
    later = requests.get(f"{url}/engine/stats", timeout=30).json()
    assert later["generated_tokens"] == st["generated_tokens"] and later["steps"] == st["steps"]  # nothing runs
    assert st["cancelled_rows"] - base["cancelled_rows"] >= 10, st  # most were cut mid-generation
    assert st["generated_tokens"] - base["generated_tokens"] < 20 * 120 // 2, st
    assert later["rss_bytes"] - base["rss_bytes"] < 64 * 2**20, (base, later)


BAD = [  # (body, headers, status, param)
    (b'{"prompt": "x"', {}, 400, None),
    (b'"just a string"', {}, 400, None),
    (b'{"prompt": 12}', {}, 400, "prompt"),
    (b'{"prompt": "x", "max_tokens": "8"}', {}, 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 49}', {}, 400, "max_tokens"),
    (json.dumps({"prompt": "y" * 65}).encode(), {}, 400, "prompt"),
    (b'{"prompt": "x", "temperature": 3}', {}, 400, "temperature"),
    (b'{"prompt": "x", "n": 0}', {}, 400, "n"),
    (b'{"prompt": ["a", 1]}', {}, 400, "prompt"),
    (b'{"prompt": "x", "stream": 1}', {}, 400, "stream"),
    (b'{"prompt": "x", "model": "gpt-4"}', {}, 404, "model"),
    (b'{"prompt": "x"}', {"Authorization": "Bearer wrong"}, 401, None),
    (b'{"prompt": "x"}', {"Authorization": ""}, 401, None),
]


def test_bad_requests_get_openai_errors_and_server_keeps_serving(main_app):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, headers, status, param in BAD:
        r = requests.post(f"{main_app}/completions", data=body, headers={**auth, **headers}, timeout=60)
        assert r.status_code == status, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["param"] == param, (body, err)
    assert requests.get(f"{main_app}/models", timeout=30).status_code == 401
    ok = requests.post(f"{main_app}/completions", json={"prompt": "x", "max_tokens": 4}, headers=auth, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_overload_gets_503_never_500(ckpt, dash):
    url = deploy("t-busy", ckpt, dash, "batching: {enabled: false, max_ongoing_requests: 1, "
                 "max_queued_requests: 1}\ngeneration: {max_tokens: 48, max_new_tokens: 48}\n")

    def call(_):
        return requests.post(f"{url}/completions", json={"prompt": "def ", "max_tokens": 48}, timeout=120).status_code

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(call, range(12)))
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    assert call(0) == 200


def test_int8_serves_and_stays_close_to_fp32(ckpt, dash):
    from raybig.serve.engine import quantize_int8
    from raybig.tokenizer import encode
    from raybig.train.export import load_model

    url = deploy("t-int8", ckpt, dash, "quantize: int8\n")
    r = requests.post(f"{url}/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0},
                      timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == in_process_greedy(ckpt, PROMPT, 24, True)
    # Closeness measure: next-token predictions teacher-forced over a fixed text, fp32 vs int8.
    model, _ = load_model(ckpt)
    idx = torch.tensor([encode("import os\nimport sys\n\ndef main(argv):\n    return len(argv)\n")])
    with torch.inference_mode():
        lp = torch.log_softmax(model(idx), -1)[0]
        lq = torch.log_softmax(quantize_int8(model)(idx), -1)[0]
    agree = (lp.argmax(-1) == lq.argmax(-1)).float().mean().item()
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    assert agree >= 0.9 and kl < 0.05, (agree, kl)


def _status(dash: str) -> dict:
    from click.testing import CliRunner

    from raybig.cli import main

    res = CliRunner().invoke(main, ["serve", "status", "--address", dash, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)["applications"]


@pytest.mark.slow
def test_autoscales_to_max_and_back_seen_by_serve_status(ckpt, dash):
    url = deploy("t-auto", ckpt, dash,
                 "autoscaling: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 1, upscale_delay_s: 1,"
                 " downscale_delay_s: 3, look_back_period_s: 2}\n"
                 "batching: {max_batch_size: 2, max_ongoing_requests: 2}\n")
    stop = threading.Event()

    def client():
        while not stop.is_set():
            requests.post(f"{url}/completions", json={"prompt": "def ", "max_tokens": 32}, timeout=120)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    peak, deadline = 0, time.monotonic() + 120
    try:
        while time.monotonic() < deadline and peak < 3:
            dep = _status(dash)["t-auto"]["deployments"]["Completions"]
            peak = max(peak, dep["running"])
            time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    assert peak == 3 and dep["max_replicas"] == 3
    deadline, running = time.monotonic() + 120, peak
    while time.monotonic() < deadline and running > 1:
        time.sleep(1)
        running = _status(dash)["t-auto"]["deployments"]["Completions"]["running"]
    assert running == 1


def test_redeploy_is_idempotent_new_checkpoint_rolls_over_and_serve_down_removes(ckpt, dash, tmp_path):
    import shutil

    from click.testing import CliRunner

    from raybig.cli import main

    url = deploy("t-redo", ckpt, dash)
    before = _replica_ids(dash, "t-redo")
    assert deploy("t-redo", ckpt, dash) == url
    time.sleep(2)
    assert _replica_ids(dash, "t-redo") == before  # same config: nothing restarted
    # A new checkpoint (a copy elsewhere) changes the app's args: Serve rolls the replica over
    # while requests keep being answered.
    shutil.copytree(os.path.join(ckpt, "export"), tmp_path / "export")
    codes: list[int] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            codes.append(requests.post(f"{url}/completions", json={"prompt": "a", "max_tokens": 4},
                                       timeout=120).status_code)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        deploy("t-redo", str(tmp_path / "export"), dash)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (_replica_ids(dash, "t-redo") & before or len(codes) < 3):
            time.sleep(0.5)
        n = len(codes)
        while len(codes) < n + 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        t.join(timeout=120)
    assert not (_replica_ids(dash, "t-redo") & before) and len(codes) >= 3 and set(codes) == {200}, codes
    res = CliRunner().invoke(main, ["serve", "down", "t-redo", "--address", dash])
    assert res.exit_code == 0 and "removed t-redo" in res.output
    deadline = time.monotonic() + 60
    while "t-redo" in _status(dash) and time.monotonic() < deadline:
        time.sleep(1)
    assert "t-redo" not in _status(dash)
    res = CliRunner().invoke(main, ["serve", "down", "nope", "--address", dash])
    assert res.exit_code == 1 and "no Serve application named 'nope'" in res.output


def _replica_ids(dash: str, app: str) -> set[str]:
    from raybig.serve.deploy import _client

    d = _client(dash).get_serve_details()["applications"][app]["deployments"]["Completions"]
    return {r["replica_id"] for r in d["replicas"]}


def test_hf_llama_export_serves_completions_and_chat_with_its_tokenizer(dash, tmp_path_factory):
    """Any save_pretrained causal LM (here a tiny Llama with a chat template) serves through the
    same engine with its own tokenizer and EOS; chat is rendered by its template."""
    import subprocess
    import sys

    from openai import OpenAI

    from raybig.serve.engine import load_hf

    folder = str(tmp_path_factory.mktemp("hf") / "llama")
    subprocess.run([sys.executable, "scripts/make_tiny_hf.py", folder, "--arch", "llama"], check=True,
                   capture_output=True)
    url = deploy("t-hf", folder, dash, "generation: {max_tokens: 12, max_new_tokens: 32, max_prompt_tokens: 64}\n")
    client = OpenAI(base_url=url, api_key="unused", max_retries=0)
    model, tok = load_hf(folder)
    ids = torch.tensor([tok.encode("def main():")])
    with torch.inference_mode():
        want = model.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.size(1):].tolist()
    r = client.completions.create(model="t-hf", prompt="def main():", max_tokens=12, temperature=0)
    assert r.choices[0].text == tok.decode([t for t in want if t not in tok.eos][:r.usage.completion_tokens])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="t-hf", prompt="def main():", max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    chat = client.chat.completions.create(model="t-hf", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.prompt_tokens > 3
    parts = list(client.chat.completions.create(model="t-hf", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content

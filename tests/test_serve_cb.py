"""Continuous batching without Serve: the slot KV cache, the engine's scheduling, cancellation,
logprobs/echo and chat request checks (issue 16, items 2-4)."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from raybig.model import GPT, GPTConfig, KVCache, SlotKVCache
from raybig.serve.engine import AsyncEngine, Engine, Row
from raybig.serve.schema import (
    ApiError,
    ChatRequest,
    build_job,
    feed_job,
    parse_chat,
    parse_request,
    render_chat,
)
from raybig.spec.serve import GenerationSpec
from raybig.tokenizer import encode

pytestmark = pytest.mark.unit

GEN = GenerationSpec(max_tokens=8, max_new_tokens=40, max_prompt_tokens=60, max_n=2, max_prompts=3)
PROMPTS = ["def foo", "import os\n", "x", "class A(object):\n    ", "while True:", "return"]


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)).eval()


def ref(gpt: GPT, prompt: list[int], n: int) -> list[int]:
    return gpt.generate(torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()


def test_slot_cache_forward_is_bitwise_the_kv_cache_forward(gpt):
    idx = torch.tensor([encode("hello world")])
    T = idx.size(1)
    slots = SlotKVCache.for_model(gpt, 3, 64)
    kv = KVCache()
    with torch.inference_mode():
        slots.select([1])
        a = gpt(idx, positions=torch.arange(T).view(1, T), cache=slots)
        assert torch.equal(a, gpt(idx, cache=kv))
        slots.select([1])
        b = gpt(idx[:, -1:], positions=torch.tensor([[T]]), cache=slots)
        assert torch.equal(b, gpt(idx[:, -1:], cache=kv))
    assert slots.k.shape == (2, 3, 2, 64, 32)  # (layers, slots, heads, max_len, head size)
    with pytest.raises(ValueError, match="positions"):
        slots.select([0])
        gpt(idx, cache=slots)


def test_lone_request_matches_generate_and_is_unchanged_among_joining_and_leaving_rows(gpt):
    ids = [encode(p) for p in PROMPTS]
    lens = [30, 5, 17, 30, 9, 22]
    want = [ref(gpt, p, n) for p, n in zip(ids, lens, strict=True)]
    alone = Engine(gpt, max_num_seqs=4, max_len=128)
    row = Row(ids[3], 30, 0.0)
    alone.add([row], lambda t: None)
    while alone.has_work:
        alone.step()
    assert row.out == want[3]  # bit-exact path
    # Mixed: rows join every 3 steps, finish at different lengths, 4 slots for 6 rows, prompts
    # prefilled in chunks of 8 tokens between decode steps.
    e = Engine(gpt, max_num_seqs=4, max_len=128, max_prefill_tokens=8)
    rows = [Row(p, n, 0.0) for p, n in zip(ids, lens, strict=True)]
    peak = 0
    for r in rows:
        e.add([r], lambda t: None)
        for _ in range(3):
            e.step()
            peak = max(peak, len(e.running))
    while e.has_work:
        e.step()
    assert [r.out for r in rows] == want and peak == 4
    assert e.stats()["active"] == 0 and e.stats()["free_slots"] == 4


def test_cancel_frees_the_slot_before_the_next_step(gpt):
    e = Engine(gpt, max_num_seqs=2, max_len=128)
    got: list[dict] = []
    a = e.add([Row(encode("abc"), 40, 0.0)], got.append)
    b = e.add([Row(encode("xyz"), 40, 0.0)], lambda t: None)
    c = e.add([Row(encode("waiting"), 3, 0.0)], lambda t: None)
    for _ in range(3):
        e.step()
    assert len(e.running) == 2 and len(e.waiting) == 1
    n = len(got)
    assert e.cancel(a) == 1
    e.step()  # a left, c joined
    assert len(got) == n and a.seqs[0] not in e.running and c.seqs[0] in e.running
    assert e.cancel(b) == 1 and e.stats()["cancelled_rows"] == 2
    while e.has_work:
        e.step()
    assert len(c.rows[0].out) == 3 and e.stats()["free_slots"] == 2


def test_async_engine_delivers_per_request_and_cancels(gpt):
    async def main():
        eng = AsyncEngine(Engine(gpt, max_num_seqs=4, max_len=128))
        q: asyncio.Queue = asyncio.Queue()
        r1 = Row(encode("def "), 12, 0.0)
        eng.submit([r1], q.put_nowait)
        r2 = Row(encode("import "), 1000, 0.0)
        h2 = eng.submit([r2], lambda t: None)
        toks = []
        while len(toks) < 12:
            toks += [t for t in (await q.get()).values()]
        eng.cancel(h2)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not eng.engine.has_work:
                break
        return toks, r1, r2, eng.engine

    toks, r1, r2, e = asyncio.run(main())
    assert toks == r1.out == ref(gpt, encode("def "), 12)
    assert not e.has_work and len(r2.out) < 100  # stopped long before 1000


def test_logprobs_and_echo_agree_with_a_teacher_forced_forward(gpt):
    body = {"prompt": "def main():", "max_tokens": 6, "temperature": 0, "logprobs": 3, "echo": True}
    job = build_job(parse_request(json.dumps(body).encode()), "t", GEN, 128)
    e = Engine(gpt, max_num_seqs=2, max_len=128, max_prefill_tokens=4)  # chunked prefill too
    e.add(job.rows, lambda toks: feed_job(job, toks))
    while e.has_work:
        e.step()
    res = job.response()["choices"][0]
    lp = res["logprobs"]
    row = job.rows[0]
    full = row.prompt + row.out
    with torch.inference_mode():
        want = torch.log_softmax(gpt(torch.tensor([full])).float(), -1)[0]  # (T, V)
    assert res["text"].startswith("def main():") and len(lp["tokens"]) == len(full)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i in range(1, len(full)):
        assert abs(lp["token_logprobs"][i] - float(want[i - 1, full[i]])) < 1e-4, i
        top = want[i - 1].topk(3)
        assert len(lp["top_logprobs"][i]) == 3
        assert abs(max(lp["top_logprobs"][i].values()) - float(top.values[0])) < 1e-4
    assert lp["text_offset"][:3] == [0, 1, 2] and lp["tokens"][:3] == ["d", "e", "f"]


def test_max_tokens_zero_with_echo_scores_the_prompt_only(gpt):
    job = build_job(parse_request(b'{"prompt": "abcabc", "max_tokens": 0, "echo": true, "logprobs": 1}'),
                    "t", GEN, 128)
    e = Engine(gpt, max_num_seqs=2, max_len=128)
    e.add(job.rows, lambda toks: feed_job(job, toks))
    for _ in range(5):
        e.step()
    assert job.done and job.closed and not e.has_work
    res = job.response()
    assert res["choices"][0]["text"] == "abcabc" and res["choices"][0]["finish_reason"] == "length"
    assert len(res["choices"][0]["logprobs"]["tokens"]) == 6 and res["usage"]["completion_tokens"] == 0


def test_token_id_prompts_as_lm_eval_sends_them():
    job = build_job(parse_request(json.dumps({"prompt": [[104, 105], [106]], "max_tokens": 1}).encode()),
                    "t", GEN, 128)
    assert [r.prompt for r in job.rows] == [[104, 105], [106]]
    with pytest.raises(ApiError) as e:
        build_job(parse_request(b'{"prompt": [1, 300]}'), "t", GEN, 128)
    assert e.value.param == "prompt"


@pytest.mark.parametrize("body,param,words", [
    (b'{"prompt": "x", "logprobs": 6}', "logprobs", "between 0 and 5"),
    (b'{"prompt": "x", "logprobs": -1}', "logprobs", "between"),
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens", "at least 1"),
    (b'{"prompt": "x", "echo": true, "stream": true, "logprobs": 1}', "echo", "stream"),
    (b'{"prompt": []}', "prompt", "empty"),
])
def test_bad_logprobs_echo_and_prompts_are_400(body, param, words):
    with pytest.raises(ApiError) as e:
        build_job(parse_request(body), "t", GEN, 128)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


@pytest.mark.parametrize("body,words", [
    (b'{"messages": []}', "empty"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "role"),
    (b'{"messages": [{"content": "hi"}]}', "role"),
    (b'{"messages": "hi"}', "messages"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "text"),
    (b'{"messages": [{"role": "user", "content": 5}]}', "messages"),
])
def test_malformed_chat_messages_are_400(body, words):
    with pytest.raises(ApiError) as e:
        parse_chat(body)
    assert e.value.status == 400 and e.value.param == "messages" and words in e.value.message


def test_chat_without_a_template_is_400_and_with_one_renders():
    req = parse_chat(b'{"messages": [{"role": "user", "content": "hi"}]}')
    with pytest.raises(ApiError) as e:
        render_chat(req, None)
    assert e.value.status == 400 and e.value.message == "model has no chat template"

    class Templated:
        chat_template = "x"

        def apply_chat_template(self, msgs, tokenize, add_generation_prompt):
            return "".join(f"<{m['role']}>{m['content']}" for m in msgs) + "<assistant>"

    assert render_chat(req, Templated()) == "<user>hi<assistant>"
    assert isinstance(req, ChatRequest)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    import subprocess
    import sys

    out = str(tmp_path_factory.mktemp("hf") / "llama")
    subprocess.run([sys.executable, "scripts/make_tiny_hf.py", out, "--arch", "llama"], check=True,
                   capture_output=True)
    return out


def test_hf_export_through_the_engine_matches_transformers_generate_and_renders_chat(tiny_llama):
    from raybig.serve.engine import load_hf
    from raybig.serve.schema import build_chat_job

    model, tok = load_hf(tiny_llama)
    assert model.block_size and tok.eos and tok.chat_template
    body = {"prompt": "def main():", "max_tokens": 16, "temperature": 0}
    job = build_job(parse_request(json.dumps(body).encode()), "t", GEN, model.block_size, tok)
    other = build_job(parse_request(b'{"prompt": ["import os", "class"], "max_tokens": 9, "temperature": 0}'),
                      "t", GEN, model.block_size, tok)
    e = Engine(model, max_num_seqs=4, max_len=100)
    e.add(job.rows, lambda t: feed_job(job, t))
    e.step()
    e.add(other.rows, lambda t: feed_job(other, t))  # joins mid-generation
    while e.has_work:
        e.step()
    ids = torch.tensor([tok.encode("def main():")])
    with torch.inference_mode():
        want = model.model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.size(1):].tolist()
    n = len(job.rows[0].out)
    assert job.rows[0].out == want[:n] and (n == 16 or want[n] in tok.eos)
    assert job.response()["choices"][0]["text"] == tok.decode(job.rows[0].out)
    req = parse_chat(b'{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}')
    prompt = render_chat(req, tok)
    assert prompt.endswith("<|assistant|>\n") and "be brief" in prompt
    chat = build_chat_job(req, prompt, "t", GEN, model.block_size, tok)
    assert chat.rows[0].prompt == tok.encode(prompt, special=False)  # the template's BOS, not a second


@pytest.fixture
def replica(tmp_path, monkeypatch, gpt):
    """The Serve replica class run in-process (no Ray): its ASGI app and the instance."""
    import types

    import ray.serve

    from raybig.serve.app import Completions
    from raybig.serve.http import AppArgs
    from raybig.train.export import write_export

    write_export(str(tmp_path / "run"), gpt.state_dict(), gpt.config.to_dict(), tied=GPT.tied_keys)
    args = AppArgs(checkpoint=str(tmp_path / "run" / "export"), model_name="t", max_num_seqs=4,
                   generation={"max_tokens": 16, "max_new_tokens": 100, "max_prompt_tokens": 20}).model_dump()
    cls = Completions.func_or_class
    inst = cls.__new__(cls)
    asyncio.run(inst.__init__(args))  # Serve's ingress wrapper has an async __init__
    monkeypatch.setattr(ray.serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=inst))
    return inst


async def _post_then_leave(app, body: dict) -> int:
    """POST over raw ASGI; the client disconnects as soon as the first body bytes arrive."""
    raw, first, sent = json.dumps(body).encode(), asyncio.Event(), []

    async def receive():
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": raw, "more_body": False}
        await first.wait()
        return {"type": "http.disconnect"}

    events = []

    async def send(msg):
        if msg["type"] == "http.response.body" and msg.get("body"):
            events.append(msg["body"])
            first.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "server": ("x", 80), "client": ("y", 1)}
    await app(scope, receive, send)
    return len(events)


def test_replica_drops_the_rows_of_twenty_streams_whose_clients_left(replica):
    async def main():
        app = replica._asgi_app
        events = await asyncio.gather(*[_post_then_leave(app, {"prompt": "ab", "max_tokens": 100, "stream": True})
                                        for _ in range(20)])
        # non-streamed requests whose handler Serve cancels (client gone)
        tasks = [asyncio.create_task(_post_then_leave(app, {"prompt": "cd", "max_tokens": 100}))
                 for _ in range(4)]
        await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        for _ in range(100):
            await asyncio.sleep(0.02)
            st = replica.engine.engine.stats()
            if st["active"] == st["waiting"] == 0:
                break
        return events, st

    events, st = asyncio.run(main())
    assert all(n >= 1 for n in events)
    assert st["active"] == 0 and st["waiting"] == 0 and st["free_slots"] == 4, st
    assert st["cancelled_rows"] == 24 and st["generated_tokens"] < 24 * 100 // 4, st

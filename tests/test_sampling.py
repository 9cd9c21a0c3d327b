"""Sampling numerics and batch isolation, without Serve (issue 21, item 1).

Every request the API accepts must yield a valid distribution in every dtype the engine runs, or be
refused with a 400 naming the field; and one request must never change or break a batch-mate. The
property test drives the replica's own path (`parse_request` -> `build_job` -> `Batch.step` ->
`feed_jobs`) over tiny, huge and boundary values of temperature, top_p, seed, n and max_tokens.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raybig.model import GPT, GREEDY_BELOW, GPTConfig, sample_next
from raybig.serve.engine import Batch, Row, quantize_int8
from raybig.serve.schema import ApiError, Job, build_job, feed_jobs, parse_request
from raybig.spec.serve import GenerationSpec

pytestmark = pytest.mark.unit

CONTEXT = 24
GEN = GenerationSpec(max_tokens=4, max_new_tokens=6, max_prompt_tokens=12, max_n=3, max_prompts=2)
MATE = {"prompt": "def f(x):", "max_tokens": 6, "temperature": 0}  # the greedy batch-mate
PROMPTS = ["x", "import os", ["a", "class A:"]]
FIELDS = {"temperature", "top_p", "seed", "n", "max_tokens"}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    fp32 = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=CONTEXT)).eval()
    bf16 = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=CONTEXT)).eval()
    bf16.load_state_dict(fp32.state_dict())
    return {"fp32": fp32, "bf16": bf16.to(torch.bfloat16), "int8": quantize_int8(fp32)}


def run(model: torch.nn.Module, bodies: list[dict]) -> list[Job]:
    """What the replica's batch handler does for requests that arrived together."""
    jobs = [build_job(parse_request(json.dumps(b).encode()), "t", GEN, CONTEXT) for b in bodies]
    batch = Batch(model, [r for j in jobs for r in j.rows])
    while not all(j.done for j in jobs):
        feed_jobs(jobs, batch.step())
    return jobs


def valid(field: str, v: object) -> bool:
    """The documented accepted range of each sampling field (None: the server's default)."""
    if v is None:
        return True
    if field == "temperature":
        return 0.0 <= v <= 2.0  # NaN fails both
    if field == "top_p":
        return 0.0 < v <= 1.0
    if field == "seed":
        return 0 <= v <= 2**63 - 1
    if field == "n":
        return 1 <= v <= GEN.max_n
    return 1 <= v <= GEN.max_new_tokens  # max_tokens; every prompt here leaves room in the context


def _floats(edges: list[float], lo: float, hi: float) -> st.SearchStrategy:
    return st.one_of(st.none(), st.sampled_from(edges), st.floats(lo, hi), st.floats(allow_nan=True))


TEMPS = [0.0, -0.0, 5e-324, 1e-45, 1e-39, 1e-38, 1e-20, math.nextafter(GREEDY_BELOW, 0), GREEDY_BELOW,
         1e-4, 0.7, 1.0, 2.0, math.nextafter(2.0, 3), -1e-300, math.inf, math.nan]
TOP_PS = [0.0, 5e-324, 1e-300, 1e-8, 0.5, math.nextafter(1.0, 0), 1.0, math.nextafter(1.0, 2), -0.5,
          math.nan]
SEEDS = [0, 1, 2**31 - 1, 2**32, 2**63 - 1, 2**63, 2**64, -1]
REQUEST = st.fixed_dictionaries({
    "prompt": st.sampled_from(PROMPTS),
    "temperature": _floats(TEMPS, 0.0, 2.0),
    "top_p": _floats(TOP_PS, 0.0, 1.0),
    "seed": st.one_of(st.none(), st.sampled_from(SEEDS), st.integers(0, 2**63 - 1)),
    "n": st.one_of(st.integers(1, GEN.max_n), st.sampled_from([0, GEN.max_n + 1])),
    "max_tokens": st.one_of(st.none(), st.integers(1, GEN.max_new_tokens),
                            st.sampled_from([0, GEN.max_new_tokens + 1, 2**63])),
})


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(req=REQUEST)
def test_any_accepted_request_samples_and_never_disturbs_a_greedy_batch_mate(models, dtype, req):
    body = {k: v for k, v in req.items() if v is not None}
    bad = {f for f in FIELDS if not valid(f, req.get(f))}
    if bad:  # refused with a 400 naming one of the out-of-range fields, never anything else
        with pytest.raises(ApiError) as e:
            run(models[dtype], [body])
        assert e.value.status == 400 and e.value.param in bad, (e.value.status, e.value.param, bad)
        return
    job, mate = run(models[dtype], [body, MATE])
    assert job.error is None and mate.error is None, (job.error and job.error.message)
    want = body.get("max_tokens", GEN.max_tokens)
    assert all(c.finish_reason == "length" and len(c.row.out) == want for c in job.choices)
    assert all(0 <= t < 256 for c in job.choices for t in c.row.out)
    assert mate.choices[0].finish_reason == "length" and len(mate.choices[0].row.out) == 6
    if dtype != "int8":  # int8 quantizes activations per batch, so batch-mates share a scale
        # Same batch shape, the sampled request made greedy: the mate's tokens must not change.
        _, ref = run(models[dtype], [{**body, "temperature": 0}, MATE])
        assert mate.choices[0].row.out == ref.choices[0].row.out


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_issue_21_tiny_temperature_with_greedy_batch_mate(models, dtype):
    """The reported case: temperature 1e-39 overflowed logits / T in float32 and failed the batch."""
    alone = run(models[dtype], [MATE])[0].choices[0].text
    job, mate = run(models[dtype], [{"prompt": "x", "max_tokens": 2, "temperature": 1e-39}, MATE])
    assert job.error is None and len(job.choices[0].row.out) == 2
    assert mate.error is None and mate.choices[0].text == alone


def test_sample_next_is_a_valid_draw_at_the_edges():
    g = torch.Generator().manual_seed(0)
    huge = torch.tensor([[3e38, -3e38, 1.0, 3e38]])  # logits / T overflows float32 for T < 1
    for t in (GREEDY_BELOW, 1e-3, 0.5, 2.0, 1e30):
        for p in (1e-300, 0.5, 1.0):
            tok = int(sample_next(huge, t, p, g))
            assert tok in (0, 3), (t, p, tok)
    peaked = torch.tensor([[0.0, 5.0, 1.0]])
    assert int(sample_next(peaked, 1.0, 1e-12, g)) == 1  # a tiny top_p keeps the top token
    assert int(sample_next(peaked, 1e-39, 1.0, g)) == 1  # below GREEDY_BELOW: argmax
    with pytest.raises(ValueError, match="non-finite"):
        sample_next(torch.tensor([[0.0, math.nan]]), 1.0, 1.0, g)


def test_a_row_that_fails_to_sample_fails_alone(models):
    """A sampling error fails its own row (and request) with an OpenAI-shaped 500; the rest go on."""
    gpt = models["fp32"]
    broken = build_job(parse_request(b'{"prompt": "ab", "n": 2, "temperature": 1.0}'), "t", GEN, CONTEXT)
    broken.choices[1].row.generator = "not a generator"  # torch.multinomial raises TypeError
    mate = build_job(parse_request(json.dumps(MATE).encode()), "t", GEN, CONTEXT)
    batch = Batch(gpt, broken.rows + mate.rows)
    first = feed_jobs([broken, mate], batch.step())
    assert first[0] is StopIteration and broken.done and broken.closed
    err = broken.error
    assert err is not None and err.status == 500 and set(err.body()["error"]) == {"message", "type", "param",
                                                                                   "code"}
    assert "TypeError" in err.message and err.type == "server_error"
    while not mate.done:
        feed_jobs([broken, mate], batch.step())
    alone = run(gpt, [MATE])[0]
    assert mate.error is None and mate.choices[0].text == alone.choices[0].text


def test_a_failed_forward_fails_every_row_without_raising():
    class Broken(torch.nn.Module):
        def forward(self, idx):
            raise RuntimeError("boom")

    rows = [Row([1, 2], 3, 0.0), Row([3], 3, 1.0)]
    assert Batch(Broken(), rows).step() == [None, None]
    assert all(r.done and r.error == "RuntimeError: boom" for r in rows)


def run_continuous(model: torch.nn.Module, bodies: list[dict]) -> list[Job]:
    """What a replica's continuous-batching engine does for requests that arrived together."""
    from raybig.serve.engine import Engine
    from raybig.serve.schema import feed_job

    jobs = [build_job(parse_request(json.dumps(b).encode()), "t", GEN, CONTEXT) for b in bodies]
    engine = Engine(model, max_num_seqs=4, max_len=CONTEXT, max_prefill_tokens=4)
    for j in jobs:
        engine.add(j.rows, lambda toks, j=j: feed_job(j, toks))
    while engine.has_work:
        engine.step()
    return jobs


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_continuous_engine_tiny_temperature_and_a_failing_row_leave_the_greedy_mate_alone(models, dtype):
    """Issue 21's cases through the continuous engine: a tiny temperature samples as argmax, and a row
    whose sampling raises fails its own request only; the greedy mate's text is unchanged."""
    alone = run_continuous(models[dtype], [MATE])[0].choices[0].text
    job, mate = run_continuous(models[dtype], [{"prompt": "x", "max_tokens": 2, "temperature": 1e-39}, MATE])
    assert job.error is None and len(job.choices[0].row.out) == 2
    assert mate.error is None and mate.choices[0].text == alone
    from raybig.serve.engine import Engine
    from raybig.serve.schema import feed_job

    broken = build_job(parse_request(b'{"prompt": "ab", "n": 2, "temperature": 1.0}'), "t", GEN, CONTEXT)
    broken.choices[1].row.generator = "not a generator"  # torch.multinomial raises TypeError
    mate = build_job(parse_request(json.dumps(MATE).encode()), "t", GEN, CONTEXT)
    engine = Engine(models[dtype], max_num_seqs=4, max_len=CONTEXT)
    for j in (broken, mate):
        engine.add(j.rows, lambda toks, j=j: feed_job(j, toks))
    while engine.has_work:
        engine.step()
    assert broken.error is not None and broken.error.status == 500 and "TypeError" in broken.error.message
    assert mate.error is None and mate.choices[0].text == alone

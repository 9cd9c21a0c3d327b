"""Bad-input campaigns and secure defaults.

Hypothesis generates broken and hostile job specs (wrong types, huge numbers, NaN/inf, deep nesting,
unicode, YAML tags, alias bombs, unknown kinds, names that try to leave the storage root, hostile
`--set` items and env values) and hostile HTTP bodies for the serving API. The oracle is always
the same: a spec either validates or raises `SpecError` (the CLI: exit 2, no traceback, nothing
started); a request gets a 2xx or an OpenAI-shaped 4xx, never a 500.

Cost: the in-process campaigns run a few thousand cases in seconds. One real training run (through
the CLI, with planted secrets in its environment and spec) is grepped for those secrets, and its
export then backs one Serve app that a few hundred generated bodies are fired at over HTTP.
"""

from __future__ import annotations

import glob
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from raybig.spec import KINDS, SpecError, freeze, load_spec_text, spec_hash
from raybig.spec.yaml_io import MAX_DEPTH, MAX_NODES

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cfg(n: int) -> settings:
    """Deterministic (derandomize), no deadline (a busy CI box), no example database."""
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


# --- the spec oracle ---------------------------------------------------------------------------

def _event(name: str) -> None:
    """Count outcomes for `pytest --hypothesis-show-statistics` (a no-op outside @given)."""
    try:
        event(name)
    except Exception:  # noqa: BLE001 - hypothesis refuses events outside a test case
        pass


def outcome(text: str, overrides: list[str] | None = None, env: dict[str, str] | None = None) -> Any:
    """Load `text`: a valid spec (which must also freeze, hash, re-load to the same hash and
    summarise like `raybig validate`), or the SpecError. Anything else fails the test."""
    from raybig.spec.summary import validate_summary

    try:
        spec = load_spec_text(text, overrides=overrides, env=env if env is not None else {})
    except SpecError as e:
        assert e.issues and all(i.message for i in e.issues), e
        assert str(e)
        _event("SpecError")
        return e
    _event("valid spec")
    frozen = freeze(spec)
    if "${" not in frozen:  # a frozen ${VAR} is re-read from the environment, by design
        assert spec_hash(load_spec_text(frozen, env={})) == spec_hash(spec)
    validate_summary(spec)
    return spec


TRAIN: dict[str, Any] = yaml.safe_load((ROOT / "jobs" / "debug.yaml").read_text())
BASES: dict[str, dict[str, Any]] = {
    "train": TRAIN,
    "serve": {"kind": "serve", "name": "s", "checkpoint": "./runs/debug", "quantize": "none",
              "resources": {"num_cpus": 1, "memory": "1GiB"}, "api_key_env": "RAYBIG_API_KEY",
              "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2},
              "batching": {"max_batch_size": 4, "max_ongoing_requests": 8},
              "generation": {"max_tokens": 8, "max_new_tokens": 16}, "port": 8000, "route_prefix": "/"},
    "sweep": {"kind": "sweep", "name": "sw", "base": {k: v for k, v in TRAIN.items() if k != "kind"},
              "search": {"train.lr": {"loguniform": [1e-4, 1e-2]}, "deepspeed.zero_stage": {"grid": [1, 2]},
                         "train.micro_batch_size": {"choice": [1, 2]}, "train.steps": {"randint": [4, 8]}},
              "num_samples": 2, "scheduler": "none"},
    "pipeline": {"kind": "pipeline", "name": "pl", "storage": {"path": "./runs"},
                 "sweep": {"name": "pl-sw", "base": {k: v for k, v in TRAIN.items() if k != "kind"},
                           "search": {"train.lr": {"choice": [1e-3, 3e-3]}}, "algorithm": "grid",
                           "scheduler": "none"},
                 "train": {"set": {"train.steps": 16}}, "serve": {"generation": {"max_tokens": 8}}},
    "probe": {"kind": "probe", "name": "p", "resources": {"workers": 2, "cpus_per_worker": 0.5},
              "seconds": 1},
}

# Raw YAML for one value: each is a hostile input somebody could write (or paste) into a spec.
HOSTILE_SNIPPETS = [
    "9" * 5000, "-" + "9" * 4400, "1" + "0" * 400, "1e999", "-1e999", ".nan", ".inf", "-.inf",
    "0x7fffffffffffffffffffffff", "0o777", "1_000", "0b101", "~", "null", "true", "no", "''",
    "2001-12-14", "2001-12-14t21:59:43.10-05:00", "!!binary aGVsbG8=", "!!set {a: null}",
    "!!python/object/apply:os.system ['touch /tmp/raybig-pwned']", "!!python/name:os.system",
    "!!python/object/new:subprocess.Popen [[id]]", "!!str 3", "!!float abc", "!!int xyz",
    "!!timestamp 99", "!!omap [a: 1]", "!<tag:yaml.org,2002:python/tuple> [1]", "&x [*x]", "&y {a: *y}",
    "*undefined_alias", "{<<: [1]}", "{<<: 3}", "[" * 200 + "]" * 200, "{a: {b: {c: [1, {d: .nan}]}}}",
    "../../../etc/passwd", "/etc/passwd", "'..'", "'a/../../b'", "'..\\\\..\\\\windows'", '"\\0"',
    '"\\u202e\\u200b"', '"\\ud800"', "s3://bucket/../x", "memory://x", "file:///etc", "hf://x", "'${HOME}'",
    "'${NOT_SET_X}'", "'${X:-}'", "'${X:-${Y}}'", "?", "- 1", "'" + "x" * 20000 + "'", "[]", "{}",
    "[1, 2, 3]", "-1", "0", "2147483648", "-0.0", "1e-320", "'8GiB'", "'99999999TiB'", "'1e400'",
]


def _floats_yaml(x: float) -> str:
    if math.isnan(x):
        return ".nan"
    if math.isinf(x):
        return ".inf" if x > 0 else "-.inf"
    return repr(x)


hostile_yaml = st.one_of(
    st.sampled_from(HOSTILE_SNIPPETS),
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.floats().map(_floats_yaml),
    st.text(max_size=30).map(json.dumps),  # a JSON string is a YAML double-quoted scalar
    st.lists(st.one_of(st.integers(), st.text(max_size=5), st.booleans()), max_size=4).map(json.dumps),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3).map(json.dumps),
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


PLACEHOLDER = "__RAYBIG_HOSTILE__"


def _mutate(base: dict[str, Any], path: tuple, op: str) -> dict[str, Any]:
    data = json.loads(json.dumps(base))
    node = data
    for p in path[:-1]:
        node = node[p]
    last = path[-1]
    if op == "replace":
        node[last] = PLACEHOLDER
    elif op == "delete" and isinstance(node, dict):
        del node[last]
    elif op == "unknown_key" and isinstance(node, dict):
        node[f"{last}x"] = PLACEHOLDER
    elif op == "nest" and isinstance(node, dict):
        node[last] = {"deeper": PLACEHOLDER}
    else:
        node[last] = PLACEHOLDER
    return data


@pytest.mark.unit
@cfg(1500)
@given(st.data())
def test_mutated_specs_of_every_kind_validate_or_raise_spec_error(data):
    kind = data.draw(st.sampled_from(sorted(BASES)), label="kind")
    base = BASES[kind]
    path = data.draw(st.sampled_from(_paths(base)), label="path")
    op = data.draw(st.sampled_from(["replace", "replace", "delete", "unknown_key", "nest"]), label="op")
    snippet = data.draw(hostile_yaml, label="value")
    text = yaml.safe_dump(_mutate(base, path, op), sort_keys=False, allow_unicode=True)
    outcome(text.replace(PLACEHOLDER, snippet.replace("\n", " ")))


@pytest.mark.unit
@cfg(400)
@given(st.text(max_size=300))
def test_arbitrary_text_validates_or_raises_spec_error(text):
    outcome(text)


@pytest.mark.unit
@cfg(300)
@given(st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`, \n\t?.$0123456789")), max_size=200))
def test_yaml_syntax_soup_validates_or_raises_spec_error(text):
    outcome(text)


@pytest.mark.unit
@cfg(30)
@given(st.integers(2, 12), st.integers(3, 12), st.booleans())
def test_alias_bombs_are_refused_quickly(width, depth, as_mapping):
    """Billion laughs: each level refers `width` times to the one below."""
    import time

    lines = ["a0: &a0 [lol]"]
    for i in range(1, depth + 1):
        refs = ", ".join(f"*a{i - 1}" for _ in range(width))
        lines.append(f"a{i}: &a{i} " + ("{" + ", ".join(f"k{j}: *a{i - 1}" for j in range(width)) + "}"
                                        if as_mapping else f"[{refs}]"))
    text = "\n".join(lines) + f"\nkind: train\nname: bomb\nmodel: {{kwargs: {{x: *a{depth}}}}}\n"
    t0 = time.perf_counter()
    res = outcome(text)
    assert time.perf_counter() - t0 < 5
    if width**depth > MAX_NODES:
        assert isinstance(res, SpecError) and "alias bomb" in str(res)


@pytest.mark.unit
@cfg(40)
@given(st.integers(MAX_DEPTH + 1, 1500), st.sampled_from(["flow_list", "flow_map", "block", "mixed"]))
def test_deep_nesting_is_refused(depth, style):
    if style == "flow_list":
        value = "[" * depth + "]" * depth
    elif style == "flow_map":
        value = "{a: " * depth + "1" + "}" * depth
    elif style == "mixed":
        value = "[{a: " * (depth // 2) + "1" + "}]" * (depth // 2)
    else:
        depth = min(depth, 150)  # block style: indentation grows quadratically
        value = "\n" + "".join("  " * (i + 1) + "k:\n" for i in range(depth)) + "  " * (depth + 1) + "v: 1"
    res = outcome(f"name: deep\nmodel:\n  kwargs: {value}\n")
    assert isinstance(res, SpecError) and "nested" in str(res)


@pytest.mark.unit
@cfg(200)
@given(st.one_of(st.text(max_size=30), st.integers().map(str), st.sampled_from(["[a]", "{x: 1}", "~", "Train",
                                                                                  "TRAIN ", "serve\n"])))
def test_unknown_kinds_are_refused(kind):
    text = f"kind: {json.dumps(kind)}\nname: k\n"
    try:
        known = yaml.safe_load(text)["kind"] in KINDS
    except yaml.YAMLError:
        known = False
    res = outcome(text)
    if not known:
        assert isinstance(res, SpecError)
        assert res.issues[0].path == ("kind",) or "kind" in str(res)


TRAVERSAL = ["..", ".", "../x", "../../etc", "a/b", "/abs", "a\\b", "..\\x", "a/../../b", "~root", "a\x00b",
             "", " x", "x ", ".hidden", "-rf", "a\nb", "é", "\u202eexe", "x" * 101, "a:b", "a*", "$HOME",
             "%2e%2e", "a b", "CON/..", "s3://x"]


@pytest.mark.unit
@cfg(300)
@given(st.sampled_from(sorted(BASES)),
       st.one_of(st.sampled_from(TRAVERSAL), st.text(max_size=20).filter(lambda s: not re.fullmatch(
           r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", s))))
def test_names_that_could_escape_the_storage_root_are_refused(kind, name):
    """Run, job, sweep, app and pipeline names become directory names and URL parts: only
    [A-Za-z0-9][A-Za-z0-9_.-]* passes, so no name holds a separator or starts with a dot."""
    data = json.loads(json.dumps(BASES[kind]))
    data["name"] = name
    res = outcome(yaml.safe_dump(data, allow_unicode=True))
    assert isinstance(res, SpecError) and any(i.path == ("name",) for i in res.issues), res


@pytest.mark.unit
@cfg(200)
@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,30}", fullmatch=True))
def test_every_accepted_name_stays_under_the_storage_root(name):
    from raybig.train.runner import run_dir_of

    res = outcome(f"name: {json.dumps(name)}\nstorage: {{path: /srv/runs}}\n")
    if isinstance(res, SpecError):
        return
    run_dir = os.path.normpath(run_dir_of(res))
    assert os.path.dirname(run_dir) == "/srv/runs", run_dir


@pytest.mark.unit
def test_storage_path_is_the_users_choice_but_not_memory():
    """`storage.path: ../../elsewhere` is a user's own choice on their own machine (like `-o` of any
    tool), so it is accepted; memory:// is refused (per-process)."""
    assert load_spec_text("name: x\nstorage: {path: ../../elsewhere}\n", env={}).storage.path == "../../elsewhere"
    assert isinstance(outcome("name: x\nstorage: {path: 'memory://x'}\n"), SpecError)


override_item = st.one_of(
    st.text(max_size=60),
    st.builds(lambda k, v: f"{k}={v}",
              st.one_of(st.sampled_from(["train.steps", "train.lr", "name", "model.kwargs", "resources.custom.x",
                                         "deepspeed.extra.a", "kind", "storage.path", "a.b.c", "train.betas.0",
                                         "model.²", "x." * 70 + "y", "0.1", "data"]),
                        st.text(alphabet="abc.01²", max_size=12)),
              hostile_yaml),
)


@pytest.mark.unit
@cfg(400)
@given(st.lists(override_item, max_size=3))
def test_set_overrides_validate_or_raise_spec_error(items):
    outcome((ROOT / "jobs" / "debug.yaml").read_text(), overrides=items)


@pytest.mark.unit
@cfg(150)
@given(st.one_of(st.text(max_size=80), hostile_yaml), st.sampled_from(["STEPS", "MY_SECRET_TOKEN"]))
def test_hostile_environment_values_validate_or_raise_spec_error(value, var):
    for field in ("train: {steps: ${%s}}", "model: {kwargs: {a: ${%s}}}", "name: ${%s}", "sample: {prompt: ${%s}}"):
        text = "kind: train\nname: env\n" + field % var + "\n" if not field.startswith("name") else \
            "kind: train\n" + field % var + "\n"
        res = outcome(text, env={var: value})
        if var == "MY_SECRET_TOKEN" and isinstance(res, SpecError) and len(value) >= 8:
            assert value not in str(res)  # a secret that fails validation is not echoed back


@pytest.mark.unit
def test_secret_values_never_reach_error_messages_or_frozen_specs():
    secret = "sk-planted-0123456789abcdefghijklmnopqrstuvwxyz-0123456789abcdef"
    env = {"HUB_TOKEN": secret}
    for text in ("name: x\nresources: {memory_per_worker: '${HUB_TOKEN}'}\n",
                 "name: x\nstorage: {path: 'memory://${HUB_TOKEN}'}\n",
                 "name: '${HUB_TOKEN}!'\n"):
        err = outcome(text, env=env)
        assert isinstance(err, SpecError) and secret[:8] not in str(err), str(err)
    spec = load_spec_text("name: x\nsample: {prompt: '${HUB_TOKEN}'}\n", env=env)
    assert secret not in freeze(spec) and "${HUB_TOKEN}" in freeze(spec)


@pytest.mark.unit
def test_huge_files_and_devices_are_refused_without_reading_them_whole(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("name: x\n" + "# pad\n" * 300_000)
    from raybig.spec import load_spec

    for path in (str(big), "/dev/zero"):
        with pytest.raises(SpecError, match="larger than"):
            load_spec(path)


# --- the CLI: exit 2, no traceback, nothing started ---------------------------------------------

CLI_CASES = {
    "bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "kind: train\nname: bomb\nmodel: {kwargs: {x: *i}}\n",
    "deep.yaml": "name: deep\nmodel: {kwargs: " + "[" * 5000 + "]" * 5000 + "}\n",
    "pickle.yaml": "name: !!python/object/apply:os.system ['touch {marker}']\n",
    "kind.yaml": "kind: trian\nname: typo\n",
    "traversal.yaml": "name: ../../escaped\n",
    "bigint.yaml": "name: big\ntrain: {steps: " + "9" * 5000 + "}\n",
    "notutf8.yaml": b"name: \xff\xfe\n",
}
# Prints whether Ray came up in this process, after the CLI exits (atexit runs on sys.exit).
CLI_WRAPPER = textwrap.dedent("""
    import atexit, runpy, sys
    def report():
        ray = sys.modules.get("ray")
        sys.stderr.write("\\nRAY_INITIALIZED=%s\\n" % bool(ray is not None and ray.is_initialized()))
    atexit.register(report)
    sys.argv = ["raybig"] + sys.argv[1:]
    runpy.run_module("raybig", run_name="__main__")
""")


@pytest.mark.unit
def test_cli_refuses_hostile_spec_files_with_exit_2_and_starts_nothing(tmp_path):
    marker = tmp_path / "pwned"
    storage = tmp_path / "runs"
    files = []
    for fname, content in CLI_CASES.items():
        f = tmp_path / fname
        if isinstance(content, bytes):
            f.write_bytes(content)
        else:
            f.write_text(content.replace("{marker}", str(marker)))
        files.append(f)

    def cli(args: list[str]) -> subprocess.CompletedProcess:
        env = {**os.environ, "RAY_ADDRESS": ""}
        return subprocess.run([sys.executable, "-c", CLI_WRAPPER, *args], capture_output=True, text=True,
                              timeout=120, env=env, cwd=tmp_path)

    # Each call costs an interpreter start (~3 s): the in-process campaigns cover the variety; these
    # check the real CLI end to end on the worst few.
    run = ["bomb.yaml", "deep.yaml", "pickle.yaml", "traversal.yaml", "bigint.yaml"]
    calls = [["run", str(tmp_path / f), "--set", f"storage.path={storage}"] for f in run]
    calls += [["validate", str(tmp_path / "notutf8.yaml")], ["validate", str(tmp_path / "kind.yaml")],
              ["run", str(ROOT / "jobs" / "debug.yaml"), "--set", f"storage.path={storage}", "--set", "name=../up"]]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(cli, calls))
    for args, r in zip(calls, results, strict=True):
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr + r.stdout, (args, r.stderr[-2000:])
        assert "nothing was started" in r.stderr, (args, r.stderr[-2000:])
        assert "RAY_INITIALIZED=False" in r.stderr, (args, r.stderr[-500:])
    assert not storage.exists() and not marker.exists()
    assert not (tmp_path.parent / "escaped").exists()


# --- HTTP bodies, in-process: the exact code path the ingress runs --------------------------------

GEN = None


def _gen() -> Any:
    from raybig.spec.serve import GenerationSpec

    global GEN
    GEN = GEN or GenerationSpec(max_tokens=2, max_new_tokens=4, max_prompt_tokens=64, max_n=2, max_prompts=4)
    return GEN


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(), st.text(max_size=20))
json_value = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=3)
                          | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)
FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream",
          "stream_options", "echo", "logprobs", "user", "suffix", "best_of", "presence_penalty"]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")


request_obj = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=70), st.lists(st.text(max_size=5), max_size=6), json_value)},
    optional={f: st.one_of(json_value, st.integers(-5, 70), st.sampled_from(["t-hostile", "gpt-4", "\ud800"]))
              for f in FIELDS if f != "prompt"})
raw_body = st.one_of(
    request_obj.map(_dumps),
    json_value.map(_dumps),
    st.binary(max_size=200),
    st.sampled_from([b"", b"{", b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "' + b"\\ud800" * 10 + b'"}',
                     b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", b'{"prompt": "x", "n": 1e999}',
                     b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": -Infinity}',
                     b'{"prompt": "x", "seed": 18446744073709551616}', b'{"prompt": "x", "n": 1000000000}',
                     b'{"prompt": ["a", {"b": 1}]}', b'{"prompt": "x", "stop": ["", "a"]}',
                     b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', b'{"prompt": []}',
                     b'{"prompt": ""}', b'{"prompt": "x", "stream_options": [1]}', b'\xef\xbb\xbf{"prompt": "x"}',
                     b'{"prompt": "x", "prompt": 3}', b'{"prompt": "' + b"y" * 100_000 + b'"}']),
)


def check_in_process(raw: bytes) -> int:
    """parse_request -> build_job, as the ingress runs them; errors rendered as it renders them."""
    from raybig.serve.http import error_response
    from raybig.serve.schema import ApiError, build_job, parse_request

    try:
        job = build_job(parse_request(raw), "t-hostile", _gen(), 128)
    except ApiError as e:
        resp = error_response(e)
        body = json.loads(resp.body)
        assert 400 <= resp.status_code < 500 and body["error"]["message"] and body["error"]["type"], body
        return resp.status_code
    assert job.choices and all(len(c.row.out) == 0 for c in job.choices)
    return 200


@pytest.mark.unit
@cfg(2000)
@given(raw_body)
def test_hostile_bodies_in_process_get_4xx_never_an_exception(raw):
    event(f"status {check_in_process(raw)}")


@pytest.mark.unit
def test_content_type_and_body_limits():
    from raybig.serve.schema import ApiError, body_limit, check_content_type

    for ok in (None, "", "application/json", "application/json; charset=utf-8", "application/vnd.x+json"):
        check_content_type(ok)
    for bad in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "x" * 500):
        with pytest.raises(ApiError) as e:
            check_content_type(bad)
        assert e.value.status == 415
    assert 2**20 < body_limit(_gen()) < 4 * 2**20


# --- secure defaults -----------------------------------------------------------------------------

@pytest.mark.unit
def test_every_torch_load_in_raybig_is_weights_only():
    """Grep: raybig never calls torch.load/pickle.load itself without weights_only=True, and the
    DeepSpeed readers it calls (which pass weights_only=False) run inside weights_only_loads()."""
    calls = []
    for f in glob.glob(str(ROOT / "raybig" / "**" / "*.py"), recursive=True):
        src = pathlib.Path(f).read_text()
        for m in re.finditer(r"(torch\.load|pickle\.loads?|cloudpickle\.loads?)\(([^)]*)\)", src):
            calls.append((f, m.group(0)))
            assert "weights_only=True" in m.group(2) or "*args" in m.group(2), (f, m.group(0))
        if "get_fp32_state_dict_from_zero_checkpoint(" in src or "load_checkpoint(" in src:
            assert "weights_only_loads()" in src, f
    loop = (ROOT / "raybig" / "train" / "loop.py").read_text()
    assert re.search(r"with weights_only_loads\(\):[^\n]*\n\s+_, client = engine\.load_checkpoint", loop)


@pytest.mark.unit
def test_deepspeed_checkpoint_cannot_run_pickled_code(tmp_path):
    """A DeepSpeed-shaped checkpoint whose model file carries a pickled os.system call: init_from
    refuses it and the command never runs; DeepSpeed's own data classes still load."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from raybig.train.export import load_state_dict, weights_only_loads

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ck = tmp_path / "ckpt"
    (ck / "step_1").mkdir(parents=True)
    (ck / "latest").write_text("step_1")
    torch.save({"module": {}, "evil": Evil()}, ck / "step_1" / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 2}, "evil": Evil()},
               ck / "step_1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        load_state_dict(str(ck))
    assert not marker.exists()
    ok = tmp_path / "ok.pt"
    torch.save({"s": LossScaler(1.0), "z": ZeroStageEnum.gradients, "t": torch.ones(2)}, ok)
    with weights_only_loads():
        assert torch.load(ok, weights_only=False)["z"] == ZeroStageEnum.gradients
    assert torch.load is not None and "weights_only_loads" not in repr(torch.load)


@pytest.mark.unit
def test_embedded_ray_and_local_cluster_bind_loopback_unless_told(monkeypatch, tmp_path):
    from raybig.cluster.local import LocalCluster
    from raybig.cluster.ray_env import init_kwargs

    monkeypatch.delenv("RAYBIG_DASHBOARD_HOST", raising=False)
    kw = init_kwargs(2, None, True, False)
    assert kw["dashboard_host"] == "127.0.0.1" and kw["address"] == "local"
    assert LocalCluster(dir=str(tmp_path)).dashboard_host == "127.0.0.1"
    monkeypatch.setenv("RAYBIG_DASHBOARD_HOST", "0.0.0.0")
    assert init_kwargs(2, None, True, False)["dashboard_host"] == "0.0.0.0"
    c = LocalCluster(dir=str(tmp_path), dashboard_port=8265)
    assert c.dashboard_host == "0.0.0.0" and c.address == "http://127.0.0.1:8265"
    # Token auth: nothing in raybig turns it off.
    for f in glob.glob(str(ROOT / "raybig" / "**" / "*.py"), recursive=True):
        src = pathlib.Path(f).read_text()
        assert not re.search(r"AUTH_MODE[\"']?\s*[:=,]\s*[\"']?(disabled|none|off)", src, re.I), f
    assert '"RAY_AUTH_MODE": "token"' in (ROOT / "raybig" / "cluster" / "local.py").read_text()


@pytest.mark.unit
def test_serve_spec_takes_an_env_var_name_never_a_key_and_defaults_to_loopback():
    spec = load_spec_text("kind: serve\nname: s\ncheckpoint: x\n", env={})
    assert spec.host == "127.0.0.1" and spec.api_key_env is None
    for literal in ("sk-abc123", "Bearer x", "my key", "0123abc", "a-b"):
        err = outcome(f"kind: serve\nname: s\ncheckpoint: x\napi_key_env: '{literal}'\n")
        assert isinstance(err, SpecError) and "NAME of an environment variable" in str(err)
        assert literal not in str(err).split("(got")[0]
    assert isinstance(outcome("kind: serve\nname: s\ncheckpoint: x\napi_key: sk-abc\n"), SpecError)


# --- one real run: planted secrets, then its export behind Serve ---------------------------------

SECRETS = {
    "RAY_AUTH_TOKEN_LIKE_SECRET": "rbtok-9f2c41d7e6a84b0c8d5e3f1a2b7c9d04",
    "AWS_SECRET_ACCESS_KEY": "rbaws-Zq8W3xV1nR5tK7yP2mL4jH6gF0dS9aQ",
    "RAYBIG_TEST_SERVE_API_KEY": "rbkey-5e8a1c3f7b9d2e4a6c8f0b1d3e5a7c9f",
    "RAYBIG_PROMPT_SECRET": "rbspec-71d3b5f9a2c4e6081a3c5e7f9b1d2f4a",  # referenced from the spec
}


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> dict[str, Any]:
    """`raybig run` (its own embedded Ray, its own temp dir) with secrets in env and spec."""
    tmp = tmp_path_factory.mktemp("planted")
    ray_tmp = f"/tmp/rbs-{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
    spec = tmp / "debug-secret.yaml"
    # debug.yaml, with a secret-sourced value in a legal place (the sample prompt)
    spec.write_text((ROOT / "jobs" / "debug.yaml").read_text().replace(
        "sample: {max_new_tokens: 20}", "sample: {max_new_tokens: 0, prompt: '${RAYBIG_PROMPT_SECRET}'}"))
    env = {**os.environ, **SECRETS, "RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "raybig", "run", str(spec), "--json",
                           "--set", "train.steps=3", "--set", f"storage.path={tmp / 'runs'}"],
                          capture_output=True, text=True, timeout=400, env=env, cwd=tmp)
    yield {"proc": proc, "run_dir": tmp / "runs" / "debug", "ray_tmp": ray_tmp}
    import shutil

    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
def test_planted_secrets_reach_no_file_log_or_output(planted_run):
    proc = planted_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, ray_tmp = planted_run["run_dir"], planted_run["ray_tmp"]
    files = [p for p in glob.glob(f"{run_dir}/**/*", recursive=True) if os.path.isfile(p)]
    logs = [p for p in glob.glob(f"{ray_tmp}/**/*", recursive=True)
            if os.path.isfile(p) and not os.path.islink(p) and "/sockets/" not in p]
    assert any(p.endswith("spec.yaml") for p in files) and any("/logs/" in p for p in logs), (files, logs[:5])
    assert "${RAYBIG_PROMPT_SECRET}" in (run_dir / "spec.yaml").read_text()
    leaks = []
    for name, value in SECRETS.items():
        needle = value.encode()
        for text, where in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
            if value in text:
                leaks.append((name, where))
        for p in files + logs:
            try:
                with open(p, "rb") as f:
                    if needle in f.read():
                        leaks.append((name, p))
            except OSError:
                pass
    assert not leaks, leaks


@pytest.fixture(scope="module")
def hostile_app(planted_run, ray_local) -> str:
    """One Serve app over the planted run's export, with an API key; removed afterwards."""
    import ray
    from ray import serve

    from raybig.cluster.ray_env import free_port
    from raybig.serve.deploy import delete_app, wait_running
    from raybig.serve.deploy import deploy as deploy_spec

    assert planted_run["proc"].returncode == 0, planted_run["proc"].stderr[-2000:]
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    url = ray_local.get("dashboard_url") or ray._private.worker.global_worker.node.address_info["webui_url"]
    dash = f"http://{url}"
    os.environ["RAYBIG_TEST_HOSTILE_KEY"] = SECRETS["RAYBIG_TEST_SERVE_API_KEY"]
    spec = load_spec_text(f"kind: serve\nname: t-hostile\ncheckpoint: {planted_run['run_dir']}\n"
                          "route_prefix: /t-hostile\nresources: {num_cpus: 0.25}\n"
                          "api_key_env: RAYBIG_TEST_HOSTILE_KEY\n"
                          "generation: {max_tokens: 2, max_new_tokens: 4, max_prompt_tokens: 64, max_n: 2, "
                          "max_prompts: 4}\n")
    deploy_spec(spec, dash)
    yield wait_running("t-hostile", dash, timeout_s=180)["url"]
    delete_app("t-hostile", dash)


AUTH = {"Authorization": f"Bearer {SECRETS['RAYBIG_TEST_SERVE_API_KEY']}"}
header_sets = st.one_of(
    st.just({**AUTH, "Content-Type": "application/json"}),
    st.just(AUTH),
    st.sampled_from([{**AUTH, "Content-Type": "text/plain"}, {**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
                     {"Authorization": "Bearer wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="}, {},
                     {**AUTH, "Content-Type": "application/json; charset=latin-1"}]),
    # Stripped: requests itself refuses a header value with leading whitespace, before sending it.
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
        lambda v: {"Authorization": v.strip(), "Content-Type": "application/json"}),
)


@pytest.mark.ray
def test_hostile_http_bodies_get_openai_4xx_never_500(hostile_app):
    import requests

    cases: list[tuple[bytes, dict[str, str]]] = []

    @cfg(300)
    @given(raw_body, header_sets)
    def collect(raw, headers):
        cases.append((raw, headers))

    collect()
    big = b'{"prompt": "' + b"z" * 3_000_000 + b'"}'
    cases += [(big, {**AUTH, "Content-Type": "application/json"}),
              (b'{"prompt": "x", "model": "\\ud800"}', AUTH),
              (b"[" * 200_000 + b"]" * 200_000, AUTH)]
    session = requests.Session()

    def post(case: tuple[bytes, dict[str, str]]) -> tuple[int, str]:
        raw, headers = case
        r = session.post(f"{hostile_app}/completions", data=raw, headers=headers, timeout=120)
        return r.status_code, r.text

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(post, cases))
    seen: dict[int, int] = {}
    for (raw, headers), (status, text) in zip(cases, results, strict=True):
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, (raw[:200], headers, status, text[:500])
        if status >= 400:
            err = json.loads(text)["error"]
            assert err["message"] and err["type"], text[:300]
        else:
            assert status == 200 and json.loads(text)["choices"], text[:300]
    assert results[-3][0] == 413 and results[-2][0] == 404 and results[-1][0] == 400, results[-3:]
    assert {400, 401, 415} <= set(seen), seen
    print(f"\nHTTP campaign: {len(cases)} requests, statuses {dict(sorted(seen.items()))}")
    ok = requests.post(f"{hostile_app}/completions", json={"prompt": "def ", "max_tokens": 2}, headers=AUTH,
                       timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2

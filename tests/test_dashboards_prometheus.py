"""Every PromQL expression in dashboards/ against a real Prometheus scraping a real local Ray.

First, a plain `raybig run` of a train spec (its own embedded Ray, no dashboard) must be found by a
Prometheus configured as dashboards/prometheus.yml, through the discovery file the README names.

One module fixture: Debian's Prometheus on its own port (1 s scrapes) file_sd's the service-discovery
file Ray writes in its session dir; a short raybig training job runs, its export is served by the
raybig Serve app, and a few completions are sent. Then every panel expression and every template
variable query is evaluated over that time window through /api/v1/query_range: each must parse, and
each must return data unless it only names a metric nothing emits yet or is on the
explicit may-be-empty allowlist. Sweep and scheduler emitters are driven directly (see below). Also `raybig report` on the finished run.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest

from raybig.spec import load_spec_text

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

# Declared in raybig.metrics but emitted by nothing yet: such a metric must be declared, and its
# expressions must parse, but they cannot return data. (None today.)
NEVER_EMITTED: set[str] = set()
# Emitted only on an event this module makes at most once and cannot make certain (a client that
# hangs up mid-stream: the engine may finish the row first); exported when it happens.
ON_EVENT_ONLY = {"ray_raybig_serve_cancelled_total",
                 "ray_raybig_scheduler_preemptions_total",  # a preemption (tests/test_preemption*.py)
                 # classifiers and masked LMs only (this world trains a causal LM; tests/test_metrics.py)
                 "ray_raybig_train_accuracy_ratio", "ray_raybig_train_val_accuracy_ratio"}
# Expressions that may legitimately be empty even while everything runs (by panel title).
MAY_BE_EMPTY = {
    "Serve 5xx errors",  # no server errors in a healthy test run
}

TRAIN = """
kind: train
name: obs-prom
model: {{preset: gpt-debug}}
data: {{path: "stdlib://", seq_len: 32, max_tokens: 200000}}
train: {{steps: 8, micro_batch_size: 4, lr: 2.0e-3, warmup_steps: 2, eval_every: 4, eval_batches: 1,
         log_every: 2}}
deepspeed: {{zero_stage: 1}}
resources: {{workers: 2, cpus_per_worker: 1}}
storage: {{path: {storage}}}
checkpoint: {{every: 4, keep: 1}}
sample: {{max_new_tokens: 0}}
"""


def _get(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict, timeout: float = 60) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _hang_up_mid_stream(url: str) -> None:
    body = {"model": "obs-serve", "prompt": "def ", "max_tokens": 200, "stream": True}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.readline()  # the first event, then close the connection
    except (urllib.error.URLError, OSError):
        pass


def _session_dir() -> str:
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


def start_prometheus(tmp: pathlib.Path, sd_file: str | None = None,
                     config: str | None = None) -> tuple[subprocess.Popen, str]:
    """Prometheus on a free port, file_sd'ing `sd_file` (1 s scrapes), or with `config` as given."""
    from raybig.cluster.ray_env import free_port

    port = free_port()
    cfg = tmp / "prometheus.yml"
    cfg.write_text(config or (
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    file_sd_configs: [{{files: ['{sd_file}'], refresh_interval: 1s}}]\n"))
    log = open(tmp / "prometheus.log", "w")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=2).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"prometheus did not start: {(tmp / 'prometheus.log').read_text()[-2000:]}")


def query_range(prom: str, expr: str, start: float, end: float) -> dict:
    q = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1s"})
    try:
        return _get(f"{prom}/api/v1/query_range?{q}")
    except urllib.error.HTTPError as e:  # 400 = parse/eval error; the body says why
        return json.loads(e.read())


def wait_for(prom: str, exprs: list[str], timeout_s: float = 90) -> list[str]:
    """Wait until every expression has data now (rates: two scrapes of the series); returns the
    ones still without data."""
    deadline = time.monotonic() + timeout_s
    missing = list(exprs)
    while missing and time.monotonic() < deadline:
        missing = [e for e in missing if not _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode(
            {"query": e}))["data"]["result"]]
        if missing:
            time.sleep(1)
    return missing


def keep_traffic(stop: threading.Event, serve_url: str) -> None:
    """A real sweep takes over a minute on CI and the scheduler needs a `ray start` cluster, so their
    emitters are driven here, in this Ray driver, with the events they would see, once a second like
    the scheduler's tick (Ray drops a gauge that is not set for ~20 s); the values go through Ray's
    real metrics path to Prometheus like any other. A completion every second keeps Serve's rates up."""
    from types import SimpleNamespace as NS

    from raybig.metrics import TrainMetrics, scheduler_observe, scheduler_retry
    from raybig.tune.metrics_callback import SweepMetricsCallback

    cb = SweepMetricsCallback("obs-sweep", "val_loss", "min")
    trials = [NS(status="RUNNING"), NS(status="TERMINATED"), NS(status="PENDING")]
    cb.on_trial_start(0, trials, trials[0])
    cb.on_trial_result(1, trials, trials[0], {"val_loss": 3.0})
    cb.on_trial_result(2, trials, trials[0], {"val_loss": 2.5})
    assert cb.best == 2.5
    i = 0
    while not stop.is_set():
        cb.on_trial_result(3 + i, trials, trials[0], {"val_loss": 2.6})
        TrainMetrics("obs-sweep", "obs-sweep-t1", "t1").report({"step": 2 + i, "val_loss": 2.5,
                                                                 "tokens_per_s": 100.0})
        now = time.time()
        jobs = [NS(job_id=f"a{i}", priority=5, submitted_at=now - 3, admitted=False),
                NS(job_id="b", priority=1, submitted_at=now - 1, admitted=False)]
        scheduler_observe(jobs, [f"a{i}"], now)
        scheduler_retry(5, "RuntimeError")
        _post(f"{serve_url}/completions", {"model": "obs-serve", "prompt": "x", "max_tokens": 2})
        i += 1
        stop.wait(1.0)


def readme_prometheus_config(sd_prefix: str | None = None) -> tuple[str, str]:
    """dashboards/prometheus.yml as the README runs it, with 1 s scrapes and refreshes; `sd_prefix`
    replaces its `/tmp/ray` (what its comment says to do when Ray runs with another temp dir).
    Returns (config text, the discovery file it reads)."""
    import yaml

    cfg = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    [job] = cfg["scrape_configs"]
    [sd] = job["file_sd_configs"]
    [path] = sd["files"]
    assert path == "/tmp/ray/prom_metrics_service_discovery.json"
    assert f"`{path}`" in (ROOT / "README.md").read_text()
    if sd_prefix:
        path = path.replace("/tmp/ray", sd_prefix, 1)
        sd["files"] = [path]
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    sd["refresh_interval"] = "1s"
    return yaml.safe_dump(cfg), path


def test_discovery_files_of_two_rays_on_one_machine(tmp_path):
    """Each session keeps its own file; the well-known link follows the one written last (no Ray)."""
    from raybig.cluster.ray_env import PROM_SD_FILE, link_prometheus_sd, write_prometheus_sd

    a, b = tmp_path / "session_a", tmp_path / "session_b"
    a.mkdir()
    b.mkdir()
    fa, link = write_prometheus_sd(str(a), str(tmp_path), ["10.0.0.1:1001"])
    fb, _ = write_prometheus_sd(str(b), str(tmp_path), ["10.0.0.1:2002"])
    assert link == str(tmp_path / PROM_SD_FILE) and os.readlink(link) == fb
    assert json.loads(pathlib.Path(fa).read_text()) == [{"labels": {"job": "ray"}, "targets": ["10.0.0.1:1001"]}]
    assert json.loads(pathlib.Path(link).read_text())[0]["targets"] == ["10.0.0.1:2002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [PROM_SD_FILE, "session_a", "session_b"]  # no temp files
    # a cluster with its own --temp-dir is linked from the default one the same way
    other = link_prometheus_sd(link, str(tmp_path / "default"))
    assert json.loads(pathlib.Path(other).read_text())[0]["targets"] == ["10.0.0.1:2002"]


def test_plain_run_is_scraped_through_the_readme_discovery_file(tmp_path):
    """`raybig run` of a train spec (embedded Ray, no dashboard) leaves the discovery file where the
    README says and prints its scrape targets; Prometheus configured as dashboards/prometheus.yml
    finds the run's metrics.

    Defined before the module fixture on purpose: a Ray with its dashboard (this process' shared one)
    re-points the well-known link at itself every 5 s. If one is already up (whole-suite runs), the
    run gets its own Ray temp dir and the config the matching path, as prometheus.yml's comment says.
    """
    import signal
    import sys
    import tempfile

    import ray

    if not os.path.exists(PROMETHEUS):
        pytest.skip("prometheus is not installed (scripts/system-deps.sh installs Debian's package)")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "TMPDIR")}
    own_tmp = None
    if ray.is_initialized() or os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR"):
        own_tmp = tempfile.mkdtemp(prefix="rbsd-", dir="/tmp")  # short: Ray's socket paths live under it
        env["RAY_TMPDIR"] = own_tmp
    config, sd_file = readme_prometheus_config(own_tmp and f"{own_tmp}/ray")
    proc, prom = start_prometheus(tmp_path, config=config)
    spec = tmp_path / "train.yaml"
    spec.write_text(TRAIN.format(storage=tmp_path / "runs"))
    # Steps enough to outlast any start-up; interrupted once scraped, so the test takes what it needs.
    steps = 100_000
    log = open(tmp_path / "run.log", "w")  # noqa: SIM115  (closed below)
    run = subprocess.Popen(
        [str(pathlib.Path(sys.executable).parent / "raybig"), "run", str(spec), "--set", "name=obs-sd",
         "--set", "resources.workers=1", "--set", f"train.steps={steps}", "--set", "train.log_every=20",
         "--set", f"train.eval_every={steps}", "--set", f"checkpoint.every={steps}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    t0 = time.monotonic()
    try:
        missing = ["x"]
        while missing and run.poll() is None and time.monotonic() - t0 < 240:
            missing = wait_for(prom, ['ray_raybig_train_step{run="obs-sd"} > 0'], timeout_s=5)
        found_s = time.monotonic() - t0
        out = (tmp_path / "run.log").read_text()
        assert not missing, f"never scraped through {sd_file} (run rc={run.poll()}):\n{out[-3000:]}"
        m = re.search(r"raybig: Prometheus scrape targets (\S+).* \(file_sd: (\S+) -> (\S+)\)", out)
        assert m, out[-3000:]
        node_target, link, session_file = m.groups()
        assert link == sd_file and os.path.realpath(link) == session_file
        assert json.loads(pathlib.Path(session_file).read_text())[0]["targets"][0] == node_target
        up = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": f'up{{instance="{node_target}"}}'}))
        assert [r["value"][1] for r in up["data"]["result"]] == ["1"]
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)  # as Ctrl-C: raybig stops the workers and its Ray
            try:
                run.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait(timeout=10)
        log.close()
        proc.terminate()
        proc.wait(timeout=20)
        if own_tmp:
            shutil.rmtree(own_tmp, ignore_errors=True)
    print(f"\nplain run scraped after {found_s:.0f} s; stopped after {time.monotonic() - t0:.0f} s")


@pytest.fixture(scope="module")
def world(ray_local, tmp_path_factory):
    """Prometheus + a finished training run + a serve app that answered requests."""
    from ray import serve

    from raybig.cluster.ray_env import free_port
    from raybig.serve.deploy import delete_app, deploy, wait_running
    from raybig.train.runner import run_train

    if not os.path.exists(PROMETHEUS):
        pytest.skip("prometheus is not installed (scripts/system-deps.sh installs Debian's package)")
    tmp = tmp_path_factory.mktemp("prom")
    sd_file = os.path.join(_session_dir(), "prom_metrics_service_discovery.json")
    proc, prom = start_prometheus(tmp, sd_file)
    start = time.time()
    os.environ["RAYBIG_PEAK_FLOPS"] = "1e11"  # a known "peak" so workers emit the MFU gauge on CPU
    try:
        spec = load_spec_text(TRAIN.format(storage=tmp / "runs"))
        result = run_train(spec)
        phases = {"train": time.time() - start}
    finally:
        os.environ.pop("RAYBIG_PEAK_FLOPS", None)

    import ray

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    dash = f"http://{ray_local.get('dashboard_url') or ray._private.worker.global_worker.node.address_info['webui_url']}"
    sspec = load_spec_text(f"kind: serve\nname: obs-serve\ncheckpoint: {result.run_dir}\n"
                           "route_prefix: /obs-serve\nresources: {num_cpus: 0.25}\n")
    deploy(sspec, dash)
    base = wait_running("obs-serve", dash, timeout_s=180)["url"].rstrip("/")
    phases["serve up"] = time.time() - start
    try:
        codes = [_post(f"{base}/completions", {"model": "obs-serve", "prompt": "def ", "max_tokens": 8,
                                                  "stream": i % 2 == 1}) for i in range(8)]
        codes.append(_post(f"{base}/completions", {"model": "obs-serve", "max_tokens": -1}))  # a 400
        _hang_up_mid_stream(f"{base}/completions")  # raybig_serve_cancelled, when the engine sees it
        assert codes.count(200) == 8, codes
        stop = threading.Event()
        pump = threading.Thread(target=keep_traffic, args=(stop, base), daemon=True)
        pump.start()
        # Ray pushes metrics to its agent every few seconds; rates need two scrapes of a series.
        missing = wait_for(prom, [
            "max_over_time(ray_raybig_train_loss[10m])", "rate(ray_raybig_serve_requests_total[30s])",
            "rate(ray_serve_num_http_requests_total[30s])", "rate(ray_serve_http_request_latency_ms_count[30s])",
            "ray_node_cpu_utilization", "ray_raybig_sweep_trials", 'ray_raybig_train_val_loss{trial!=""}',
            "increase(ray_raybig_scheduler_admissions_total[30s])",
            "increase(ray_raybig_scheduler_retries_total[30s])",
            "rate(ray_raybig_scheduler_wait_time_seconds_count[30s])"])
        assert not missing, f"never scraped: {missing}"
        time.sleep(5)  # a few more scrapes: range queries step on a 1 s grid that may miss the newest two
        phases["all scraped"] = time.time() - start
        print(f"\nprometheus world ready (s since start): {phases}")
        yield {"prom": prom, "start": start, "run_dir": result.run_dir}
    finally:
        with contextlib.suppress(NameError):
            stop.set()
            pump.join(timeout=10)
        delete_app("obs-serve", dash)
        proc.terminate()
        proc.wait(timeout=20)


DASH_VAR_RE = re.compile(r"\$(\w+)")
METRIC_RE = re.compile(r"\bray_[a-zA-Z0-9_:]+\b(?!\s*(=|!=|=~|!~))")  # not a label matcher
BY_RE = re.compile(r"\b(by|without)\s*\([^)]*\)")


def metric_names(expr: str) -> list[str]:
    """Metric names in a PromQL expression (label names in matchers and by/without clauses excluded)."""
    return [m.group(0) for m in METRIC_RE.finditer(BY_RE.sub("", expr))]
LABEL_VALUES_RE = re.compile(r"^label_values\((.+),\s*(\w+)\)$")


# What a user picks in each dashboard variable for the jobs this test runs.
PICKED = {"job_name": "obs-prom", "run": "obs-prom", "application": "obs-serve", "sweep": "obs-sweep",
          "priority": "5"}


def substitute(expr: str, picked: dict[str, str] | None = None) -> str:
    """Grafana's variables as a dashboard sends them: 'All' (.*), or one picked value each."""
    expr = expr.replace("$__rate_interval", "30s")
    return DASH_VAR_RE.sub(lambda m: (picked or {}).get(m.group(1), ".*"), expr)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title or 'var NAME', PromQL) for every panel target and variable."""
    out = []
    for f in sorted(DASHBOARDS.glob("*.json")):
        d = json.loads(f.read_text())
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((f.name, p["title"], t["expr"]))
        for v in d["templating"]["list"]:
            if v["type"] == "query":
                m = LABEL_VALUES_RE.match(v["query"]["query"])
                assert m, f"{f.name}: variable {v['name']}: only label_values(metric, label) is used"
                out.append((f.name, f"var {v['name']}", m.group(1)))
    return out


def needs_data(title: str, expr: str) -> bool:
    """Must this expression return data here? Not if it only names metrics of components not run."""
    if title in MAY_BE_EMPTY:
        return False
    return not set(metric_names(expr)) <= NEVER_EMITTED


def test_every_dashboard_expression_parses_and_returns_data(world):
    queries = dashboard_queries()
    assert len(queries) >= 40
    bad, empty, checked = [], [], 0
    end = time.time()
    for fname, title, expr in queries:
        res = query_range(world["prom"], substitute(expr), world["start"], end)
        if res.get("status") != "success":
            bad.append(f"{fname} / {title}: {expr}\n    -> {res.get('errorType')}: {res.get('error')}")
            continue
        if needs_data(title, expr):
            checked += 1
            if not res["data"]["result"]:
                empty.append(f"{fname} / {title}: {expr}")
            elif "$" in expr and not title.startswith("var "):
                # with one value picked per variable too: proves the variable's label is on the series
                one = query_range(world["prom"], substitute(expr, PICKED), world["start"], end)
                if not one["data"]["result"]:
                    empty.append(f"{fname} / {title} (picked {PICKED}): {expr}")
    assert not bad, "PromQL that Prometheus refuses:\n" + "\n".join(bad)
    assert not empty, "expressions with no data while training and serving ran:\n" + "\n".join(empty)
    assert checked >= 30


def test_every_metric_named_is_exported(world):
    """A panel naming a metric nothing exports fails: seen by Prometheus, or (components not run here)
    declared in raybig.metrics."""
    from raybig.metrics import METRICS

    seen = set(_get(f"{world['prom']}/api/v1/label/__name__/values")["data"])
    declared = {n for m in METRICS.values() for n in m.exported}
    unknown = set()
    for fname, title, expr in dashboard_queries():
        for name in metric_names(expr):
            ok = name in seen or (name in NEVER_EMITTED and name in declared)
            if not ok:
                unknown.add(f"{fname} / {title}: {name}")
    assert not unknown, "metrics nothing exports:\n" + "\n".join(sorted(unknown))
    # and everything raybig declares for training and serving really reached Prometheus
    ran = declared - NEVER_EMITTED - ON_EVENT_ONLY
    assert ran <= seen, f"declared but never exported: {sorted(ran - seen)}"


def test_metric_labels_are_bounded(world):
    """No raybig series carries a per-step or per-request label; tags are the documented ones."""
    from raybig.metrics import BOUNDED_TAGS

    res = _get(f"{world['prom']}/api/v1/series?" + urllib.parse.urlencode({"match[]": '{__name__=~"ray_raybig_.+"}',
                                                                         "start": f"{world['start']:.0f}"}))
    ray_labels = {"__name__", "instance", "job", "le", "Component", "NodeAddress", "SessionName", "Version",
                  "WorkerId", "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"}
    extra = {k for s in res["data"] for k in s if k not in ray_labels and k not in BOUNDED_TAGS}
    assert not extra, f"undocumented labels: {extra}"
    steps = {s.get("run") for s in res["data"] if s["__name__"] == "ray_raybig_train_loss"}
    assert steps == {"obs-prom"}  # one series per run, not per step


def test_report_on_the_finished_run(world, tmp_path):
    """`raybig report RUN` on the run this module trained: PNGs that hold real curves."""
    from click.testing import CliRunner
    from test_report import assert_real_png

    from raybig.cli import main

    r = CliRunner().invoke(main, ["report", world["run_dir"], "--out", str(tmp_path), "--tensorboard"])
    assert r.exit_code == 0, r.output
    assert "val_loss" in r.output and "8 steps" in r.output
    for name in ("loss.png", "lr.png", "throughput.png"):
        assert_real_png(tmp_path / name)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

"""`raybig cluster up/status/down` through the real CLI, and what a new user hits on such a cluster.

- down signals only processes it can prove are its own (PID + start time + command line): a stale
  state file whose PIDs now belong to unrelated processes kills nothing and says so (no Ray needed);
- one real cluster (head + 1 worker node): a `model.target` plug-in job spans both nodes and succeeds
  (each node has its own Ray temp folder); a failing job shows its cause and where to look; a
  partly dead cluster is reported by `status` and cleaned up by `up`; `down` leaves nothing behind;
- a gang the embedded Ray can never fit (a GPU on a machine without one) is refused at once.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _env(tmp: pathlib.Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RAYBIG_HOME": str(tmp / "home"), "RAY_AUTH_TOKEN_PATH": str(tmp / "token"), **extra}
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    return env


def _cli(env: dict[str, str], *args: str, timeout: float = 300, cwd: str | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "raybig", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=cwd or str(ROOT))


def _marked(cluster_id: str) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAYBIG_CLUSTER_ID") == cluster_id:
                out.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return out


@pytest.mark.unit
def test_down_with_a_stale_state_file_kills_nothing_and_says_so(tmp_path):
    """The recorded PIDs now run `sleep`: wrong command line, wrong start time, or an old state file
    with bare PIDs. None of them is signalled."""
    sleepers = [subprocess.Popen(["sleep", "300"]) for _ in range(3)]
    try:
        env = _env(tmp_path)
        d = tmp_path / "home" / "cluster"
        d.mkdir(parents=True)
        s = [psutil.Process(p.pid) for p in sleepers]
        procs = [
            # a `ray start` that died long ago; its PID went to an unrelated process
            {"pid": s[0].pid, "cmdline": ["/x/bin/ray", "start", "--head", "--block"],
             "create_time": s[0].create_time(), "role": "head"},
            # same command line, but the process started at another time (the PID was reused)
            {"pid": s[1].pid, "cmdline": s[1].cmdline(), "create_time": s[1].create_time() - 100, "role": "worker0"},
        ]
        state = {"dir": str(d), "workers": 1, "procs": procs, "cluster_id": "feedfacefeedface",
                 "gcs_port": 1, "dashboard_port": 2, "token_path": str(tmp_path / "token"), "temp_dir": "/tmp/x"}
        (d / "cluster.json").write_text(json.dumps(state))
        r = _cli(env, "cluster", "down")
        assert r.returncode == 0, r.stderr
        assert "already down" in r.stdout and "nothing was stopped" in r.stdout, r.stdout
        assert str(s[0].pid) in r.stdout and str(s[1].pid) in r.stdout and "left alone" in r.stdout, r.stdout
        assert json.loads((d / "cluster.json").read_text())["procs"] == []
        # An old-format state file (bare PIDs): nothing to prove ownership with, nothing signalled.
        (d / "cluster.json").write_text(json.dumps({"dir": str(d), "pids": [s[2].pid], "dashboard_port": 3}))
        r = _cli(env, "cluster", "down")
        assert r.returncode == 0 and "left alone" in r.stdout and str(s[2].pid) in r.stdout, (r.stdout, r.stderr)
        assert all(p.poll() is None for p in sleepers), "an unrelated process was signalled"
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


@pytest.mark.unit
def test_down_stops_what_it_can_prove_is_its_own(tmp_path):
    """A recorded process whose start time and command line match is stopped with its process group;
    a process carrying the cluster's id that a dead node left behind is found and stopped too."""
    env = _env(tmp_path)
    mark = {**os.environ, "RAYBIG_CLUSTER_ID": "0123456789abcdef"}
    node = subprocess.Popen(["bash", "-c", "sleep 300 & wait"], env=mark, start_new_session=True)
    orphan = subprocess.Popen(["sleep", "301"], env=mark, start_new_session=True)
    other = subprocess.Popen(["sleep", "302"], start_new_session=True)  # unmarked, unrecorded
    try:
        time.sleep(0.3)
        pn = psutil.Process(node.pid)
        d = tmp_path / "home" / "cluster"
        d.mkdir(parents=True)
        state = {"dir": str(d), "workers": 0, "cluster_id": "0123456789abcdef", "dashboard_port": 4,
                 "procs": [{"pid": node.pid, "cmdline": pn.cmdline(), "create_time": pn.create_time(), "role": "head"}]}
        (d / "cluster.json").write_text(json.dumps(state))
        r = _cli(env, "cluster", "down")
        assert r.returncode == 0 and r.stdout.startswith("down: "), (r.stdout, r.stderr)
        assert "stopped 1 node process(es)" in r.stdout and "leftover" in r.stdout, r.stdout
        assert node.wait(10) is not None and orphan.wait(10) is not None
        assert other.poll() is None
    finally:
        for p in (node, orphan, other):
            p.kill()
            p.wait()


@pytest.mark.unit
def test_gang_shortfall_names_what_is_missing():
    from raybig.cluster.ray_env import gang_shortfall

    assert gang_shortfall({"CPU": 1, "GPU": 1}, 2, [{"CPU": 4}, {"CPU": 4}]) == \
        "needs 2 workers × {CPU: 1, GPU: 1}; this Ray has GPU: 0 on every node"
    assert "no node has GPU: 2 (the most on one node is 1)" in gang_shortfall({"GPU": 2}, 1, [{"GPU": 1}])
    assert "at most 2 fit at once" in gang_shortfall({"CPU": 2}, 3, [{"CPU": 2}, {"CPU": 3}])
    assert gang_shortfall({"CPU": 1, "GPU": 0}, 2, [{"CPU": 1}, {"CPU": 1}]) is None  # spans nodes


FAILING_PLUGIN = '''
def build(**kwargs):
    raise FileNotFoundError(2, "No such file or directory", "/nonexistent/weights.bin")
'''


@pytest.mark.cluster
@pytest.mark.slow
def test_cluster_up_plugin_job_failure_partly_dead_up_and_down(tmp_path):
    env = _env(tmp_path, RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="60")
    d = tmp_path / "home" / "cluster"
    t0 = time.time()
    # 3 CPUs: a 2-worker gang (1 CPU each) plus its driver's 0.5 CPU, as the scheduler counts it.
    r = _cli(env, "cluster", "up", "--workers", "1", "--worker-cpus", "2")
    assert r.returncode == 0, (r.stdout, r.stderr)
    t_up = time.time() - t0
    state = json.loads((d / "cluster.json").read_text())
    first_id = state["cluster_id"]
    try:
        assert "Prometheus file_sd: " in r.stdout and "ray job list" in r.stdout, r.stdout
        # Each node its own Ray temp folder.
        assert f"--temp-dir={state['temp_dir']}-w0" in state["procs"][1]["cmdline"]
        # The README's `ray job list` line works as printed.
        line = next(x for x in r.stdout.splitlines() if "ray job list" in x).split(": ", 1)[1]
        lj = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=120,
                            env={**env, "PATH": f"{pathlib.Path(sys.executable).parent}:{env['PATH']}"})
        assert lj.returncode == 0, lj.stderr[-2000:]
        # `serve status` with no flags and no RAY_ADDRESS reaches the cluster `cluster up` saved (its
        # dashboard, with this cluster's own token file).
        st = _cli(env, "serve", "status", "--json")
        assert st.returncode == 0 and json.loads(st.stdout) == {"applications": {}}, (st.stdout, st.stderr)

        # 1. A failing plug-in (model.target) job: its driver on the head, its workers on the worker
        #    node, whose agent extracts the job's working_dir package (the plug-in is imported there
        #    before it fails). Its cause (not a bare FileNotFoundError) and where to look. A plug-in job
        #    that succeeds across hosts: test_faults_cluster.py::test_plugin_model_job_runs_across_hosts.
        plug = tmp_path / "plug"
        (plug / "failing").mkdir(parents=True)
        (plug / "failing" / "__init__.py").write_text("")
        (plug / "failing" / "boom.py").write_text(FAILING_PLUGIN)
        spec = (ROOT / "jobs/plugin_lstm.yaml").read_text().replace("my_models.lstm_lm:build", "failing.boom:build")
        (plug / "fail.yaml").write_text(spec)
        t2 = time.time()
        r = _cli(env, "submit", str(plug / "fail.yaml"), "--follow", "--set", "name=plugin-fail",
                 "--set", f"storage.path={tmp_path / 'runs'}",
                 "--set", "train.steps=4", "--set", "train.warmup_steps=1", "--set", "checkpoint.max_failures=0", timeout=300)
        t_fail = time.time() - t2
        assert r.returncode == 1, (r.stdout[-3000:], r.stderr[-2000:])
        job = r.stdout.strip().splitlines()[0]
        logs = _cli(env, "logs", job).stdout
        assert "/nonexistent/weights.bin" in logs, logs[-3000:]
        assert f"raybig logs {job}" in logs and "job-driver-" in logs, logs[-3000:]

        # 2. Partly dead: the worker node's `ray start` dies outright (its children live on).
        worker = state["procs"][1]["pid"]
        os.kill(worker, signal.SIGKILL)
        time.sleep(0.5)
        r = _cli(env, "cluster", "status")
        assert r.returncode != 0 and "partly or fully down" in r.stderr + r.stdout, (r.stdout, r.stderr)
        t3 = time.time()
        r = _cli(env, "cluster", "up", "--workers", "0")
        assert r.returncode == 0, (r.stdout, r.stderr)
        t_reup = time.time() - t3
        assert "cleaned up the partly dead cluster" in r.stdout and "stopped 1 node process(es)" in r.stdout, r.stdout
        assert _marked(first_id) == [], "processes of the first cluster survived its clean-up"
        second_id = json.loads((d / "cluster.json").read_text())["cluster_id"]
        assert _marked(second_id), "the new cluster's processes are not marked"
    finally:
        r = _cli(env, "cluster", "down")
    assert r.returncode == 0 and r.stdout.startswith("down: "), (r.stdout, r.stderr)
    assert _marked(first_id) == [] and _marked(second_id) == [], "cluster processes survived `down`"
    assert not (tmp_path / "home" / "address").exists()
    r = _cli(env, "cluster", "down")
    assert "no local cluster is up" in r.stdout, r.stdout
    print(f"\n[cluster-cli] up {t_up:.1f}s; failing job {t_fail:.1f}s; "
          f"up over a partly dead cluster {t_reup:.1f}s")


@pytest.mark.ray
def test_a_gang_that_can_never_fit_is_refused_at_once(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = _env(tmp_path)
    env.pop("RAY_AUTH_TOKEN_PATH")  # an embedded Ray makes its own token; a path to no file would fail it
    t0 = time.time()
    r = _cli(env, "run", "jobs/debug.yaml", "--set", "resources.gpus_per_worker=1",
             "--set", f"storage.path={tmp_path / 'runs'}", timeout=120)
    took = time.time() - t0
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert "needs 2 workers × {CPU: 1, GPU: 1}; this Ray has GPU: 0" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and took < 60, (took, r.stderr[-2000:])
    assert "Token authentication is enabled" not in r.stderr, r.stderr[-2000:]  # Ray's warning, every run

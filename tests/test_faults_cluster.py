"""Faults on a real multi-host cluster: a head and two worker hosts, each in its own network namespace
with its own IP (raybig.testing.netns_cluster), joined by a bridge. One cluster serves the whole module.

Each worker host carries one `rbnode` resource and jobs ask for one per training worker, so a 2-worker
ZeRO gang always spans both worker hosts; removing one host breaks the gang mid-run.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from raybig.testing.netns_cluster import NetnsCluster, unavailable_reason
from raybig.train.checkpoints import latest_checkpoint, verify

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.cluster, pytest.mark.slow]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsCluster]:
    why = unavailable_reason()
    if why:
        pytest.skip(f"multi-host netns cluster unavailable: {why}")
    d = tmp_path_factory.mktemp("netns")
    c = NetnsCluster(dir=str(d / "c"), workers=2, worker_resources={"rbnode": 1},
                     env={"DS_ACCELERATOR": "cpu", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
                          "RAYBIG_HOME": str(d / "home")})
    try:
        c.up()
        yield c
    finally:
        c.down()


def _env(c: NetnsCluster) -> dict[str, str]:
    return {**c.client_env(), "RAYBIG_HOME": str(pathlib.Path(c.dir).parent / "home")}


def _submit(c: NetnsCluster, runs: pathlib.Path, name: str, *sets: str, follow: bool = False) -> str:
    args = [sys.executable, "-m", "raybig", "submit", str(ROOT / "jobs/debug.yaml"),
            "--set", f"name={name}", "--set", f"storage.path={runs}", "--set", "sample.max_new_tokens=0",
            "--set", "resources.custom={rbnode: 1}"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args + (["--follow"] if follow else []), capture_output=True, text=True,
                       env=_env(c), timeout=400, cwd=str(ROOT))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r.stdout.strip().splitlines()[0]


def _status(c: NetnsCluster, job: str) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "raybig", "status", job, "--json"], capture_output=True,
                       text=True, env=_env(c), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _wait_terminal(c: NetnsCluster, job: str, timeout: float = 300, seen: dict[str, float] | None = None
                   ) -> dict[str, Any]:
    """Poll `raybig status` until the job ends; `seen` gets when each metric key first showed up."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = _status(c, job)
        if seen is not None:
            for k in v.get("metrics") or {}:
                seen.setdefault(k, time.time())
        if v["state"] in TERMINAL:
            return v
        time.sleep(1)
    raise TimeoutError(f"job {job} still {v['state']} after {timeout}s: {v}")


def _logs(c: NetnsCluster, job: str) -> str:
    r = subprocess.run([sys.executable, "-m", "raybig", "logs", job], capture_output=True, text=True,
                       env=_env(c), timeout=120)
    return r.stdout


def _train_worker_ips(c: NetnsCluster) -> dict[str, str]:
    """actor id -> host IP of every RayTrainWorker the cluster has seen (dead ones included),
    from the State API over the dashboard (token-authenticated HTTP)."""
    q = urllib.parse.urlencode({"detail": "1", "limit": "1000", "filter_keys": "class_name",
                                "filter_predicates": "=", "filter_values": "RayTrainWorker"})
    data = json.loads(urllib.request.urlopen(c._req(f"/api/v0/actors?{q}"), timeout=30).read())
    nodes = json.loads(urllib.request.urlopen(c._req("/nodes?view=summary"), timeout=30).read())
    ip_of = {n["raylet"]["nodeId"]: n["raylet"]["nodeManagerAddress"] for n in nodes["data"]["summary"]}
    return {a["actor_id"]: ip_of.get(a["node_id"], a["node_id"]) for a in data["data"]["result"]["result"]}


def _ckpt_step(path: str) -> int:
    return int(pathlib.Path(path, "latest").read_text().strip().rsplit("_", 1)[1])


def _wait_registered(run_dir: pathlib.Path, job: str, c: NetnsCluster, timeout: float = 180) -> int:
    """Until Ray Train has registered a checkpoint (folders on disk that it has not registered yet are
    not resumed from); returns its step."""
    deadline = time.time() + timeout
    while (ck := latest_checkpoint(str(run_dir))) is None:
        assert time.time() < deadline, (f"no checkpoint registered in {timeout}s", _status(c, job))
        time.sleep(0.2)
    return _ckpt_step(ck)


def _restore_all(c: NetnsCluster, restart: tuple[int, ...] = ()) -> None:
    """Put every host back (a later test needs the full cluster); hosts in `restart` get a fresh node
    (one Ray declared dead while unplugged cannot rejoin)."""
    for i, h in enumerate(c.hosts):
        c.restore_link(i)
        if i in restart or not c._running(h):
            c.kill_host(i)  # leftovers of a half-dead host
            c.start_host(i)
    c.wait_nodes(len(c.hosts), 90)


def test_zero3_job_spans_hosts_and_resumes_from_checkpoint_when_a_lost_host_returns(cluster, tmp_path):
    """A ZeRO-3 gang with one rank on each worker host (their own IPs); one host's Ray node is killed
    mid-run, and a replacement joins at the same address: Ray Train restarts the gang from the last
    registered checkpoint and the run ends with every step accounted for."""
    c = cluster
    ips = c.node_ips()
    assert ips == sorted(h.ip for h in c.hosts) and len(set(ips)) == 3, ips
    runs = tmp_path / "runs"
    steps = 40
    before = set(_train_worker_ips(c))
    job = _submit(c, runs, "hostloss", f"train.steps={steps}", "checkpoint.every=5", "train.eval_every=20",
                  "train.log_every=1", "checkpoint.max_failures=2", "deepspeed.zero_stage=3")
    try:
        registered = _wait_registered(runs / "hostloss", job, c)
        hosts = {ip for a, ip in _train_worker_ips(c).items() if a not in before}
        assert hosts == {c.hosts[1].ip, c.hosts[2].ip}, hosts  # one rank on each worker host
        t_kill = time.time()
        c.kill_host(2)  # the whole worker host: raylet, workers, agents
        c.wait_nodes(2, 60)
        t_dead = time.time()
        c.start_host(2)  # capacity returns (a replacement machine at the same address)
        c.wait_nodes(3, 90)
        t_back = time.time()
        seen: dict[str, float] = {}
        v = _wait_terminal(c, job, seen=seen)
        t_done = time.time()
        (tmp_path / "job.log").write_text(_logs(c, job))
    finally:
        _restore_all(c)
    assert v["state"] == "SUCCEEDED", v
    m = v["metrics"]
    # Resumed from the checkpoint registered before the kill (or a newer one registered meanwhile).
    assert m["step"] == steps and registered <= m.get("restored_step", -1) < steps, (registered, m)
    assert v.get("attempt") in (None, 1), v  # Ray Train's own restart, not a scheduler retry
    hist = [json.loads(x) for x in (runs / "hostloss" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == list(range(steps + 1)), "a step is missing after the resume"
    final = latest_checkpoint(str(runs / "hostloss"))
    assert final and verify(final).complete and _ckpt_step(final) == steps
    print(f"\nhost loss: declared dead {t_dead - t_kill:.1f}s after the kill, node back "
          f"{t_back - t_dead:.1f}s later, training resumed {seen.get('restored_step', t_done) - t_kill:.1f}s "
          f"after the kill (within ~2 s, status polling), job done {t_done - t_kill:.1f}s after it; "
          f"registered step {registered} at the kill, resumed from step {m['restored_step']}")


def test_unplugged_worker_host_with_no_failures_left_ends_failed_with_a_clear_status(cluster, tmp_path):
    """The other way to lose a host: its cable, not its processes (they live on, unreachable)."""
    c = cluster
    runs = tmp_path / "runs"
    job = _submit(c, runs, "nofail", "train.steps=200", "checkpoint.every=5", "train.eval_every=100",
                  "checkpoint.max_failures=0")
    try:
        _wait_registered(runs / "nofail", job, c)
        t_cut = time.time()
        c.cut_link(1)
        v = _wait_terminal(c, job, timeout=180)
        t_failed = time.time()
        (tmp_path / "job.log").write_text(_logs(c, job))
    finally:
        _restore_all(c, restart=(1,))
    assert v["state"] == "FAILED", v
    err = v.get("error") or ""
    # One line naming what happened: restarts spent, the host lost (Train's health check may see it
    # before Ray declares the node dead, whichever comes first), which host.
    lost = "node has died" in err or "health check failed" in err
    assert "max_failures=0" in err and lost and c.hosts[1].ip in err, v
    assert v["metrics"]["step"] < 200, v
    print(f"\nunplugged, no failures left: FAILED {t_failed - t_cut:.1f}s after the cut; error: {err[:300]}")


def test_plugin_model_job_runs_across_hosts(cluster, tmp_path):
    """A `model.target` plug-in (jobs/my_models) travels as the job's working_dir to hosts with their
    own IPs and temp folders, and trains there (one rank on each worker host)."""
    c = cluster
    runs = tmp_path / "runs"
    args = [sys.executable, "-m", "raybig", "submit", str(ROOT / "jobs/plugin_lstm.yaml"), "--follow",
            "--set", f"storage.path={runs}", "--set", "resources.custom={rbnode: 1}",
            "--set", "train.steps=4", "--set", "train.warmup_steps=1", "--set", "train.eval_every=4",
            "--set", "checkpoint.every=4", "--set", "data.max_tokens=200000"]
    t0 = time.time()
    r = subprocess.run(args, capture_output=True, text=True, env=_env(c), timeout=400, cwd=str(ROOT))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-2000:])
    job = r.stdout.strip().splitlines()[0]
    v = _status(c, job)
    assert v["state"] == "SUCCEEDED" and v["metrics"]["step"] == 4, v
    print(f"\nplug-in job across hosts: {time.time() - t0:.1f}s")


def test_submit_checks_a_local_storage_path_on_every_host(cluster, tmp_path):
    """Issue 18.4: `raybig submit` checks for real that a local storage.path is shared: the head writes a
    marker there and each worker host reads it back (these namespaces share one disk, so it passes;
    the refusal's wording is tested without a cluster in tests/test_queue_storage_check.py)."""
    c = cluster
    runs = tmp_path / "shared-runs"
    code = ("import json, sys\nfrom raybig.scheduler.storage_check import check_shared\n"
            "r = check_shared(sys.argv[1])\nprint(json.dumps(r.__dict__ if r else None))")
    r = subprocess.run([sys.executable, "-c", code, str(runs)], capture_output=True, text=True, env=_env(c),
                       timeout=200, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found and found["wrote"] and len(found["nodes"]) == 2, found
    assert set(found["nodes"].values()) == {"ok"}, found
    assert not list(runs.glob(".raybig-shared-*"))  # the marker is removed
    job = _submit(c, runs, "storage-checked")
    subprocess.run([sys.executable, "-m", "raybig", "stop", job], capture_output=True, text=True, env=_env(c),
                   timeout=120, cwd=str(ROOT))

"""Cluster submission and the scheduler, against a real `ray start --head` with token auth on.

One head per module (`raybig.cluster.local.LocalCluster`: its own ports, temp dir and token file,
stopped by PID). It has 3 logical CPUs, so one 2-worker job (2 x 1 CPU + 0.5 CPU for the driver)
runs at a time and the others queue. Jobs go through the real path: `raybig submit` -> Ray Jobs API
-> holder entrypoint -> scheduler actor -> `run_spec`.
"""

from __future__ import annotations

import base64
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from scheduler_fakes import attached_local_cluster

ROOT = pathlib.Path(__file__).resolve().parent.parent
RAY = str(pathlib.Path(sys.executable).parent / "ray")

pytestmark = [pytest.mark.cluster, pytest.mark.ray]

PROBE = """kind: probe
name: {name}
resources: {{workers: 2, cpus_per_worker: 1}}
seconds: {seconds}
fail_attempts: {fail}
max_retries: {retries}
"""


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    with attached_local_cluster(tmp_path_factory.mktemp("cluster"),
                                {"RAYBIG_RETRY_BACKOFF_S": "0.3", "RAYBIG_SCHED_TICK_S": "0.3",
                                 "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60"}) as c:
        yield c


def cli(c, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = {**os.environ, "RAY_ADDRESS": c.address, **(env or {})}
    return subprocess.run([sys.executable, "-m", "raybig", *args], capture_output=True, text=True,
                          env=e, timeout=timeout, cwd=str(ROOT))


def probe(c, name: str, seconds: float = 1, fail: int = 0, retries: int = 0) -> str:
    p = c.tmp / f"{name}.yaml"
    p.write_text(PROBE.format(name=name, seconds=seconds, fail=fail, retries=retries))
    return str(p)


def submit(c, spec: str, *extra: str, env: dict[str, str] | None = None) -> str:
    r = cli(c, "submit", spec, *extra, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


def states(c, job_id: str) -> list[dict]:
    """Every state line the job's holder printed, in order."""
    from raybig.scheduler import client
    from raybig.scheduler.meta import STATE_PREFIX

    out = []
    for line in client.logs(job_id, c.address).splitlines():
        i = line.find(STATE_PREFIX)
        if i >= 0:
            out.append(json.loads(line[i + len(STATE_PREFIX):]))
    return out


def ray_status(c, job_id: str) -> str:
    from raybig.cluster.jobs import call, connect

    client, url = connect(c.address)
    return str(call(url, client.get_job_status, job_id).value)


def wait_for(pred, timeout: float = 120, every: float = 0.5, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def wait_done(c, job_id: str, timeout: float = 180) -> str:
    return wait_for(lambda: (s := ray_status(c, job_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                    timeout, what=f"{job_id} to end")


def started_at(c, job_id: str) -> list[float]:
    return [s["t"] for s in states(c, job_id) if s["state"] == "RUNNING"]


def on_cluster(c, code: str) -> str:
    """Run a snippet in a fresh Python attached to the test cluster (this process may hold another Ray)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    pre = (f"import json, ray; ray.init(address={c.gcs_address!r}, logging_level='ERROR', "
           "log_to_driver=False)\n")
    r = subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


SNAPSHOT = ("from raybig.scheduler.meta import ACTOR_NAME, NAMESPACE\n"
            "a = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)\n"
            "print(json.dumps(ray.get(a.snapshot.remote())))")


def fast_submit(c, spec_path: str, *overrides: str) -> str:
    """The library path `raybig submit` uses, without a CLI start-up per job (keeps queue tests tight)."""
    from raybig.scheduler import client
    from raybig.spec import load_spec

    spec = load_spec(spec_path, list(overrides))
    return client.submit(spec, os.path.dirname(spec_path), c.address)[0]


def test_train_job_submit_follow_status_logs(cl, tmp_path):
    """A real training job through `raybig submit --follow`; status shows its progress; Ray's own
    `ray job list` sees it."""
    r = cli(cl, "submit", str(ROOT / "jobs/debug.yaml"), "--follow", "--set", f"storage.path={tmp_path}",
            "--set", "sample.max_new_tokens=0", "--set", "train.steps=4", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    train = r.stdout.strip().splitlines()[0]
    assert train.startswith("raybig-debug-") and "[raybig] metrics" in r.stdout
    view = json.loads(cli(cl, "status", train, "--json").stdout)
    assert view["state"] == "SUCCEEDED" and view["metrics"]["step"] == 4, view
    assert (tmp_path / "debug" / "run.json").exists()
    # One result shape: the job's result is the TrainResult `raybig run --json` prints and the run
    # directory rebuilds.
    from raybig.train.result import TrainResult

    rebuilt = TrainResult.from_run_dir(str(tmp_path / "debug")).to_json()
    assert set(view["result"]) == set(rebuilt) and view["result"]["steps"] == rebuilt["steps"] == 4, view
    assert view["result"]["export_dir"] == rebuilt["export_dir"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    rl = subprocess.run([RAY, "job", "list", "--address", cl.address], capture_output=True, text=True,
                        env=env, timeout=60)
    assert rl.returncode == 0 and train in rl.stdout, rl.stderr[-1000:]
    listed = json.loads(cli(cl, "list", "--all", "--json").stdout)
    assert any(v["job_id"] == train and v["state"] == "SUCCEEDED" for v in listed)


def test_queued_jobs_wait_say_why_and_run_by_priority(cl):
    """With room for one job at a time, jobs of priorities 1, 5 and 3 wait behind a running one,
    say why, and run in the order 5, 3, 1 once it stops."""
    blocker = submit(cl, probe(cl, "blocker0", seconds=600), "--priority", "100")
    wait_for(lambda: started_at(cl, blocker), 120, what="blocker RUNNING")
    ids = {p: fast_submit(cl, probe(cl, f"pri{p}"), f"priority={p}") for p in (1, 5, 3)}

    def waiting_reason():
        from raybig.scheduler import client

        v = client.get_view(ids[1], cl.address)
        return v if v.state == "QUEUED" and v.reason == "waiting for 2.5 CPU; 2 jobs ahead" else None

    v1 = wait_for(waiting_reason, 60, what="a queue reason")
    assert v1.position == 3 and v1.reason == "waiting for 2.5 CPU; 2 jobs ahead", v1
    q = cli(cl, "queue", "--json")
    assert q.returncode == 0, q.stderr
    order = [v["job_id"] for v in json.loads(q.stdout) if v["state"] in ("QUEUED", "PENDING")]
    assert order == [ids[5], ids[3], ids[1]]
    st = cli(cl, "status", ids[1])
    assert "queue position 3" in st.stdout and "2 jobs ahead" in st.stdout, st.stdout
    assert cli(cl, "stop", blocker).returncode == 0
    for i in ids.values():
        assert wait_done(cl, i) == "SUCCEEDED"
    t = {p: started_at(cl, i) for p, i in ids.items()}
    assert all(len(v) == 1 for v in t.values()), t  # each ran exactly once
    assert t[5][0] < t[3][0] < t[1][0], t


def test_failing_job_is_retried_then_failed(cl):
    job = fast_submit(cl, probe(cl, "flaky", seconds=0.2, fail=10, retries=2))
    assert wait_done(cl, job, 120) == "FAILED"
    assert len(started_at(cl, job)) == 3  # the first attempt + max_retries
    r = cli(cl, "status", job)
    assert "FAILED" in r.stdout and "probe failure on attempt 3" in r.stdout, r.stdout

    def listed_cause():  # from the scheduler's board: with no log read allowed
        a = cli(cl, "list", "--all", "--json", env={"RAYBIG_LOG_FALLBACK_MAX": "0"})
        x = {x["job_id"]: x for x in json.loads(a.stdout)}.get(job)
        return x if x and "probe failure on attempt 3" in x["error"] else None

    wait_for(listed_cause, 30, every=1, what="the failed job's cause in list --all")


def test_stop_queued_and_running_jobs_frees_resources(cl):
    blocker = submit(cl, probe(cl, "blocker", seconds=300))
    wait_for(lambda: started_at(cl, blocker), 60, what="blocker RUNNING")
    queued = fast_submit(cl, probe(cl, "queued", seconds=1))
    wait_for(lambda: any(s["state"] == "QUEUED" for s in states(cl, queued)), 60, what="queued")
    r = cli(cl, "stop", queued)
    assert r.returncode == 0 and "STOPPED" in r.stdout, r.stderr
    assert not started_at(cl, queued)  # it never ran
    # Ray's own CLI stops a raybig job too, and its placement group goes with it.
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    rs = subprocess.run([RAY, "job", "stop", blocker, "--address", cl.address],
                        capture_output=True, text=True, env=env, timeout=60)
    assert rs.returncode == 0, rs.stderr[-1000:]
    assert wait_done(cl, blocker, 60) == "STOPPED"
    free = lambda: json.loads(on_cluster(cl, "print(json.dumps(ray.available_resources()))"))  # noqa: E731
    wait_for(lambda: free().get("CPU", 0) >= 3, 30, every=1, what="all 3 CPUs free again")
    # --follow streams until the job ends.
    job = fast_submit(cl, probe(cl, "followed", seconds=0.5))
    f = cli(cl, "logs", job, "--follow")
    assert f.returncode == 0 and "probe holds 2 bundle(s)" in f.stdout, f.stdout[-2000:]


def test_a_planted_secret_never_reaches_rays_job_info(cl, tmp_path):
    """A secret-looking ${VAR} travels as ${VAR}: Ray's own record of the job (entrypoint, runtime_env,
    metadata, as `ray job list` and the dashboard show it) never holds its value."""
    from raybig.cluster.jobs import call, connect

    secret = "s3cr3t-planted-9f2c"
    spec = tmp_path / "secret.yaml"
    spec.write_text((ROOT / "jobs" / "debug.yaml").read_text().replace(
        "sample: {max_new_tokens: 20}", "sample: {max_new_tokens: 20, prompt: '${HUB_TOKEN}'}")
        .replace("storage: {path: ./runs}", f"storage: {{path: {tmp_path}/runs}}"))
    job = submit(cl, str(spec), "--priority", "-5", env={"HUB_TOKEN": secret})
    try:
        client, url = connect(cl.address)
        info = call(url, client.get_job_info, job)
        seen = json.dumps({"entrypoint": info.entrypoint, "runtime_env": info.runtime_env,
                           "metadata": info.metadata}, default=str)
        frozen = base64.b64decode(info.runtime_env["env_vars"]["RAYBIG_SPEC_B64"]).decode()
        assert "prompt: ${HUB_TOKEN}" in frozen, frozen  # travels as the reference, resolved on the cluster
        assert secret not in seen and secret not in frozen, seen[:2000]
        listed = cli(cl, "list", "--all", "--json")
        assert listed.returncode == 0 and secret not in listed.stdout
    finally:
        cli(cl, "stop", job)


def test_a_sweep_waits_until_all_its_concurrent_trial_gangs_fit(cl, tmp_path):
    """A sweep's demand is its driver plus max_concurrent_trials trial gangs: with room for one trial
    but not two it stays QUEUED (its trials never wait inside Ray); once both fit it is admitted."""
    bp = cl.tmp / "half.yaml"  # a 1-worker, 0.5-CPU probe: 1 CPU held with its driver, 2 of 3 free
    bp.write_text(PROBE.format(name="half", seconds=600, fail=0, retries=0).replace("cpus_per_worker: 1",
                                                                                    "cpus_per_worker: 0.5")
                  .replace("workers: 2", "workers: 1"))
    blocker = submit(cl, str(bp))
    wait_for(lambda: started_at(cl, blocker), 60, what="blocker RUNNING")
    sweep = tmp_path / "sweep.yaml"
    # Each trial: 1 worker x 1 CPU + its 0.01-CPU trainable; the sweep: 2 of them + a 0.5-CPU driver
    # = 2.52 CPU. One trial (1.51 CPU) would fit the 2 free CPUs; two do not.
    base = tmp_path / "base.yaml"
    base.write_text((ROOT / "jobs" / "debug.yaml").read_text().replace("workers: 2", "workers: 1"))
    sweep.write_text(f"kind: sweep\nname: two-trials\nbase: {base}\n"
                     "search: {train.lr: {choice: [0.001, 0.002]}}\nalgorithm: grid\nnum_samples: 2\n"
                     "max_concurrent_trials: 2\nscheduler: none\n"
                     f"storage: {{path: {tmp_path}/runs}}\n")
    sid = fast_submit(cl, str(sweep))

    def queued_reason():
        from raybig.scheduler import client

        v = client.get_view(sid, cl.address)
        return v if v.state == "QUEUED" and v.reason and "CPU" in v.reason else None

    v = wait_for(queued_reason, 60, what="the sweep's queue reason")
    assert v.reason.startswith("waiting for 2.52 CPU"), v.reason
    time.sleep(2)  # several scheduler ticks: still not admitted with room for only one trial
    assert not started_at(cl, sid)
    assert cli(cl, "stop", blocker).returncode == 0
    wait_for(lambda: started_at(cl, sid), 60, what="the sweep admitted once two trial gangs fit")
    r = cli(cl, "stop", sid)
    assert r.returncode == 0, r.stderr
    assert wait_done(cl, sid, 120) == "STOPPED"


def test_scheduler_restart_loses_nothing_and_runs_each_once(cl):
    """SIGKILL the scheduler actor while one job RUNS and two are QUEUED, and submit a fourth while
    it is down. Every job must still succeed, run exactly once (one RUNNING line, one probe side
    effect, one SUCCEEDED line), in priority order, and no queued job may start while the running
    one still holds its gang (a restarted scheduler that forgot it would double-book the CPUs)."""
    hold = 12  # long enough that the blocker is surely still running at the kill
    blocker = submit(cl, probe(cl, "before-crash", seconds=hold), "--priority", "100")
    # Queued right away (not after the blocker starts): their holders start while it runs, so the
    # kill lands early in its hold. Priority 100 makes it the head; 2.5 + 2.5 CPU > 3: no backfill.
    low = fast_submit(cl, probe(cl, "low", seconds=0.5), "priority=1")
    high = fast_submit(cl, probe(cl, "high", seconds=0.5), "priority=2")
    wait_for(lambda: started_at(cl, blocker), 60, what="blocker RUNNING")
    wait_for(lambda: all(any(s["state"] == "QUEUED" for s in states(cl, j)) for j in (low, high)), 60,
             what="both queued")
    before = json.loads(on_cluster(cl, SNAPSHOT))
    assert before["regs"][blocker] == {"phase": "running", "admitted": True}, before["regs"]
    assert all(before["regs"][j] == {"phase": "waiting", "admitted": False} for j in (low, high)), before
    t_kill = time.time()
    os.kill(before["pid"], signal.SIGKILL)  # the actor process is on this machine: a hard crash
    late = fast_submit(cl, probe(cl, "during-crash", seconds=0.5))  # submitted as the scheduler restarts
    jobs = (blocker, high, low, late)
    for j in jobs:
        assert wait_done(cl, j, 120) == "SUCCEEDED"
    after = json.loads(on_cluster(cl, SNAPSHOT))
    assert after["pid"] != before["pid"] and after["started"] > before["started"]
    logs = {j: states(cl, j) for j in jobs}
    t = {j: [s["t"] for s in v if s["state"] == "RUNNING"] for j, v in logs.items()}
    assert all(len(v) == 1 for v in t.values()), t
    assert all([s["state"] for s in v].count("SUCCEEDED") == 1 for v in logs.values()), logs
    from raybig.scheduler import client

    holds = {j: client.logs(j, cl.address).count("probe holds") for j in jobs}  # the run's side effect
    assert all(n == 1 for n in holds.values()), holds
    done = next(s["t"] for s in logs[blocker] if s["state"] == "SUCCEEDED")
    assert t[blocker][0] < t_kill < done, (t[blocker], t_kill, done)  # it was running at the kill
    assert t[high][0] >= t[blocker][0] + hold, (t[blocker], t[high])  # nobody jumped into its gang
    assert t[blocker][0] < t[high][0] < t[low][0] < t[late][0], t
    last = max(next(s["t"] for s in v if s["state"] == "SUCCEEDED") for v in logs.values())
    print(f"\n[fault-scheduler] kill {t_kill - t[blocker][0]:.1f}s into the blocker's run; it ended "
          f"{done - t_kill:.1f}s later; next admission {t[high][0] - done:.2f}s after that; "
          f"all 4 done {last - t_kill:.1f}s after the kill")


def test_clear_one_line_errors(cl, tmp_path):
    from raybig.cluster.ray_env import free_port

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: probe\nname: bad\nsecnds: 3\n")
    cases = [
        (("submit", str(bad)), {}, 2, "did you mean"),
        (("list", "--address", f"http://127.0.0.1:{free_port()}"), {}, 3, "cannot reach"),
        (("list",), {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"), "HOME": str(tmp_path)}, 3, "token"),
        (("list",), {"RAY_AUTH_TOKEN": "0" * 64}, 3, "wrong token"),
        (("status", "raybig-no-such-job"), {}, 3, "no job 'raybig-no-such-job'"),
        (("stop", "raybig-no-such-job"), {}, 3, "no job"),
    ]
    for args, env, code, text in cases:
        r = cli(cl, *args, env=env, timeout=60)
        err = r.stderr.strip()
        assert r.returncode == code, (args, r.returncode, err)
        assert text in err and "Traceback" not in err, (args, err)
        assert len([ln for ln in err.splitlines() if ln.startswith("error")]) >= 1


def test_serve_submit_status_down_find_the_saved_cluster_with_no_flags(cl, tmp_path):
    """After `raybig cluster up` saved its address (here: the same call on this module's cluster),
    `submit serve.yaml`, `serve status` and `serve down` all reach that cluster with no --address and
    no RAY_ADDRESS."""
    import torch

    from raybig.cluster.connect import address_file, save_address
    from raybig.cluster.ray_env import free_port
    from raybig.model import GPT, GPTConfig
    from raybig.spec.models import PRESETS
    from raybig.train.export import write_export

    save_address(cl.address)  # what `raybig cluster up` does
    assert address_file().parent == pathlib.Path(os.environ["RAYBIG_HOME"])
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(**{**PRESETS["gpt-debug"], "block_size": 256}))  # serving needs weights, not training
    export = write_export(str(tmp_path / "run"), gpt.state_dict(), gpt.config.to_dict(), tied=GPT.tied_keys)
    spec = tmp_path / "serve.yaml"
    spec.write_text(f"kind: serve\nname: t-saved\ncheckpoint: {export}\nroute_prefix: /t-saved\n"
                    f"port: {free_port()}\nresources: {{num_cpus: 0.25}}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DASHBOARD_ADDRESS")}

    def bare(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raybig", *args], capture_output=True, text=True,
                              env=env, timeout=120, cwd=str(tmp_path))

    r = bare("submit", str(spec))
    assert r.returncode == 0 and cl.address in r.stderr, r.stderr[-2000:]

    def app():
        s = bare("serve", "status", "--json")
        assert s.returncode == 0, s.stderr[-2000:]
        return json.loads(s.stdout)["applications"].get("t-saved")

    assert wait_for(lambda: (a := app()) and a["status"] == "RUNNING" and a, 180, every=2, what="t-saved RUNNING")
    d = bare("serve", "down", "t-saved")
    assert d.returncode == 0 and "removed t-saved" in d.stdout, d.stderr[-2000:]
    wait_for(lambda: app() is None, 60, every=1, what="t-saved removed")


def test_queue_board_quota_and_a_gang_that_can_never_fit(cl):
    """`raybig queue/list` from the scheduler's board with no log read (issue 19); a gang bigger than
    any node: a warning at submit and a reason naming what is missing (issue 20); quotas set and read
    with `raybig queue quota` (issue 18)."""
    no_logs = {"RAYBIG_LOG_FALLBACK_MAX": "0"}  # without the board nothing would say QUEUED or why
    huge = cl.tmp / "huge.yaml"
    huge.write_text(PROBE.format(name="huge", seconds=1, fail=0, retries=0).replace("cpus_per_worker: 1",
                                                                                      "cpus_per_worker: 8"))
    r = cli(cl, "submit", str(huge))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "can never fit this cluster's current nodes: a bundle needs 8 CPU; the most one node has is 3 CPU" \
        in " ".join(r.stderr.split()), r.stderr
    job = r.stdout.strip().splitlines()[-1]

    def listed():
        q = cli(cl, "queue", "--json", env=no_logs)
        assert q.returncode == 0, q.stderr[-2000:]
        v = {x["job_id"]: x for x in json.loads(q.stdout)}.get(job)
        return v if v and v["state"] == "QUEUED" and "can never fit" in v["reason"] else None

    v = wait_for(listed, 60, every=1, what="the never-fitting job's reason on the board")
    assert "a bundle needs 8 CPU; the most one node has is 3 CPU" in v["reason"], v
    assert cli(cl, "stop", job).returncode == 0

    assert cli(cl, "queue", "quota", "tester", "CPU=1", "memory=1GiB").returncode == 0

    def quotas():
        q = cli(cl, "queue", "quota", "--json")
        return q.returncode == 0 and json.loads(q.stdout)["quotas"].get("tester")

    assert wait_for(quotas, 30, every=1, what="the quota on the board") == {"CPU": 1.0, "memory": 2.0**30}
    bad = cli(cl, "queue", "quota", "tester", "CPU=-2")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert cli(cl, "queue", "quota", "tester", "--clear").returncode == 0
    wait_for(lambda: not quotas(), 30, every=1, what="the quota cleared")

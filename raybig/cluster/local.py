"""A real local multi-node Ray cluster: a head and N worker nodes, each its own `ray start --block`.

Every process gets explicit ports (so clusters never clash with each other or with an embedded Ray),
the dashboard binds 127.0.0.1, token auth is on, and each node has its own Ray temp folder (nodes
sharing one would re-extract a job's working_dir package under each other's running processes).
State (PIDs, ports, address) is kept in `<dir>/cluster.json` (default under `$RAYBIG_HOME`) so
`status`/`down` work from a new shell.

Stopping is careful (never `ray stop`): each `ray start` is recorded with its command line and start
time, and is signalled only while both still match (a PID the system has since given to another
process is left alone); every process the cluster started carries `RAYBIG_CLUSTER_ID=<id>` in its
environment, which finds the ones a dead `ray start` left behind.
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from raybig.cluster.connect import local_cluster_dir, token_path
from raybig.cluster.ray_env import dashboard_host, free_port


def default_dir() -> pathlib.Path:
    """`$RAYBIG_HOME/cluster` (see `raybig.cluster.connect`)."""
    return local_cluster_dir()


def default_token_path() -> str:
    """Where Ray itself looks for the token (so `ray job ...` and raybig both find it)."""
    return str(token_path())


def _ray_bin() -> str:
    return str(pathlib.Path(sys.executable).parent / "ray")


def _port_range(n: int = 60) -> tuple[int, int]:
    """A block of worker ports unlikely to collide (free at the moment we look)."""
    import random
    import socket

    for _ in range(50):
        lo = random.randrange(20000, 60000 - n)
        ok = True
        for p in (lo, lo + n // 2, lo + n - 1):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return lo, lo + n - 1
    raise RuntimeError("no free port range")


@dataclass
class LocalCluster:
    """A head and `workers` worker nodes on this machine, each a `ray start --block` process.

    Attributes:
        dir: folder for `cluster.json` (this object, saved) and each process's log.
        workers: worker nodes besides the head.
        head_cpus / worker_cpus: logical CPUs each node advertises.
        env: extra environment for every Ray process.
        procs: each `ray start` process: `{"pid", "cmdline", "create_time", "role"}`.
        cluster_id: marks every process of this cluster (`RAYBIG_CLUSTER_ID` in its environment).
        token_path: the auth-token file every node and client reads.
        temp_dir: the head's Ray temp folder; worker node i uses `<temp_dir>-w<i>`.
    """
    dir: str
    workers: int = 2
    head_cpus: float = 1
    worker_cpus: float = 1
    worker_resources: dict[str, float] = field(default_factory=dict)
    head_resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    procs: list[dict[str, Any]] = field(default_factory=list)
    cluster_id: str = ""
    gcs_port: int = 0
    dashboard_port: int = 0
    token_path: str = ""
    temp_dir: str = ""  # Ray's --temp-dir (session logs live here)
    dashboard_host: str = field(default_factory=dashboard_host)  # 127.0.0.1 unless RAYBIG_DASHBOARD_HOST

    @property
    def pids(self) -> list[int]:
        """The recorded `ray start` PIDs (head first)."""
        return [int(p["pid"]) for p in self.procs]

    @property
    def address(self) -> str:
        """The dashboard (Jobs API) URL clients use."""
        host = self.dashboard_host if self.dashboard_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """`127.0.0.1:PORT` of the head's GCS (what `ray start --address` and `ray.init` take)."""
        return f"127.0.0.1:{self.gcs_port}"

    def _env(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}
        env.pop("RAY_AUTH_TOKEN", None)
        env.pop("RAY_ADDRESS", None)
        env["RAYBIG_CLUSTER_ID"] = self.cluster_id  # inherited by every process Ray starts for us
        # OpenAI-shaped 503s from Serve's proxy on overload / a dead replica (raybig.serve.proxy_errors).
        env.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "raybig.serve.proxy_errors:middlewares")
        # The job supervisor inherits this PATH: put this interpreter first, like an activated venv.
        env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def _common(self, cpus: float, resources: dict[str, float]) -> list[str]:
        lo, hi = _port_range()
        args = ["--block", f"--num-cpus={int(cpus)}", "--num-gpus=0",
                f"--min-worker-port={lo}", f"--max-worker-port={hi}",
                f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                "--object-store-memory=200000000", "--disable-usage-stats"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        return args

    def _spawn(self, args: list[str], log: str) -> int:
        import psutil

        cmd, role = [_ray_bin(), "start", *args], log.removesuffix(".log")
        with open(pathlib.Path(self.dir) / log, "ab") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**self._env(), "RAYBIG_CLUSTER_NODE": role})
        try:  # the fork's start time: the same before and after the exec of `ray`
            created = psutil.Process(p.pid).create_time()
        except psutil.Error:
            created = 0.0  # already gone: never verifiable, so counted as dead
        self.procs.append({"pid": p.pid, "cmdline": cmd, "create_time": created, "role": role})
        self.save()  # at once: a crash during start-up still leaves what `down` needs
        return p.pid

    def up(self, timeout: float = 180) -> LocalCluster:
        """Start the head, then each worker; wait until all nodes are alive; save `cluster.json`.

        Args:
            timeout: seconds each process may take to come up.

        Raises:
            RuntimeError: a Ray process exited during start-up.
            TimeoutError: the dashboard or a node did not come up in time.
        """
        d = pathlib.Path(self.dir)
        d.mkdir(parents=True, exist_ok=True)
        self.cluster_id = self.cluster_id or secrets.token_hex(8)
        if not self.token_path:
            self.token_path = str(d / "auth_token")
        if not self.temp_dir:
            # Short on purpose: Ray's socket paths under it must stay below 107 bytes.
            self.temp_dir = f"/tmp/raybig-{secrets.token_hex(4)}"
        if not pathlib.Path(self.token_path).exists():
            pathlib.Path(self.token_path).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(self.token_path).write_text(secrets.token_hex(32))
            os.chmod(self.token_path, 0o600)
        # Ray gives a raylet a fixed 30 s to register; on an overloaded machine the head can miss
        # that, so one failed start is retried on fresh ports.
        for attempt in range(2):
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            self._spawn(["--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
                         f"--dashboard-host={self.dashboard_host}", f"--dashboard-port={self.dashboard_port}",
                         f"--ray-client-server-port={free_port()}", f"--temp-dir={self.temp_dir}",
                         *self._common(self.head_cpus, self.head_resources)], "head.log")
            try:
                self._wait_http(timeout)
                self.wait_nodes(1, timeout)
                break
            except (RuntimeError, TimeoutError):
                self.down()
                if attempt:
                    raise
                self.cluster_id = secrets.token_hex(8)
        # Workers one at a time (each gets the same 30 s window), each retried once.
        for i in range(self.workers):
            for attempt in range(2):
                # Its own temp folder: see the module docstring.
                pid = self._spawn([f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1",
                                   f"--temp-dir={self.temp_dir}-w{i}",
                                   *self._common(self.worker_cpus, self.worker_resources)], f"worker{i}.log")
                try:
                    self.wait_nodes(2 + i, timeout)
                    break
                except (RuntimeError, TimeoutError):
                    rec = self.procs.pop()
                    if self._verified(rec):
                        _kill_group(pid)
                    self.sweep_leftovers(node=str(rec["role"]))
                    if attempt:
                        self.down()
                        raise
        self.save()
        return self

    def _wait_http(self, timeout: float) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(self._dead()):
                raise RuntimeError(f"ray head exited; see {self.dir}/head.log")
            try:
                urllib.request.urlopen(self._req("/api/version"), timeout=2).read()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        tail = (pathlib.Path(self.dir) / "head.log").read_text(errors="replace")[-1500:]
        raise TimeoutError(f"dashboard at {self.address} did not come up in {timeout}s; head.log ends: {tail}")

    def _req(self, path: str) -> Any:
        import urllib.request

        tok = pathlib.Path(self.token_path).read_text().strip()
        return urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {tok}"})

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes, via the dashboard (token-authenticated HTTP)."""
        import urllib.request

        data = json.loads(urllib.request.urlopen(self._req("/nodes?view=summary"), timeout=5).read())
        summary = data.get("data", {}).get("summary", [])
        return [n for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        """Wait until `n` nodes are alive.

        Raises:
            RuntimeError: a Ray process exited.
            TimeoutError: fewer than `n` after `timeout` seconds.
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._dead():
                raise RuntimeError(f"a ray process exited during start-up; see {self.dir}/*.log")
            try:
                if len(self.nodes()) >= n:
                    return
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.5)
        raise TimeoutError(f"only some of {n} nodes came up; see {self.dir}/*.log")

    @staticmethod
    def _verified(rec: dict[str, Any]) -> bool:
        """`rec`'s process is alive and provably the one we started (same start time, same command line)."""
        return _process_of(rec) is not None

    def _dead(self) -> list[int]:
        """Recorded PIDs that are no longer our running `ray start` (exited, zombie, or reused)."""
        return [int(r["pid"]) for r in self.procs if not self._verified(r)]

    def alive(self) -> bool:
        """Every process this cluster started is still running."""
        return bool(self.procs) and not self._dead()

    def leftovers(self, node: str | None = None) -> list[int]:
        """PIDs of running processes marked with this cluster's id (none for a state file without one).

        Args:
            node: only those of this node (`head`, `worker0`, ...).
        """
        import psutil

        if not self.cluster_id:
            return []
        out: list[int] = []
        me = os.getpid()
        for p in psutil.process_iter():
            if p.pid == me:
                continue
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                env = p.environ()
                if env.get("RAYBIG_CLUSTER_ID") == self.cluster_id and node in (None, env.get("RAYBIG_CLUSTER_NODE")):
                    out.append(p.pid)
            except (psutil.Error, OSError):
                continue
        return out

    def sweep_leftovers(self, sig: int = signal.SIGKILL, node: str | None = None) -> list[int]:
        """Signal every process still marked with this cluster's id (of one `node`); returns their PIDs."""
        pids = self.leftovers(node)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        return pids

    def down(self, timeout: float = 8) -> StopReport:
        """Stop this cluster's processes, and only those: SIGTERM, then SIGKILL after `timeout` seconds.

        SIGTERM goes to the process group of each recorded `ray start --block` that is provably ours
        (it stops its own children), workers first, then the head; after `timeout` (Ray would drain a
        node for 30 s) each such group is SIGKILLed, and so is any process still marked with this
        cluster's id (children a dead `ray start` left behind). A recorded PID that is gone or now
        belongs to another process is not signalled. The state file is then emptied.

        Returns:
            What was stopped and which recorded PIDs were left alone.
        """
        ours = [r for r in self.procs if self._verified(r)]
        foreign = [int(r["pid"]) for r in self.procs if r not in ours and _pid_exists(int(r["pid"]))]
        for r in reversed(ours):
            _signal_group(int(r["pid"]), signal.SIGTERM)
        deadline = time.time() + timeout
        while time.time() < deadline and any(self._verified(r) for r in ours):
            _reap([int(r["pid"]) for r in ours])
            time.sleep(0.3)
        for r in ours:
            if self._verified(r):
                _signal_group(int(r["pid"]), signal.SIGKILL)
        swept = [p for p in self.sweep_leftovers() if p not in {int(r["pid"]) for r in ours}]
        _reap([int(r["pid"]) for r in ours])
        report = StopReport(stopped=[int(r["pid"]) for r in ours], leftovers=swept, left_alone=foreign)
        self.procs = []
        self.save()
        return report

    def save(self) -> None:
        """Write this object to `<dir>/cluster.json` (atomically)."""
        f = pathlib.Path(self.dir) / "cluster.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"cluster.json.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, f)

    @staticmethod
    def load(dir: str | None = None) -> LocalCluster | None:
        """The cluster saved in `dir` (default `$RAYBIG_HOME/cluster`), or None.

        A state file from an older raybig (PIDs without command line and start time) loads with
        records that can never be verified, so nothing of it is ever signalled.
        """
        f = pathlib.Path(dir or default_dir()) / "cluster.json"
        if not f.exists():
            return None
        data = json.loads(f.read_text())
        if "pids" in data and "procs" not in data:
            data["procs"] = [{"pid": p, "cmdline": [], "create_time": 0.0, "role": "?"} for p in data["pids"]]
        known = {x.name for x in fields(LocalCluster)}
        return LocalCluster(**{k: v for k, v in data.items() if k in known})


@dataclass
class StopReport:
    """What `LocalCluster.down` did.

    Attributes:
        stopped: recorded `ray start` PIDs that were ours and were stopped.
        leftovers: other processes marked with the cluster's id that were killed.
        left_alone: recorded PIDs now running something else (not signalled).
    """
    stopped: list[int] = field(default_factory=list)
    leftovers: list[int] = field(default_factory=list)
    left_alone: list[int] = field(default_factory=list)


def _process_of(rec: dict[str, Any]) -> Any:
    """The psutil.Process of `rec` if it is alive and matches its start time and command line, else None."""
    import psutil

    cmd = list(rec.get("cmdline") or [])
    if not cmd or not rec.get("create_time"):
        return None  # nothing to prove ownership with
    try:
        p = psutil.Process(int(rec["pid"]))
        if abs(p.create_time() - float(rec["create_time"])) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        actual = p.cmdline()
    except (psutil.Error, OSError):
        return None
    # `ray` is a script: the kernel runs `python /path/ray start ...` (or, before its exec, our argv).
    if actual == cmd or (len(actual) > len(cmd) - 1 and actual[-(len(cmd) - 1):] == cmd[1:] and cmd[0] in actual):
        return p
    return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return not _is_zombie(pid)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by `pid` (a verified `ray start`, started in its own session)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False

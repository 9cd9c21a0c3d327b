"""A real local multi-node Ray cluster: a head and N worker nodes, each its own `ray start --block`.

Every process gets explicit ports (so clusters never clash with each other or with an embedded Ray),
the dashboard binds 127.0.0.1, token auth is on, and everything is stopped by PID (never `ray stop`).
State (PIDs, ports, address) is kept in `<dir>/cluster.json` so `status`/`down` work from a new shell.
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
from dataclasses import asdict, dataclass, field
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
        pids: the `ray start` processes (stopped by process group).
        token_path: the auth-token file every node and client reads.
    """
    dir: str
    workers: int = 2
    head_cpus: float = 1
    worker_cpus: float = 1
    worker_resources: dict[str, float] = field(default_factory=dict)
    head_resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    pids: list[int] = field(default_factory=list)
    gcs_port: int = 0
    dashboard_port: int = 0
    token_path: str = ""
    temp_dir: str = ""  # Ray's --temp-dir (session logs live here)
    dashboard_host: str = field(default_factory=dashboard_host)  # 127.0.0.1 unless RAYBIG_DASHBOARD_HOST

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
        f = open(pathlib.Path(self.dir) / log, "ab")  # noqa: SIM115 - kept open for the child
        p = subprocess.Popen([_ray_bin(), "start", *args], stdout=f, stderr=subprocess.STDOUT,
                             env=self._env(), start_new_session=True)
        self.pids.append(p.pid)
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
        # Workers one at a time (each gets the same 30 s window), each retried once.
        for i in range(self.workers):
            for attempt in range(2):
                pid = self._spawn([f"--address={self.gcs_address}", "--node-ip-address=127.0.0.1",
                                   *self._common(self.worker_cpus, self.worker_resources)], f"worker{i}.log")
                try:
                    self.wait_nodes(2 + i, timeout)
                    break
                except (RuntimeError, TimeoutError):
                    _kill_group(pid)
                    self.pids.remove(pid)
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

    def _dead(self) -> list[int]:
        out = []
        for pid in self.pids:
            try:
                os.kill(pid, 0)
                if _is_zombie(pid):
                    out.append(pid)
            except ProcessLookupError:
                out.append(pid)
        return out

    def alive(self) -> bool:
        """Every process this cluster started is still running."""
        return bool(self.pids) and not self._dead()

    def down(self, timeout: float = 8) -> None:
        """Stop every process: SIGTERM, then SIGKILL after `timeout` seconds.

        SIGTERM goes to each `ray start --block` (it stops its own children), workers first, then
        the head; after `timeout` (Ray would drain a node for 30 s) each process group is SIGKILLed.
        """
        for pid in reversed(self.pids):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and len(self._dead()) < len(self.pids):
            time.sleep(0.3)
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        self.pids = []
        self.save()

    def save(self) -> None:
        """Write this object to `<dir>/cluster.json`."""
        (pathlib.Path(self.dir) / "cluster.json").write_text(json.dumps(asdict(self), indent=2))

    @staticmethod
    def load(dir: str | None = None) -> LocalCluster | None:
        """The cluster saved in `dir` (default `$RAYBIG_HOME/cluster`), or None."""
        f = pathlib.Path(dir or default_dir()) / "cluster.json"
        if not f.exists():
            return None
        return LocalCluster(**json.loads(f.read_text()))


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

"""A multi-host Ray cluster on one machine: one network namespace per host.

A Linux bridge in the root namespace joins one veth pair per host; each host's namespace holds the
other end (renamed `eth0`) with its own address on a private /24, plus its own loopback. Each host
runs a real `ray start --block` with `--node-ip-address` set to that address, its own `--temp-dir`
and the shared token file, so Ray's nodes talk over real sockets between distinct IPs, as on a real
cluster. The test process (root namespace) reaches the head through the bridge's address. Nothing
routes beyond the bridge: traffic stays in these namespaces and loopback.

Faults: `kill_host(i)` SIGKILLs every process in a host's namespace (the machine is gone);
`cut_link(i)` / `restore_link(i)` take its cable out and put it back; `start_host(i)` brings a
(replacement) Ray node up on it again.

Needs root and iproute2 (`ip netns`); `unavailable_reason()` says why not. Teardown kills only
processes in namespaces this object created (never `ray stop`) and deletes namespaces, veths and
the bridge, also after a failed start-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

# Fixed ports are safe: every host has its own network namespace, hence its own port space.
GCS_PORT = 6380
DASHBOARD_PORT = 8266
IFACE = "eth0"  # the host-side name of each namespace's veth (GLOO_SOCKET_IFNAME points at it)


def unavailable_reason() -> str | None:
    """None if namespaces can be made here, else why not (for pytest.skip)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    name = f"rbprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def _free_subnet() -> int:
    """A third octet X such that 10.77.X.0/24 is on no interface of this machine."""
    used = _ip("-4", "-o", "addr").stdout
    start = os.getpid() % 250
    for k in range(250):
        x = (start + k) % 250 + 1
        if f" 10.77.{x}." not in used:
            return x
    raise RuntimeError("no free 10.77.x.0/24 subnet")


def cleanup_stale() -> list[str]:
    """Remove what an earlier harness left behind when its process was killed outright (no teardown).

    That is: namespaces `rb<pid>-n<i>` and bridges `rb<pid>br` whose <pid> is gone, with the processes
    that harness started inside them. Returns the namespaces removed.
    """
    import re

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False

    removed = []
    for line in _ip("netns", "list").stdout.splitlines():
        m = re.match(r"^(rb(\d+)-n\d+)\b", line)
        if m and gone(int(m.group(2))):
            for pid in NetnsCluster._ns_pids(m.group(1)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", m.group(1), check=False)
            removed.append(m.group(1))
    for m in re.finditer(r"^\d+: (rb(\d+)br)[:@]", _ip("-o", "link", "show", "type", "bridge").stdout, re.M):
        if gone(int(m.group(2))):
            _ip("link", "del", m.group(1), check=False)
    return removed


@dataclass
class Host:
    """One simulated machine: its namespace, address, veth, temp folder and `ray start` PID."""

    name: str  # the namespace
    ip: str
    veth: str  # the root-namespace end, enslaved to the bridge
    head: bool
    temp_dir: str
    pid: int = 0  # this host's `ray start --block`


@dataclass
class NetnsCluster:
    """A head and `workers` worker hosts, each in its own network namespace (see the module docstring)."""

    dir: str
    workers: int = 2
    head_cpus: float = 1
    worker_cpus: float = 1
    worker_resources: dict[str, float] = field(default_factory=dict)
    head_resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""
    bridge_ip: str = ""
    token_path: str = ""

    # -- addresses -------------------------------------------------------------------------------
    @property
    def head(self) -> Host:
        """The head host."""
        return self.hosts[0]

    @property
    def address(self) -> str:
        """The Jobs API / dashboard, reached from the root namespace through the bridge."""
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    @property
    def gcs_address(self) -> str:
        """`IP:PORT` of the head's GCS."""
        return f"{self.head.ip}:{GCS_PORT}"

    def client_env(self) -> dict[str, str]:
        """Env for a raybig/Ray client process in the root namespace talking to this cluster."""
        env = {**os.environ, "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN_PATH": self.token_path}
        env.pop("RAY_AUTH_TOKEN", None)
        return env

    # -- bring-up --------------------------------------------------------------------------------
    def up(self, timeout: float = 120) -> NetnsCluster:
        """Make the bridge and hosts, start the head then the workers; all torn down on failure."""
        why = unavailable_reason()
        if why:
            raise RuntimeError(why)
        cleanup_stale()
        d = pathlib.Path(self.dir)
        d.mkdir(parents=True, exist_ok=True)
        tag = f"rb{os.getpid()}"
        x = _free_subnet()
        self.bridge, self.bridge_ip = f"{tag}br", f"10.77.{x}.1"
        self.token_path = self.token_path or str(d / "auth_token")
        if not pathlib.Path(self.token_path).exists():
            pathlib.Path(self.token_path).write_text(secrets.token_hex(32))
            os.chmod(self.token_path, 0o600)
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(1 + self.workers):
                # Short temp dirs: Ray's unix socket paths under them must stay below 107 bytes.
                h = Host(name=f"{tag}-n{i}", ip=f"10.77.{x}.{i + 2}", veth=f"{tag}v{i}", head=i == 0,
                         temp_dir=f"/tmp/{tag}-n{i}-{secrets.token_hex(2)}")
                self.hosts.append(h)
                self._make_host(h)
            self.start_host(0)
            self._wait_http(timeout)
            for i in range(1, 1 + self.workers):
                self.start_host(i)
            self.wait_nodes(1 + self.workers, timeout)
        except BaseException:
            self.down()
            raise
        self.save()
        return self

    def _make_host(self, h: Host) -> None:
        peer = f"{h.veth}p"
        _ip("netns", "add", h.name)
        _ip("link", "add", h.veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", h.name)
        _ip("link", "set", h.veth, "master", self.bridge)
        _ip("link", "set", h.veth, "up")
        _ip("-n", h.name, "link", "set", peer, "name", IFACE)
        _ip("-n", h.name, "addr", "add", f"{h.ip}/24", "dev", IFACE)
        _ip("-n", h.name, "link", "set", IFACE, "up")
        _ip("-n", h.name, "link", "set", "lo", "up")  # Ray's local services use loopback too

    def _node_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path,
               # gloo advertises the address the hostname resolves to; in a namespace that is not
               # this host's IP, so point it at the namespace's interface instead.
               "GLOO_SOCKET_IFNAME": IFACE,
               # A killed host is declared dead in ~3 s instead of ~30 s (fault tests wait on it).
               "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        for var in ("RAY_AUTH_TOKEN", "RAY_ADDRESS"):
            env.pop(var, None)
        # The job supervisor inherits this PATH: this interpreter first, like an activated venv.
        env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start_host(self, i: int) -> int:
        """(Re)start host i's Ray node; returns the PID of its `ray start --block`."""
        h = self.hosts[i]
        ray = str(pathlib.Path(sys.executable).parent / "ray")
        cpus = self.head_cpus if h.head else self.worker_cpus
        res = self.head_resources if h.head else self.worker_resources
        args = [ray, "start", "--block", f"--node-ip-address={h.ip}", f"--temp-dir={h.temp_dir}",
                f"--num-cpus={int(cpus)}", "--num-gpus=0", "--object-store-memory=200000000",
                "--disable-usage-stats"]
        if res:
            args.append(f"--resources={json.dumps(res)}")
        if h.head:
            args += ["--head", f"--port={GCS_PORT}", f"--dashboard-host={h.ip}",
                     f"--dashboard-port={DASHBOARD_PORT}"]
        else:
            args.append(f"--address={self.gcs_address}")
        log = open(pathlib.Path(self.dir) / f"{h.name}.log", "ab")  # noqa: SIM115 - kept open for the child
        p = subprocess.Popen(["ip", "netns", "exec", h.name, *args], stdout=log, stderr=subprocess.STDOUT,
                             env=self._node_env(), start_new_session=True)
        log.close()
        h.pid = p.pid
        self.save()
        return p.pid

    # -- faults ----------------------------------------------------------------------------------
    def kill_host(self, i: int) -> list[int]:
        """SIGKILL every process in host i's namespace: the machine is gone, not shut down."""
        pids = self._ns_pids(self.hosts[i].name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._reap(self.hosts[i])
        return pids

    def cut_link(self, i: int) -> None:
        """Unplug host i: its processes live on but no packet reaches or leaves it."""
        _ip("link", "set", self.hosts[i].veth, "down")

    def restore_link(self, i: int) -> None:
        """Plug host i back in."""
        _ip("link", "set", self.hosts[i].veth, "up")

    # -- state -----------------------------------------------------------------------------------
    def _req(self, path: str) -> urllib.request.Request:
        tok = pathlib.Path(self.token_path).read_text().strip()
        return urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {tok}"})

    def _wait_http(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self._running(self.head):
                break
            try:
                urllib.request.urlopen(self._req("/api/version"), timeout=2).read()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        tail = (pathlib.Path(self.dir) / f"{self.head.name}.log").read_text(errors="replace")[-1500:]
        raise TimeoutError(f"head dashboard at {self.address} did not come up; its log ends: {tail}")

    def nodes(self) -> list[dict[str, Any]]:
        """Alive Ray nodes as the dashboard sees them (each has `ip`)."""
        data = json.loads(urllib.request.urlopen(self._req("/nodes?view=summary"), timeout=5).read())
        return [n for n in data.get("data", {}).get("summary", [])
                if n.get("raylet", {}).get("state") == "ALIVE"]

    def node_ips(self) -> list[str]:
        """The alive nodes' IPs, sorted."""
        return sorted(n["raylet"]["nodeManagerAddress"] for n in self.nodes())

    def wait_nodes(self, n: int, timeout: float = 90) -> None:
        """Until exactly `n` nodes are alive (a killed host counts once Ray declares it dead)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(Exception):
                if len(self.nodes()) == n:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"{n} alive nodes not reached in {timeout}s; see {self.dir}/*.log")

    def save(self) -> None:
        """Write this object to `<dir>/cluster.json`."""
        from dataclasses import asdict

        (pathlib.Path(self.dir) / "cluster.json").write_text(json.dumps(asdict(self), indent=2))

    # -- teardown --------------------------------------------------------------------------------
    @staticmethod
    def _ns_pids(name: str) -> list[int]:
        r = _ip("netns", "pids", name, check=False)
        return [int(p) for p in r.stdout.split()]

    @staticmethod
    def _running(h: Host) -> bool:
        if not h.pid:
            return False
        try:
            return os.waitpid(h.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    @staticmethod
    def _reap(h: Host) -> None:
        if h.pid:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(h.pid, 0)
            h.pid = 0

    def down(self) -> None:
        """Kill every process in our namespaces (workers first), then delete namespaces, veths, bridge."""
        for h in reversed(self.hosts):
            with contextlib.suppress(Exception):
                self.kill_host(self.hosts.index(h))
        for h in self.hosts:
            # Processes can linger a moment after SIGKILL; a namespace with none left deletes cleanly.
            for _ in range(50):
                if not self._ns_pids(h.name):
                    break
                time.sleep(0.1)
            _ip("netns", "del", h.name, check=False)
            _ip("link", "del", h.veth, check=False)  # usually gone with its peer already
            if not os.environ.get("RAYBIG_NETNS_KEEP_LOGS"):  # Ray's session logs, for debugging
                shutil.rmtree(h.temp_dir, ignore_errors=True)
        if self.bridge:
            _ip("link", "del", self.bridge, check=False)
        self.hosts = []
        with contextlib.suppress(OSError):
            self.save()

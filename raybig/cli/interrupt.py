"""Ctrl-C always ends a raybig command promptly: one line, exit 130, nothing left running that it started.

Python turns the first SIGINT into `KeyboardInterrupt`, and most waits end with it; the CLI's edge
prints one `interrupted` line and exits 130. Some waits do not end: Ray Train v2's `fit()` installs a
SIGINT handler of its own that asks its controller to abort and blocks on that request, which never
returns while the controller waits for a gang the cluster cannot place (GPUs that are not there);
Ray's `atexit` shutdown can hang the same way. So while a command runs, `interrupt_guard`:

- stays in front of whatever SIGINT handler the libraries install (it wraps `signal.signal`, and
  hands each SIGINT on to their handler, or to Python's default one, after counting it);
- on the first Ctrl-C starts a watchdog: if the process has not exited `GRACE_S` seconds later
  (`RAYBIG_INTERRUPT_GRACE_S`, default 10), or at once on a second Ctrl-C, it prints the one line,
  stops every process this command started (its descendants: an embedded Ray's GCS, raylet,
  dashboard and workers; SIGTERM, then SIGKILL after 2 s) and exits 130 without further cleanup.

The CLI's own `interrupted` exits end the same way (`exit_interrupted`), never through Python's
normal shutdown, whose exit hooks can crash on the half-stopped Ray threads.

On a cluster (`--address`), the driver's actors and workers die with the driver process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from raybig.errors import EXIT_INTERRUPTED

GRACE_S = float(os.environ.get("RAYBIG_INTERRUPT_GRACE_S", "10"))
SHUTDOWN_S = 8.0  # what `ray.shutdown` gets after an interrupt before the processes are killed
MESSAGE = "interrupted: stopped by Ctrl-C"
_said = threading.Event()  # the one interrupted line is printed once per process


def announce(console: Any, text: str = MESSAGE) -> None:
    """Print the one `interrupted` line (only the first call in a process prints)."""
    if _said.is_set():
        return
    _said.set()
    from rich.markup import escape

    head, sep, rest = text.partition(":")
    console.print(f"[yellow]{escape(head)}[/yellow]{sep}{escape(rest)}", soft_wrap=True)


def descendants(pid: int | None = None) -> list[int]:
    """Every live descendant of `pid` (default: this process), from /proc (Linux); [] elsewhere."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "(comm)": state, ppid, ...
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def stop_descendants(wait_s: float = 2.0) -> None:
    """SIGTERM every descendant of this process, then SIGKILL those still alive after `wait_s`."""
    pids = descendants()
    for p in pids:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGTERM)
    deadline = time.time() + wait_s
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    rest = pids + descendants()  # and anything they started meanwhile
    for p in rest:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    deadline = time.time() + wait_s
    while time.time() < deadline and any(_alive(p) for p in rest):
        time.sleep(0.05)


def exit_interrupted(console: Any, text: str = MESSAGE, shutdown_s: float = SHUTDOWN_S) -> None:
    """Print the one `interrupted` line, stop what this command started and exit 130 at once.

    `os._exit`, not `sys.exit`: after an interrupt, Python's normal shutdown runs Ray's and
    torch's exit hooks against half-stopped threads, and can hang or die with SIGSEGV (seen in
    CI as exit -11 right after the line was printed). `ray.shutdown` gets `shutdown_s` seconds
    first. Never returns.
    """
    announce(console, text)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    # Disconnect from Ray before its processes go: a core worker that sees its raylet die first
    # ends this process itself, with exit code 1. `ray.shutdown` also stops an embedded Ray.
    _shutdown_ray(shutdown_s)
    stop_descendants()
    os._exit(EXIT_INTERRUPTED)


def _shutdown_ray(timeout_s: float) -> None:
    """`ray.shutdown()` if this process is connected, given at most `timeout_s` (it can hang)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    t = threading.Thread(target=ray.shutdown, name="raybig-ray-shutdown", daemon=True)
    t.start()
    t.join(timeout_s)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"  # a zombie has exited


class _Guard:
    def __init__(self, console: Any) -> None:
        self.console = console
        self.count = 0
        self.delegate: Any = signal.default_int_handler
        self.done = threading.Event()

    def hard_exit(self) -> None:
        exit_interrupted(self.console, shutdown_s=2.0)  # the command is already stuck: less for Ray

    def watchdog(self) -> None:
        if not self.done.wait(GRACE_S):
            self.hard_exit()

    def on_sigint(self, signum: int, frame: Any) -> None:
        self.count += 1
        if self.count == 1:
            threading.Thread(target=self.watchdog, name="raybig-interrupt-watchdog", daemon=True).start()
        else:
            self.hard_exit()
        h = self.delegate
        if callable(h):
            h(signum, frame)
        elif h == signal.SIG_IGN:
            return
        else:
            raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_guard(console: Any) -> Iterator[None]:
    """While the block runs, a Ctrl-C ends the process promptly (see the module docstring).

    After the block the previous handler is back, but an interrupted command's watchdog keeps
    running until the process exits (a hanging exit is cut short too). Only in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    guard = _Guard(console)
    real_signal = signal.signal
    prev = signal.getsignal(signal.SIGINT)
    if callable(prev) and prev is not signal.default_int_handler:
        guard.delegate = prev

    def wrapped(sig: Any, handler: Any) -> Any:
        if sig != signal.SIGINT or threading.current_thread() is not threading.main_thread():
            return real_signal(sig, handler)
        old = guard.delegate
        # A library restoring "the handler it found" finds ours: that means Python's default again.
        guard.delegate = signal.default_int_handler if handler == guard.on_sigint else handler
        real_signal(signal.SIGINT, guard.on_sigint)
        return old

    real_signal(signal.SIGINT, guard.on_sigint)
    signal.signal = wrapped  # type: ignore[assignment]
    try:
        yield
    finally:
        signal.signal = real_signal
        with contextlib.suppress(ValueError, TypeError):
            real_signal(signal.SIGINT, prev if prev is not None else signal.default_int_handler)
        if guard.count == 0:
            guard.done.set()  # never interrupted: no watchdog to keep

"""Cluster commands: submit, status, logs, stop, list, queue and `cluster up/status/down`.

Thin over `raybig.scheduler.client` (Jobs API) and `raybig.cluster.local`. Cluster problems
(unreachable, auth, unknown job) are one line and exit 3; a bad spec is exit 2 before anything
reaches the cluster.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click
from rich.markup import escape

from raybig.cli.app import _load, console, main, out, set_option
from raybig.errors import EXIT_FAILED, ClusterError, RaybigError, first_line
from raybig.scheduler.policy import JobState
from raybig.spec.serve import ServeSpec

address_option = click.option("--address", default=None, metavar="URL",
                              help="Jobs API URL (default: $RAY_ADDRESS, then `raybig cluster up`'s).")


def _ago(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _progress(m: dict[str, Any]) -> str:
    if not m:
        return ""
    parts = [f"step {m['step']}"] if "step" in m else []
    for k in ("loss", "val_loss"):
        if isinstance(m.get(k), int | float):
            parts.append(f"{k} {m[k]:.3f}")
    if isinstance(m.get("tokens_per_s"), int | float):
        parts.append(f"{m['tokens_per_s']:.0f} tok/s")
    return ", ".join(parts)


@main.command()
@click.argument("spec_path", metavar="SPEC")
@set_option
@address_option
@click.option("--priority", type=int, default=None, help="Override the spec's priority (higher first).")
@click.option("-f", "--follow", is_flag=True, help="Stream the job's logs until it ends.")
@click.option("--python", default=None, metavar="PATH",
              help="Interpreter on the cluster (default: the one Ray itself runs under).")
def submit(spec_path: str, overrides: tuple[str, ...], address: str | None, priority: int | None,
           follow: bool, python: str | None) -> None:
    """Validate SPEC locally, then queue it on a Ray cluster."""
    from rich.markup import escape

    from raybig.scheduler import client
    from raybig.scheduler.meta import priority_of

    if priority is not None:
        overrides = (*overrides, f"priority={priority}")
    spec = _load(spec_path, overrides)  # a bad spec stops here (exit 2)
    if isinstance(spec, ServeSpec):
        _submit_serve(spec, address)
        return
    from raybig.spec.paths_resolve import resolve_paths

    # Relative local paths resolve here, against this working directory (as `raybig run` does), never
    # against the cluster's: the job carries absolute paths, which its nodes must see (shared storage).
    spec, changed = resolve_paths(spec)
    for r in changed:
        console.print(f"[yellow]note[/yellow] {escape(f'{r.field} {r.given!r} -> {r.absolute!r}')} (relative to "
                      "this directory; the cluster must see this path: shared storage, or use an object-store URI)",
                      soft_wrap=True)
    from raybig.scheduler.storage_check import require_shared

    totals = client.cluster_nodes(address)
    # A local storage.path on a multi-node cluster must be one every node sees: checked for real.
    require_shared(spec, address, len(totals) if totals is not None else None,
                   warn=lambda line: console.print(f"[yellow]warning[/yellow] {escape(line)}", soft_wrap=True))
    why = client.never_fits(spec, totals)
    if why:  # queued anyway: an autoscaling cluster may add such nodes; `raybig queue` keeps saying why
        console.print(f"[yellow]warning[/yellow] {escape(spec.name)!r} can never fit this cluster's current "
                      f"nodes: {escape(why)}; it is queued and waits until such nodes join (`raybig stop` "
                      "it otherwise)", soft_wrap=True)
    job_id, url = client.submit(spec, os.path.dirname(os.path.abspath(spec_path)), address, python=python)
    console.print(f"[green]submitted[/green] {job_id} to {url} (priority {priority_of(spec)})")
    out.print(job_id)
    if follow:
        state = client.follow(job_id, url)
        console.print(f"{job_id}: {state.value}")
        if state is not JobState.SUCCEEDED:
            sys.exit(EXIT_FAILED)


def _submit_serve(spec: ServeSpec, address: str | None) -> None:
    """A serve spec is a long-lived app, not a queued job: it goes to Serve's declarative config."""
    from raybig.cluster.connect import resolve_address
    from raybig.serve.deploy import deploy

    url = resolve_address(address)
    deploy(spec, address=url)  # ServeError (exit 1) / ClusterError (exit 3) reach the CLI's edge
    console.print(f"[green]deployed[/green] serve app {spec.name!r} to {url} (Serve's declarative config)")
    out.print(spec.name)


@main.command()
@click.argument("job_id", metavar="JOB", required=False)
@address_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(job_id: str | None, address: str | None, as_json: bool) -> None:
    """State, queue position, why it waits, progress (one job, or all active ones)."""
    from raybig.scheduler import client

    if not job_id:
        _table(client.list_views(address), as_json)
        return
    v = client.get_view(job_id, address)
    if as_json:
        out.print_json(json.dumps(v.to_json()))
        return
    out.print(f"{v.job_id}  {v.name}  [bold]{v.state.value}[/bold]  priority {v.priority}  "
              f"submitted {_ago(v.submitted_at)} ago")
    if v.position:
        out.print(f"  queue position {v.position}: {v.reason or 'waiting'}")
    elif v.reason:  # a running job being preempted: for whom
        out.print(f"  {v.reason}")
    if v.workers:
        out.print(f"  running on {v.workers} workers (its resources.workers range admitted below its max)")
    if v.preempted:
        out.print(f"  preempted {v.preempted} time(s): each resumed from its checkpoint, no retry spent")
    if v.attempt:
        out.print(f"  attempt {v.attempt}")
    if v.metrics:
        out.print(f"  progress: {_progress(v.metrics)}")
    if v.error:
        out.print(f"  error: {v.error}")
    if v.result and v.result.get("run_dir"):
        out.print(f"  run dir: {v.result['run_dir']}" + (f"  export: {v.result['export_dir']}"
                                                         if v.result.get("export_dir") else ""))


@main.command()
@click.argument("job_id", metavar="JOB")
@address_option
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the job ends.")
def logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print a job's logs."""
    from raybig.scheduler import client

    if follow:
        client.follow(job_id, address)
    else:
        sys.stdout.write(client.logs(job_id, address))


@main.command()
@click.argument("job_id", metavar="JOB")
@address_option
def stop(job_id: str, address: str | None) -> None:
    """Stop a queued or running job (its workers and reservations are freed)."""
    from raybig.scheduler import client

    st = client.stop(job_id, address)
    out.print(f"{job_id}: {st.value if st else 'stopping'}")


RICH_ROWS = 200  # above this many rows a table is written as plain aligned text (rich takes seconds)


def _table(views: list[Any], as_json: bool) -> None:
    if as_json:  # plain json.dumps: rich's pretty printer takes about a minute for 10,000 jobs
        docs = [v.to_json() for v in views]
        text = json.dumps(docs, indent=2) if len(docs) <= RICH_ROWS else \
            "[\n" + ",\n".join(json.dumps(d) for d in docs) + "\n]"  # one job a line
        out.file.write(text + "\n")
        out.file.flush()
        return
    if not views:
        out.print("no jobs")
        return
    cols = ("JOB", "NAME", "STATE", "PRI", "POS", "AGE", "DETAIL")
    rows = []
    for v in views:
        detail = v.reason if v.state in (JobState.QUEUED, JobState.PENDING, JobState.PREEMPTED) \
            else v.reason or v.error or _progress(v.metrics)
        rows.append((v.job_id, v.name, v.state.value, str(v.priority), str(v.position or ""), _ago(v.submitted_at),
                     detail))
    if len(rows) > RICH_ROWS:
        # Every column but the last as wide as its widest cell (ids never cut); DETAIL runs on.
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols[:-1])]
        lines = [" ".join(x.ljust(w) for x, w in zip(r[:-1], widths, strict=True)) + " " + r[-1]
                 for r in (cols, *rows)]
        out.file.write("\n".join(ln.rstrip() for ln in lines) + "\n")
        out.file.flush()
        return
    from rich.table import Table

    t = Table(box=None, pad_edge=False)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    out.print(t)


@main.command("list")
@address_option
@click.option("--all", "include_all", is_flag=True, help="Include finished and non-raybig jobs.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(address: str | None, include_all: bool, as_json: bool) -> None:
    """Active raybig jobs (--all: every job in Ray's job table)."""
    from raybig.scheduler import client

    _table(client.list_views(address, include_all=include_all), as_json)


@main.group(invoke_without_command=True)
@address_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def queue(ctx: click.Context, address: str | None, as_json: bool) -> None:
    """The whole queue in order: running jobs, then waiting ones by priority and age.

    `raybig queue quota` reads and sets per-user quotas; `raybig queue preemption` the preemption settings.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"address": address, "as_json": as_json}
        return
    from raybig.scheduler import client

    views = [v for v in client.list_views(address) if v.raybig]
    _table(views, as_json)


@queue.command("quota")
@click.argument("user", required=False)
@click.argument("caps", nargs=-1, metavar="[RESOURCE=AMOUNT]...")
@click.option("--clear", is_flag=True, help="Remove USER's quota.")
@address_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def queue_quota(ctx: click.Context, user: str | None, caps: tuple[str, ...], clear: bool, address: str | None,
                as_json: bool) -> None:
    """Per-user quotas: list them (no USER), or set USER's (`alice CPU=16 GPU=4 memory=64GiB`, --clear).

    A quota caps the sum of a user's admitted jobs' demand; it overrides RAYBIG_QUOTAS from the head's
    environment for that user and lasts as long as the cluster.
    """
    from raybig.errors import UsageError
    from raybig.scheduler.quota import parse_caps, read_quotas, set_quota

    parent = ctx.obj or {}
    address = address or parent.get("address")
    as_json = as_json or bool(parent.get("as_json"))
    if user is not None:
        if clear and caps:
            raise UsageError("give RESOURCE=AMOUNT values or --clear, not both")
        new = None if clear else parse_caps(caps)  # a malformed value stops here (exit 2)
        set_quota(user, new, address)
        console.print(f"[green]quota[/green] {escape(user)}: " + (escape(json.dumps(new)) if new else "cleared")
                      + " (the scheduler applies it at its next tick)", soft_wrap=True)
        return
    if clear:
        raise UsageError("--clear needs a USER")
    got = _board(read_quotas(address))
    if as_json:
        out.file.write(json.dumps(got, indent=2) + "\n")
        return
    if not got["quotas"]:
        out.print("no quotas (RAYBIG_QUOTAS is unset on the head and none were set with `raybig queue quota`)")
    for u, q in sorted(got["quotas"].items()):
        used = got["usage"].get(u, {})
        out.print(f"{u}: " + ", ".join(f"{k} {used.get(k, 0):g} of {v:g}" for k, v in sorted(q.items())))


def _board(got: dict[str, Any] | None) -> dict[str, Any]:
    """What a queue-board read returned; None (nothing there to read) is a ClusterError (exit 1)."""
    if got is None:
        raise ClusterError("the scheduler's queue board cannot be read (no raybig job has run on this cluster "
                           "yet, or an older raybig runs there)")
    return got


@queue.command("preemption")
@click.option("--on/--off", "enabled", default=None, help="Turn preemption on or off.")
@click.option("--min-gap", default=None, metavar="N",
              help="A victim's priority is at most the waiting job's minus N (>= 1).")
@click.option("--grace-s", default=None, metavar="SECONDS",
              help="How long a victim may take to checkpoint before its run is stopped.")
@address_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def queue_preemption(ctx: click.Context, enabled: bool | None, min_gap: str | None, grace_s: str | None,
                     address: str | None, as_json: bool) -> None:
    """Preemption settings: read them (no option), or set them (`--off`, `--min-gap 10 --grace-s 60`).

    Set values override RAYBIG_PREEMPTION / RAYBIG_PREEMPT_MIN_GAP / RAYBIG_PREEMPT_GRACE_S from the
    head's environment and last as long as the cluster.
    """
    from raybig.scheduler.quota import parse_preemption, read_preemption, set_preemption

    parent = ctx.obj or {}
    address = address or parent.get("address")
    as_json = as_json or bool(parent.get("as_json"))
    if enabled is not None or min_gap is not None or grace_s is not None:
        update = parse_preemption(enabled, min_gap, grace_s)  # a malformed value stops here (exit 2)
        set_preemption(update, address)
        console.print(f"[green]preemption[/green] {escape(json.dumps(update))} (the scheduler applies it at "
                      "its next tick)", soft_wrap=True)
        return
    got = _board(read_preemption(address))
    if as_json:
        out.file.write(json.dumps(got, indent=2) + "\n")
        return
    st = got["settings"]
    out.print(f"preemption {'on' if st.get('enabled', True) else 'off'}: min gap {st.get('min_gap', 1)}, "
              f"grace {st.get('grace_s', 120):g} s; {got['preemptions']} preemption(s) since the scheduler started")


@main.group()
def cluster() -> None:
    """A local multi-node Ray cluster (head + N worker nodes) for trying the scheduler."""


@cluster.command("up")
@click.option("--workers", type=int, default=2, show_default=True, help="Worker nodes.")
@click.option("--head-cpus", type=float, default=1, show_default=True)
@click.option("--worker-cpus", type=float, default=1, show_default=True)
@click.option("--dir", "cdir", default=None, help="State/log folder (default $RAYBIG_HOME/cluster).")
def cluster_up(workers: int, head_cpus: float, worker_cpus: float, cdir: str | None) -> None:
    """Start a head and WORKERS worker nodes as separate Ray processes; saves the address.

    State lives in `$RAYBIG_HOME/cluster` (or --dir). Over a partly dead cluster recorded there, the
    processes still provably its own are stopped first; a fully running one is refused.
    """
    from raybig.cluster.connect import save_address
    from raybig.cluster.local import LocalCluster, default_dir, default_token_path
    from raybig.cluster.ray_env import PROM_SD_FILE, link_prometheus_sd

    d = str(cdir or default_dir())
    old = LocalCluster.load(d)
    if old and old.alive():
        raise RaybigError(f"a cluster is already up at {old.address} (raybig cluster down first)")
    if old and old.procs:
        rep = old.down()
        out.print(f"cleaned up the partly dead cluster recorded in {d}: " + _stop_summary(rep))
    c = LocalCluster(dir=d, workers=workers, head_cpus=head_cpus, worker_cpus=worker_cpus,
                     token_path=default_token_path())
    try:
        c.up()
    except (RuntimeError, TimeoutError) as e:
        c.down()
        raise ClusterError(f"the local cluster did not start: {first_line(e)}") from None
    save_address(c.address)
    out.print(f"[green]up[/green] {c.address}: head + {workers} worker node(s); token {c.token_path}; "
              f"state and logs {d}")
    try:
        sd = link_prometheus_sd(os.path.join(c.temp_dir, PROM_SD_FILE))
        out.print(f"Prometheus file_sd: {sd}")
    except OSError as e:  # metrics discovery must never fail the cluster
        out.print(f"Prometheus file_sd: not linked ({e}); the head writes {c.temp_dir}/{PROM_SD_FILE}")
    out.print(f"Ray's own CLI: RAY_ADDRESS={c.address} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={c.token_path} "
              "ray job list")


def _stop_summary(rep: Any) -> str:
    """One line from a `StopReport`: what was stopped, what was left alone and why."""
    parts = []
    if rep.stopped or rep.leftovers:
        parts.append(f"stopped {len(rep.stopped)} node process(es)"
                     + (f" and {len(rep.leftovers)} leftover(s)" if rep.leftovers else ""))
    else:
        parts.append("nothing of it was still running, nothing was stopped")
    if rep.left_alone:
        parts.append(f"left alone PID(s) {', '.join(map(str, rep.left_alone))}: they now belong to other "
                     "processes (start time or command line differ)")
    return "; ".join(parts)


@cluster.command("status")
@click.option("--dir", "cdir", default=None)
def cluster_status(cdir: str | None) -> None:
    """Is the local cluster up, and its nodes."""
    from raybig.cluster.local import LocalCluster

    c = LocalCluster.load(cdir)
    if not c or not c.procs:
        raise RaybigError("no local cluster is up (raybig cluster up)")
    if not c.alive():
        raise RaybigError(f"the local cluster at {c.address} is partly or fully down ({len(c._dead())} of "
                          f"{len(c.procs)} node processes gone; logs in {c.dir}); `raybig cluster up` cleans "
                          "up what is left and starts a new one")
    nodes = c.nodes()
    out.print(f"{c.address}: {len(nodes)} node(s) alive")
    for n in nodes:
        r = n.get("raylet", {})
        res = r.get("resourcesTotal", {})
        out.print(f"  {r.get('nodeId', '?')[:12]} {'head' if r.get('isHeadNode') else 'worker'} "
                  f"CPU {res.get('CPU', 0):g}")


@cluster.command("down")
@click.option("--dir", "cdir", default=None)
def cluster_down(cdir: str | None) -> None:
    """Stop the local cluster's processes: only those it can prove are its own (never `ray stop`)."""
    import contextlib

    from raybig.cluster.connect import address_file, saved_address
    from raybig.cluster.local import LocalCluster

    c = LocalCluster.load(cdir)
    if not c or not c.procs:
        out.print("no local cluster is up")
        return
    rep = c.down()
    if saved_address() == c.address:  # later commands must not look for it there
        with contextlib.suppress(OSError):
            address_file().unlink()
    if rep.stopped:
        out.print(f"down: {c.address} ({_stop_summary(rep)})")
    else:
        out.print(f"the cluster recorded in {c.dir} ({c.address}) was already down: {_stop_summary(rep)}")

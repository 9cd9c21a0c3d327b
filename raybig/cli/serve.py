"""`raybig serve status|down`: look at and remove Serve applications through the Ray dashboard."""

from __future__ import annotations

import json

import click

from raybig.cli.app import main, out
from raybig.errors import UsageError

address_option = click.option(
    "--address", default=None, metavar="URL",
    help="Ray dashboard (default: $RAY_ADDRESS, then `raybig cluster up`'s, then a local `raybig run` server).")


@main.group()
def serve() -> None:
    """Serve applications: status and removal (deploy with `raybig run|submit serve.yaml`)."""


@serve.command("status")
@address_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def serve_status(address: str | None, as_json: bool) -> None:
    """Applications, replicas (running/starting) and autoscaling targets."""
    from raybig.serve.deploy import status

    st = status(address)
    if as_json:
        out.print_json(json.dumps(st))
        return
    if not st["applications"]:
        out.print("no Serve applications")
    for name, app in st["applications"].items():
        out.print(f"[bold]{name}[/bold] {app['status']}  {app['url']}")
        if app["message"] and app["status"] != "RUNNING":
            out.print(f"  {app['message'].strip().splitlines()[-1]}")
        for dname, d in app["deployments"].items():
            out.print(f"  {dname}: {d['status']}  replicas running {d['running']}, starting {d['starting']}"
                      f"  target {d['target_replicas']} (min {d['min_replicas']}, max {d['max_replicas']}, "
                      f"target_ongoing_requests {d['target_ongoing_requests']})")


@serve.command("down")
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Remove every Serve application.")
@address_option
def serve_down(name: str | None, all_: bool, address: str | None) -> None:
    """Remove application NAME (or --all)."""
    from raybig.serve.deploy import delete_app

    if not name and not all_:
        raise UsageError("give an application NAME or --all")
    removed = delete_app(None if all_ else name, address)
    out.print(f"removed {', '.join(removed) if removed else 'nothing (no applications)'}")

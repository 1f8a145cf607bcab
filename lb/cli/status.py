"""`lb status`: is the daemon up, where is XDP attached, what is loaded."""

from __future__ import annotations

import time
from typing import Any

import click

from lb import inspect, tls
from lb.cli.common import (
    EXIT_NOT_RUNNING,
    EXIT_OK,
    config_option,
    echo_json,
    inspect_errors,
    json_option,
    load_config,
    table,
)
from lb.model import LoadBalancer


def when(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


@click.command()
@config_option
@json_option
def status(config_path: str | None, as_json: bool) -> None:
    """Daemon, XDP attachments, program, pinned maps and listeners.

    Exit status 0 when the daemon runs, 3 when it does not (what is left in
    the kernel is still shown), 1 when the question cannot be answered.
    """
    config = load_config(config_path)
    with inspect_errors():
        info = inspect.status(config)
    code = EXIT_OK if info["daemon"]["running"] else EXIT_NOT_RUNNING
    if as_json:
        echo_json(info)
        raise SystemExit(code)
    show(config, info)
    raise SystemExit(code)


def show(config: LoadBalancer, info: dict[str, Any]) -> None:
    daemon = info["daemon"]
    if daemon["running"]:
        click.echo(f"lb {config.name}: running (pid {daemon['pid']})")
    else:
        click.echo(f"lb {config.name}: not running ({daemon['reason']})")
    click.echo(f"config: {info['config']['path'] or '-'} (loaded {when(info['config']['loaded_at'])})")
    program = info["program"]
    if program is not None:
        click.echo(f"program: id {program['id']} ({program['name']}), loaded {when(program['loaded_at'])}")
    else:
        click.echo("program: none pinned")
    click.echo(f"maps: {info['pin_dir']} ({'pinned' if info['maps_pinned'] else 'none'})")
    click.echo(f"metrics: http://{info['metrics_address']}/metrics")
    click.echo("")
    rows = [[x["interface"], x["mode"] or "none", x["program_id"], "yes" if x["ours"] else "no"] for x in info["xdp"]]
    click.echo(table(rows, ["interface", "xdp mode", "program", "ours"]))
    click.echo("")
    schemes = {li.name: li.scheme for li in config.listeners}  # HTTPS: HTTP with TLS in the model
    rows = [[li["name"], schemes.get(li["name"], li["protocol"]),
             f"[{li['address']}]:{li['port']}" if ":" in li["address"] else f"{li['address']}:{li['port']}"]
            for li in info["listeners"]]
    click.echo(table(rows, ["listener", "protocol", "address"]))
    # The certificates the daemon serves (its last load), else those of the file.
    certificates = daemon.get("certificates") if daemon["running"] else None
    if certificates is None:
        certificates = tls.certificate_rows(config)
    if certificates:
        click.echo("")
        now = time.time()
        rows = [[c["listener"], ", ".join(c["names"]), c["key_type"], when(c["not_after"]),
                 f"{(c['not_after'] - now) / 86400:.0f} days", ("default " if c["default"] else "") + c["certificate"]]
                for c in certificates]
        click.echo(table(rows, ["listener", "certificate names", "key", "expires", "left", "file"]))
    if info.get("bgp") is not None:
        click.echo("")
        show_bgp(info["bgp"])
    workers = daemon.get("l7_workers") or []
    if workers:
        click.echo("")
        rows = [[w["name"], w["pid"] or "-", worker_state(w), when(w["started"]), w["restarts"], w["last_exit"] or "-"]
                for w in workers]
        click.echo(table(rows, ["l7 worker", "pid", "state", "started", "restarts", "last exit"]))


def worker_state(row: dict[str, Any]) -> str:
    if row["state"] == "restarting" and row.get("restart_in"):
        return f"restarting in {row['restart_in']:g} s"
    return str(row["state"])


def show_bgp(bgp: dict[str, Any]) -> None:
    rotation = {True: "in rotation", False: "withdrawn (lb bgp withdraw)", None: "daemon not running"}
    drain = bgp.get("drain_until")
    left = f", draining until {when(drain)}" if drain else ""
    click.echo(f"bgp: {rotation[bgp.get('in_rotation')]}{left}; announced: {', '.join(bgp['announced']) or 'nothing'}")
    if bgp.get("error"):
        click.echo(f"bgp: {bgp['error']}")
    rows = [[s["neighbor"], s["as"], s["protocol"], s["state"], s["info"], s["since"]] for s in bgp["sessions"]]
    if rows:
        click.echo(table(rows, ["bgp neighbor", "as", "bird protocol", "state", "info", "since"]))

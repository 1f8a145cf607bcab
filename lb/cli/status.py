"""`lb status`: is the daemon up, where is XDP attached, what is loaded."""

from __future__ import annotations

import time

import click

from lb import admin
from lb.cli.common import config_option, echo_json, json_option, load_config, table
from lb.model import LoadBalancer


def attached_interfaces(config: LoadBalancer) -> list[str]:
    """Interfaces the last `lb up` attached to (its state file), else the config's."""
    from lb.daemon import RuntimeState, xdp_interfaces

    state = RuntimeState.load(config.name)
    if state is not None and state.attachments:
        return [a["ifname"] for a in state.attachments]
    if config.interfaces:
        return list(config.interfaces)
    if config.netns is None:
        return xdp_interfaces(config)
    return []


def collect_status(config: LoadBalancer) -> dict[str, object]:
    from lb import netlink as nl
    from lb.dataplane.loader import pin_dir
    import os

    try:
        running = admin.request(config.admin_socket, "status", timeout=5)
        daemon = {"running": True, **running}
    except admin.AdminError as exc:
        daemon = {"running": False, "reason": str(exc)}
    xdp = []
    with nl.iproute(config.netns) as ipr:
        for ifname in attached_interfaces(config):
            try:
                mode, prog_id = nl.xdp_info(ipr, ifname)
            except nl.NetlinkLookupError:
                mode, prog_id = "no such interface", None
            xdp.append({"interface": ifname, "mode": mode, "program_id": prog_id})
    return {
        "name": config.name,
        "daemon": daemon,
        "xdp": xdp,
        "pin_dir": pin_dir(config.name),
        "maps_pinned": os.path.isdir(pin_dir(config.name)),
        "listeners": [
            {"name": li.name, "protocol": li.protocol.value, "address": str(li.address), "port": li.port}
            for li in config.listeners
        ],
    }


@click.command()
@config_option
@json_option
def status(config_path: str | None, as_json: bool) -> None:
    """Daemon, XDP attachments, pinned maps and listeners."""
    config = load_config(config_path)
    info = collect_status(config)
    if as_json:
        echo_json(info)
        return
    daemon = info["daemon"]
    assert isinstance(daemon, dict)
    if daemon["running"]:
        loaded = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(daemon["loaded_at"]))
        click.echo(f"lb {config.name}: running (pid {daemon['pid']}), config {daemon['config']} loaded {loaded}")
    else:
        click.echo(f"lb {config.name}: not running ({daemon['reason']})")
    click.echo(f"maps: {info['pin_dir']} ({'pinned' if info['maps_pinned'] else 'none'})")
    rows = [[x["interface"], x["mode"] or "none", x["program_id"]] for x in info["xdp"]]  # type: ignore[union-attr]
    click.echo(table(rows, ["interface", "xdp mode", "program"]))
    rows = [[li["name"], li["protocol"], f"{li['address']}:{li['port']}"] for li in info["listeners"]]  # type: ignore[union-attr]
    click.echo(table(rows, ["listener", "protocol", "address"]))

"""`lb vips`: each L4 VIP, its target group, and who owns its ring slots."""

from __future__ import annotations

import click

from lb import inspect
from lb.cli.common import config_option, echo_json, inspect_errors, json_option, load_config, table


@click.command()
@config_option
@json_option
def vips(config_path: str | None, as_json: bool) -> None:
    """L4 VIPs in the kernel: target group, ring size, targets and their slot share."""
    config = load_config(config_path)
    with inspect_errors():
        rows = inspect.vips(config)
    if as_json:
        echo_json({"vips": rows})
        return
    if not rows:
        click.echo("no L4 VIPs loaded")
        return
    lines = []
    for vip in rows:
        first = [f"{vip['protocol']} {vip['vip']}", vip["listener"], vip["target_group"], vip["mode"],
                 vip["ring_size"]]
        targets = vip["targets"] or [None]
        for n, t in enumerate(targets):
            lead = first if n == 0 else ["", "", "", "", ""]
            if t is None:
                lines.append([*lead, "(none: packets dropped)", "", "", ""])
            else:
                share = f"{t['share'] * 100:.1f}%"
                lines.append([*lead, t["target"], t["target_id"], t["slots"], share])
    click.echo(table(lines, ["vip", "listener", "target group", "mode", "ring", "target", "id", "slots", "share"]))

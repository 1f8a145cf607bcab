"""`lb bgp withdraw`, `lb bgp announce`: take this host out of ECMP rotation and back.

The daemon stops announcing its VIPs (BIRD withdraws them from every
neighbour) and keeps serving: flows the routers already sent here go on;
the routers send new ones to the other hosts. `--wait` returns when the
drain period (the longest deregistration_delay) is over, so that
`lb bgp withdraw --wait && systemctl stop lb` breaks no connection.
"""

from __future__ import annotations

import time
from typing import Any

import click

from lb import admin
from lb.cli.common import config_option, echo_json, json_option, load_config


@click.group()
def bgp() -> None:
    """Announce or withdraw this host's VIPs (BGP through BIRD)."""


def _ask(config_path: str | None, cmd: str) -> dict[str, Any]:
    config = load_config(config_path)
    try:
        result: dict[str, Any] = admin.request(config.admin_socket, cmd)
    except admin.AdminError as exc:
        raise click.ClickException(str(exc)) from exc
    return result


def _show(result: dict[str, Any]) -> None:
    click.echo(f"in rotation: {'yes' if result['in_rotation'] else 'no (withdrawn)'}")
    click.echo(f"announced (BIRD): {', '.join(result['announced']) or 'nothing'}")
    for s in result["sessions"]:
        click.echo(f"session {s['protocol']}: neighbor {s['neighbor']} AS {s['as']}: {s['state']} {s['info']}".rstrip())
    if result.get("error"):
        click.echo(f"BIRD: {result['error']}", err=True)


@bgp.command()
@config_option
@click.option("--wait", is_flag=True, help="Return when the drain period (deregistration_delay) is over.")
@json_option
def withdraw(config_path: str | None, wait: bool, as_json: bool) -> None:
    """Stop announcing; keep serving the flows already here."""
    result = _ask(config_path, "bgp_withdraw")
    if as_json:
        echo_json(result)
    else:
        _show(result)
    if wait and result["drain_until"] is not None:
        left = result["drain_until"] - time.time()
        if left > 0:
            if not as_json:
                click.echo(f"draining: {left:.0f} s")
            time.sleep(left)


@bgp.command()
@config_option
@json_option
def announce(config_path: str | None, as_json: bool) -> None:
    """Announce again what this host serves."""
    result = _ask(config_path, "bgp_announce")
    if as_json:
        echo_json(result)
    else:
        _show(result)

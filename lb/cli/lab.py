"""`lb lab up|down|status`: the namespace lab the demo and the tests use."""

from __future__ import annotations

import json
import os

import click

from lb.config import default_config_text
from lb.lab import Lab, LabError
from lb.labhosts import MAX_HOSTS, ScaleLab, lab_for


def _lab(prefix: str, hosts: int = 1) -> Lab:
    if os.geteuid() != 0:
        raise click.ClickException("the lab creates network namespaces: run as root (sudo lb lab ...)")
    return lab_for(prefix, hosts)


prefix_option = click.option(
    "--prefix", default="lab", show_default=True, help="Namespace name prefix (<prefix>-client, <prefix>-lb, ...)."
)


hosts_option = click.option(
    "--hosts", type=click.IntRange(1, MAX_HOSTS), default=1, show_default=True,
    help="lb hosts; 2 or more puts a router (BIRD, ECMP) between the client and them (docs/bgp.md).",
)


@click.group()
def lab() -> None:
    """The namespace lab: a client, the lb host and three backends."""


@lab.command()
@prefix_option
@hosts_option
def up(prefix: str, hosts: int) -> None:
    """Build the lab (no-op when it is already up)."""
    the_lab = _lab(prefix, hosts)
    try:
        built = the_lab.up()
    except LabError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"lab {prefix}: {'up' if built else 'already up'} ({', '.join(the_lab.namespaces)})")
    if isinstance(the_lab, ScaleLab):  # each host's config: the embedded one, with its BGP identity
        for index, path in enumerate(the_lab.write_host_configs(default_config_text()), 1):
            click.echo(f"lb{index}: sudo lb up -c {path}")


@lab.command()
@prefix_option
@hosts_option
def down(prefix: str, hosts: int) -> None:
    """Remove the lab's namespaces and stop its servers."""
    removed = _lab(prefix, hosts).down()
    click.echo(f"lab {prefix}: removed {', '.join(removed)}" if removed else f"lab {prefix}: nothing to remove")


@lab.command()
@prefix_option
@hosts_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(prefix: str, hosts: int, as_json: bool) -> None:
    """Show which namespaces, links and servers exist."""
    the_lab = _lab(prefix, hosts)
    state = the_lab.status()
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    click.echo(f"lab {prefix}: {'up' if state['complete'] else 'not up'}")
    for ns in the_lab.namespaces:
        click.echo(f"  {ns:<20} {'present' if ns in state['namespaces'] else 'absent'}")
    for ifname, is_up in state["links"].items():
        click.echo(f"  {ifname:<20} {'up' if is_up else 'down'}")
    for name, running in state["servers"].items():
        click.echo(f"  {name:<20} server {'running' if running else 'stopped'}")
    for name, running in state.get("birds", {}).items():
        click.echo(f"  {name:<20} BIRD {'running' if running else 'stopped'}")

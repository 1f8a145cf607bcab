"""`lb up`, `lb down`, `lb reload`: run the balancer and take it away."""

from __future__ import annotations

import logging
import sys

import click

from lb import admin
from lb.cli.common import config_option, echo_json, json_option, load_config, require_root, resolve_config_path
from lb.inspect import attached_interfaces


@click.command()
@config_option
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info", show_default=True)
def up(config_path: str | None, log_level: str) -> None:
    """Bring the load balancer up and stay in the foreground.

    SIGHUP reloads the config; SIGTERM stops gracefully and leaves the XDP
    program and maps in place so L4 flows go on (`lb down` removes them).
    """
    # Imported here, for `lb up` and `lb down` only: lb.daemon brings the controller,
    # health checks, metrics and uvloop: some 35 ms, a fifth more start-up for every other command.
    from lb import daemon

    config_path = resolve_config_path(config_path)
    config = load_config(config_path)
    require_root("lb up")
    logging.basicConfig(stream=sys.stderr, level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        daemon.run(config, config_path)
    except daemon.DaemonError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command()
@config_option
@click.option("--keep-maps", is_flag=True, help="Detach, but keep the pinned maps (and the flows in them).")
@json_option
def down(config_path: str | None, keep_maps: bool, as_json: bool) -> None:
    """Detach the XDP program, remove pinned maps and the addresses lb added."""
    from lb import daemon  # only here: see up()

    config = load_config(config_path)
    require_root("lb down")
    interfaces = attached_interfaces(config)
    try:
        result = daemon.down(config.name, interfaces, config.netns, purge=not keep_maps, bgp_config=config.bgp)
    except daemon.DaemonError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        echo_json(result)
        return
    click.echo(f"detached from: {', '.join(result['detached']) or 'nothing attached'}")
    click.echo(f"addresses removed: {', '.join(result['addresses_removed']) or 'none'}")
    click.echo(f"pinned maps: {'removed' if result['maps_removed'] else 'none found' if not keep_maps else 'kept'}")
    if config.bgp is not None:
        withdrawn = result["bgp_withdrawn"]
        if isinstance(withdrawn, str):
            click.echo(f"BGP: {withdrawn}", err=True)
        else:
            click.echo(f"BGP: {'withdrawn (fragment removed)' if withdrawn else 'nothing announced'}")


@click.command()
@config_option
def reload(config_path: str | None) -> None:
    """Ask the running daemon to re-read its config (all or nothing)."""
    config = load_config(config_path)
    try:
        result = admin.request(config.admin_socket, "reload")
    except admin.AdminError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"reloaded: {result['listeners']} listeners, {result['target_groups']} target groups")
    for warning in result.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)

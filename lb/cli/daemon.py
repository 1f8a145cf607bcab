"""`lb up`, `lb down`, `lb reload`: run the balancer and take it away."""

from __future__ import annotations

import logging
import os
import sys

import click

from lb import admin
from lb.cli.common import (
    EXIT_NOT_RUNNING,
    config_option,
    echo_json,
    json_option,
    load_config,
    require_root,
    resolve_config_path,
)
from lb.inspect import attached_interfaces
from lb.model import LoadBalancer
from lb.runstate import RuntimeState


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
    if config_path is not None:  # absolute in the state file: `lb reload` from anywhere finds it
        config_path = os.path.abspath(config_path)
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


RELOAD_TIMEOUT = 90.0  # seconds: health of new targets is not waited for, the workers' tables are (30 s at most)


@click.command()
@config_option
def reload(config_path: str | None) -> None:
    """Ask the running daemon to re-read its config, and wait for its answer.

    The file is validated here first (exit 2 with every problem); then the
    daemon applies it whole or not at all. Exit 0 only when it was applied;
    1 with the daemon's reasons when it refused; 3 when no daemon runs.
    Made for systemd's ExecReload=: `systemctl reload lb` fails when the
    change did not apply.
    """
    path = resolve_config_path(config_path)
    config = load_config(config_path)
    socket_path, daemon_config = find_daemon(config, path)
    if socket_path is None:
        click.echo(f"Error: no `lb up` is running for {config.name!r} ({config.admin_socket} does not answer)",
                   err=True)
        raise SystemExit(EXIT_NOT_RUNNING)
    if daemon_config is not None and not same_file(daemon_config, path):
        raise click.ClickException(f"the daemon on {socket_path} runs from {daemon_config}, not "
                                   f"{path or 'the embedded config'}; it can only re-read its own file")
    try:
        result = admin.request(socket_path, "reload", timeout=RELOAD_TIMEOUT)
    except admin.NotRunning as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_NOT_RUNNING) from exc
    except admin.AdminError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"reloaded {daemon_config or path or 'the embedded config'}: {result['listeners']} listeners, "
               f"{result['target_groups']} target groups")
    for line in result.get("registrations_dropped", []):
        click.echo(f"note: {line}")
    for warning in result.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)


def find_daemon(config: LoadBalancer, path: str | None) -> tuple[str | None, str | None]:
    """(admin socket, the config file it runs from) of the daemon to reload:
    the config's own, else one whose state file names this config file (the
    file now names another socket or load balancer: the daemon will say
    what needs a restart). (None, None) when no daemon answers."""
    candidates = [(config.admin_socket, RuntimeState.load(config.name))]
    if path is not None:
        candidates += [(state.admin_socket, state) for state in RuntimeState.all()
                       if state.admin_socket and state.config_path and same_file(state.config_path, path)]
    for socket_path, state in candidates:
        try:
            admin.request(socket_path, "status", timeout=5)
        except admin.AdminError:
            continue
        return socket_path, None if state is None else (state.config_path or None)
    return None, None


def same_file(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return os.path.realpath(a) == os.path.realpath(b)

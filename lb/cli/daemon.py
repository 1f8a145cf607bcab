"""`lb up`, `lb down`, `lb reload`: run the balancer and take it away."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import click

from lb import admin
from lb import config as configmod
from lb.bgp.fragment import fragment_path
from lb.cli.common import (
    EXIT_INVALID,
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
from lb.runstate import RUN_DIR, RuntimeState, state_path


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
    """Detach the XDP program, remove pinned maps and the addresses lb added.

    A config that no longer loads (a syntax error, a bad key) does not stop
    it: what the `lb up` that ran from this file recorded in /run/lb is taken
    down instead, with a warning.
    """
    from lb import daemon  # only here: see up()

    path = resolve_config_path(config_path)
    try:
        config = configmod.load(path)
    except configmod.ConfigError as exc:
        click.echo(str(exc), err=True)
        require_root("lb down")
        teardowns = recorded_teardowns(path)
    else:
        require_root("lb down")
        teardowns = [Teardown.of_config(config)]
    results = []
    try:
        for teardown in teardowns:
            results.append(daemon.down(teardown.name, teardown.interfaces, teardown.netns, purge=not keep_maps,
                                       bgp_fragment=teardown.bgp_fragment))
    except daemon.DaemonError as exc:
        raise click.ClickException(str(exc)) from exc
    result: dict[str, Any] = {
        "detached": [ifname for r in results for ifname in r["detached"]],
        "addresses_removed": [address for r in results for address in r["addresses_removed"]],
        "maps_removed": any(r["maps_removed"] for r in results),
        "bgp_withdrawn": next((r["bgp_withdrawn"] for r in results if isinstance(r["bgp_withdrawn"], str)),
                              any(r["bgp_withdrawn"] for r in results)),
        "recorded_states": [t.recorded_in for t in teardowns if t.recorded_in],
    }
    if as_json:
        echo_json(result)
        return
    click.echo(f"detached from: {', '.join(result['detached']) or 'nothing attached'}")
    click.echo(f"addresses removed: {', '.join(result['addresses_removed']) or 'none'}")
    click.echo(f"pinned maps: {'removed' if result['maps_removed'] else 'none found' if not keep_maps else 'kept'}")
    if any(t.bgp_fragment is not None for t in teardowns):
        withdrawn = result["bgp_withdrawn"]
        if isinstance(withdrawn, str):
            click.echo(f"BGP: {withdrawn}", err=True)
        else:
            click.echo(f"BGP: {'withdrawn (fragment removed)' if withdrawn else 'nothing announced'}")


@dataclass(frozen=True)
class Teardown:
    """What `lb down` removes: from the config, or from what `lb up` recorded."""

    name: str
    interfaces: list[str]
    netns: str | None
    bgp_fragment: tuple[str, str] | None  # (fragment path, BIRD's control socket)
    recorded_in: str = ""  # the state file it came from, when the config did not load

    @classmethod
    def of_config(cls, config: LoadBalancer) -> Teardown:
        bgp = None if config.bgp is None else (fragment_path(config.bgp, config.name), config.bgp.bird_socket)
        return cls(config.name, attached_interfaces(config), config.netns, bgp)

    @classmethod
    def of_state(cls, state: RuntimeState) -> Teardown:
        bgp = (state.bgp_fragment, state.bird_socket) if state.bgp_fragment else None
        return cls(state.name, [a["ifname"] for a in state.attachments], state.netns, bgp,
                   recorded_in=state_path(state.name))


def recorded_teardowns(path: str) -> list[Teardown]:
    """`lb down` with a config that does not load (its errors already
    printed): what the `lb up`s that ran from `path` recorded, with a
    warning; exit 2 saying so when nothing is recorded for it."""
    states = RuntimeState.recorded_for(path)
    if not states:
        others = "; ".join(f"{s.name!r} from {s.config_path}" for s in RuntimeState.all())
        click.echo(f"Error: nothing recorded for {path} in {RUN_DIR}: no `lb up` ran from this file since the last "
                   f"`lb down` (or reboot), so lb does not know what to take down by it; fix the file and run "
                   f"`lb down` again" + (f" (recorded: {others})" if others else ""), err=True)
        raise SystemExit(EXIT_INVALID)
    for state in states:
        click.echo(f"warning: {path} does not load; taking down what `lb up` (pid {state.pid}) recorded in "
                   f"{state_path(state.name)}: load balancer {state.name!r}", err=True)
    return [Teardown.of_state(state) for state in states]


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

"""`lb targets`: list every target with its health (describe-target-health),
register one, or deregister one (RegisterTargets / DeregisterTargets).

    lb targets [GROUP]                              the list (`lb targets list [GROUP]` too)
    lb targets register GROUP TARGET[:PORT] [--weight W]
    lb targets deregister GROUP TARGET[:PORT]

Registrations go to the running daemon over the admin socket and are kept
across `lb reload` and restarts until the config changes that target
(lb.registrations has the precedence).
"""

from __future__ import annotations

import time
from typing import Any

import click

from lb import admin, inspect
from lb.cli.common import (
    EXIT_NOT_RUNNING,
    config_option,
    echo_json,
    inspect_errors,
    json_option,
    load_config,
    table,
)


class ListByDefault(click.Group):
    """`lb targets web` lists group web: anything that is not a subcommand goes to `list`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if ctx.resilient_parsing:  # shell completion: offer the subcommands
            return super().parse_args(ctx, args)
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=ListByDefault)
def targets() -> None:
    """Targets with their health; register or deregister one (lb targets -h)."""


def last_check(row: dict[str, Any]) -> str | None:
    result, ago = row["last_result"], row["last_checked_ago_s"]
    if result is None:
        return None
    return f"{result} {ago:.1f}s ago" if isinstance(ago, (int, float)) else str(result)


def state(row: dict[str, Any]) -> str:
    """The state, with the progress toward the next one: "unhealthy, 1/2 passes"."""
    text, checks, anomaly = str(row["state"]), row.get("checks"), row.get("anomaly")
    if anomaly is not None and anomaly["mitigated"]:
        text += f", mitigated ({anomaly['failure_rate']:.0%} failing, peers {anomaly['peer_failure_rate']:.0%})"
    if checks is None:
        return text
    if text == "unhealthy" and checks["passes"]:
        return f"{text}, {checks['passes']}/{checks['healthy_threshold']} passes"
    if text in ("healthy", "initial") and checks["fails"]:
        return f"{text}, {checks['fails']}/{checks['unhealthy_threshold']} fails"
    return text


def registration(row: dict[str, Any]) -> str:
    entry = row.get("registration")
    if entry is None:
        return "config"
    when = time.strftime("%H:%M:%S", time.localtime(entry["at"]))
    weight = f" (weight {entry['weight']})" if entry["action"] == "register" else ""
    return f"{entry['action']}ed {when}{weight}"


@targets.command("list")
@click.argument("group", required=False)
@config_option
@json_option
def list_targets(group: str | None, config_path: str | None, as_json: bool) -> None:
    """Targets of every target group (or of GROUP) with state, reason and last check.

    Health comes from the running daemon; when it is down, the config's
    targets (with the registrations kept for it) are listed with state
    "unknown". The "source" column says whether the config or an
    `lb targets register|deregister` decides the target.
    """
    config = load_config(config_path)
    with inspect_errors():
        info = inspect.targets(config, group)
    if as_json:
        echo_json(info)
        return
    if not info["daemon"]["running"]:
        click.echo(f"daemon not running ({info['daemon']['reason']}): targets from the config, health unknown",
                   err=True)
    rows = [[t["group"], t["target"], t["port"], t["weight"], state(t), t["reason"], last_check(t),
             None if t["last_latency_ms"] is None else f"{t['last_latency_ms']:.1f} ms", registration(t),
             t["description"] or None]
            for t in info["targets"]]
    click.echo(table(rows, ["group", "target", "port", "weight", "state", "reason", "last check", "latency",
                            "source", "description"]))


def _endpoint(text: str) -> tuple[str, int | None]:
    """TARGET[:PORT]; a malformed one is a command-line error (exit 2)."""
    try:
        address, port = inspect.parse_endpoint(text, port_required=False)
    except inspect.InspectError as exc:
        raise click.BadParameter(str(exc), param_hint="TARGET[:PORT]") from None
    return str(address), port


def _change(cmd: str, config_path: str | None, group: str, target: str, as_json: bool, **extra: Any) -> None:
    config = load_config(config_path)
    address, port = _endpoint(target)
    args: dict[str, Any] = {"group": group, "target": address, **extra}
    if port is not None:
        args["port"] = port
    try:
        result = admin.request(config.admin_socket, cmd, **args)
    except admin.NotRunning as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(EXIT_NOT_RUNNING) from exc
    except admin.AdminError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        echo_json({"group": result["group"], "target": result["target"], "port": result["port"],
                   "action": cmd, "weight": result["weight"]})
        return
    where = f"[{result['target']}]:{result['port']}" if ":" in result["target"] else \
        f"{result['target']}:{result['port']}"
    if cmd == "register":
        click.echo(f"registered {where} in {result['group']} (weight {result['weight']})")
    else:
        click.echo(f"deregistering {where} in {result['group']}: it drains, "
                   "then stays out until registered again or the config changes it")


@targets.command()
@click.argument("group")
@click.argument("target", metavar="TARGET[:PORT]")
@click.option("--weight", type=click.IntRange(1, 100), default=None,
              help="Share of new flows/requests, 1..100 (default: the weight it has, else 1).")
@config_option
@json_option
def register(group: str, target: str, weight: int | None, config_path: str | None, as_json: bool) -> None:
    """Register TARGET in GROUP (ALB RegisterTargets), kept across reloads and restarts."""
    _change("register", config_path, group, target, as_json, **({} if weight is None else {"weight": weight}))


@targets.command()
@click.argument("group")
@click.argument("target", metavar="TARGET[:PORT]")
@config_option
@json_option
def deregister(group: str, target: str, config_path: str | None, as_json: bool) -> None:
    """Deregister TARGET from GROUP (ALB DeregisterTargets): it drains for the
    group's deregistration_delay and stays out across reloads and restarts."""
    _change("deregister", config_path, group, target, as_json)

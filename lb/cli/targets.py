"""`lb targets [GROUP]`: every target with its state and reason, as ELB's describe-target-health."""

from __future__ import annotations

import click

from lb import inspect
from lb.cli.common import config_option, echo_json, inspect_errors, json_option, load_config, table


def last_check(row: dict[str, object]) -> str | None:
    result, ago = row["last_result"], row["last_checked_ago_s"]
    if result is None:
        return None
    return f"{result} {ago:.1f}s ago" if isinstance(ago, (int, float)) else str(result)


@click.command()
@click.argument("group", required=False)
@config_option
@json_option
def targets(group: str | None, config_path: str | None, as_json: bool) -> None:
    """Targets of every target group (or of GROUP) with state, reason and last check.

    Health comes from the running daemon; when it is down, the config's
    targets are listed with state "unknown".
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
    rows = [[t["group"], t["target"], t["port"], t["state"], t["reason"], last_check(t),
             None if t["last_latency_ms"] is None else f"{t['last_latency_ms']:.1f} ms", t["description"] or None]
            for t in info["targets"]]
    click.echo(table(rows, ["group", "target", "port", "state", "reason", "last check", "latency", "description"]))

"""Helpers shared by the click commands: loading the config, errors, JSON."""

from __future__ import annotations

import json
import os
from importlib import resources
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from lb import config as configmod
from lb import inspect
from lb.model import LoadBalancer

SYSTEM_CONFIG = "/etc/lb/lb.toml"
LAB_CONFIG = str(resources.files("lb").joinpath("data/default.toml"))  # the namespace lab's (make demo)

# Exit statuses, the same for every command (README "Exit status").
EXIT_OK = 0
EXIT_ERROR = 1  # the command failed: the daemon refused it, not root, nothing loaded, ...
EXIT_INVALID = 2  # the config (or the command line) is invalid: every problem is printed
EXIT_NOT_RUNNING = 3  # the command needs the daemon and none answers on the admin socket

config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="LB_CONFIG",
    help=f"Config file (default: $LB_CONFIG, else {SYSTEM_CONFIG}).",
)


def resolve_config_path(path: str | None) -> str:
    """The file to use: the one given (-c, $LB_CONFIG), else the system one.
    Without either, exit 2 saying so: never a silent fallback to the lab's
    embedded config (that one is named explicitly: -c LAB_CONFIG)."""
    if path:
        return path
    if os.path.exists(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    click.echo(f"Error: no config: {SYSTEM_CONFIG} does not exist and neither -c FILE nor $LB_CONFIG is given "
               f"(the namespace lab's config: -c {LAB_CONFIG})", err=True)
    raise SystemExit(EXIT_INVALID)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (stable schema).")


def load_config(path: str | None) -> LoadBalancer:
    """The config, or exit 2 listing every error (no traceback)."""
    path = resolve_config_path(path)
    try:
        return configmod.load(path)
    except configmod.ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from exc


# The version of every --json output's shape (README "JSON output"): each is
# an object with "schema" at its top; a target is always
# "target": {"address": "10.0.1.11", "port": 80}, never "10.0.1.11:80".
JSON_SCHEMA = 2


def shaped(data: Any) -> Any:
    """`data` with every target in the one shape: a "target" that is
    "ADDRESS:PORT" (lb.inspect's endpoints), or an address with a "port"
    beside it, becomes {"address", "port"}. Applied to every --json answer."""
    if isinstance(data, list):
        return [shaped(item) for item in data]
    if not isinstance(data, dict):
        return data
    out = {key: shaped(value) for key, value in data.items()}
    target = out.get("target")
    if isinstance(target, str):
        if isinstance(out.get("port"), int):
            out["target"] = {"address": target, "port": out.pop("port")}
        elif ":" in target:
            address, _, port = target.rpartition(":")
            out["target"] = {"address": address.strip("[]"), "port": int(port)}
    return out


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise click.ClickException(f"{what} needs root (BPF maps, XDP, namespaces): run it with sudo")


def echo_json(data: dict[str, Any]) -> None:
    """One --json answer: `data` with the schema version at its top."""
    click.echo(json.dumps({"schema": JSON_SCHEMA, **shaped(data)}, indent=2, default=str, sort_keys=True))


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """An aligned text table."""
    cells = [[str(h) for h in headers]] + [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


@contextmanager
def inspect_errors() -> Iterator[None]:
    """An InspectError becomes a one-line error and exit 1, never a traceback."""
    try:
        yield
    except inspect.InspectError as exc:
        raise click.ClickException(str(exc)) from exc

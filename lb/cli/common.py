"""Helpers shared by the click commands: loading the config, errors, JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from lb import config as configmod
from lb import inspect
from lb.model import LoadBalancer

SYSTEM_CONFIG = "/etc/lb/lb.toml"

config_option = click.option(
    "-c", "--config", "config_path", type=click.Path(dir_okay=False), default=None, envvar="LB_CONFIG",
    help=f"Config file (default: $LB_CONFIG, else {SYSTEM_CONFIG} if it exists, else the embedded lab config).",
)


def resolve_config_path(path: str | None) -> str | None:
    """The file to use: the one given, else the system one if present, else
    None (the embedded lab config)."""
    if path:
        return path
    return SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else None
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (stable schema).")


def load_config(path: str | None) -> LoadBalancer:
    """The config, or exit 2 listing every error (no traceback)."""
    path = resolve_config_path(path)
    try:
        return configmod.load(path) if path else configmod.load_default()
    except configmod.ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from exc


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise click.ClickException(f"{what} needs root (BPF maps, XDP, namespaces): run it with sudo")


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, sort_keys=True))


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

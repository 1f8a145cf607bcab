"""`lb maps list`, `lb maps dump NAME`: the pinned BPF maps, raw but decoded."""

from __future__ import annotations

import json
from typing import Any

import click

from lb import inspect
from lb.cli.common import config_option, echo_json, inspect_errors, json_option, load_config, table


@click.group()
def maps() -> None:
    """Inspect the pinned BPF maps."""


@maps.command("list")
@config_option
@json_option
def list_maps(config_path: str | None, as_json: bool) -> None:
    """Every pinned map: type, key/value size, max and current entries."""
    config = load_config(config_path)
    with inspect_errors():
        rows = inspect.maps_list(config)
    if as_json:
        echo_json({"maps": rows})
        return
    lines = [[m["name"], m["type"], m["id"], m["key_size"], m["value_size"], m["max_entries"], m["entries"]]
             for m in rows]
    click.echo(table(lines, ["map", "type", "id", "key B", "value B", "max entries", "entries"]))
    click.echo("(an array holds all of its entries; a hash map's entries are counted)")


def _cells(value: Any, name: str) -> dict[str, Any]:
    """A decoded key or value as columns: a struct's fields (no map has a
    field name in both), else one column `name`; per-CPU values: their total."""
    if isinstance(value, dict) and "total" in value and "per_cpu" in value:
        value = value["total"]
    return dict(value) if isinstance(value, dict) else {name: value}


@maps.command("dump")
@click.argument("name")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True,
              help="At most N entries (0: all).")
@config_option
@json_option
def dump(name: str, limit: int, config_path: str | None, as_json: bool) -> None:
    """The decoded entries of map NAME (vips, targets, rings, conntrack, vip_gens,
    vip_stats, target_stats, counters)."""
    config = load_config(config_path)
    with inspect_errors():
        info = inspect.maps_dump(config, name, limit)
    if as_json:
        echo_json(info)
        return
    rows = [{**_cells(e["key"], "key"), **_cells(e["value"], "value")} for e in info["entries"]]
    headers: list[str] = []
    for row in rows:
        headers += [h for h in row if h not in headers]
    click.echo(table([[_text(row.get(h)) for h in headers] for row in rows], headers or ["key", "value"]))
    more = " (truncated: --limit)" if info["truncated"] else ""
    click.echo(f"{info['count']} entries{more}")


def _text(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value

"""`lb stats [--watch SECONDS]`: packets, bytes and new flows per VIP and target; global counters."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import click

from lb import inspect
from lb.cli.common import config_option, echo_json, inspect_errors, json_option, load_config, table


def _rate(row: dict[str, Any], field: str) -> str | None:
    rates = row.get("rates")
    return None if rates is None else f"{rates[field]:.1f}/s"


def render(info: dict[str, Any]) -> str:
    watching = "interval_s" in info
    rate_heads = ["pkt/s", "B/s", "flows/s"] if watching else []
    out = []
    vips = [[f"{v['protocol']} {v['vip']}", v["listener"], v["packets"], v["bytes"], v["new_flows"],
             v["reply_packets"], v["reply_bytes"],
             *([_rate(v, "packets"), _rate(v, "bytes"), _rate(v, "new_flows")] if watching else [])]
            for v in info["vips"]]
    out.append(table(vips, ["vip", "listener", "packets", "bytes", "new flows", "reply pkts", "reply bytes",
                            *rate_heads]))
    targets = [[t["target"], t["target_id"], "in service" if t["in_service"] else "yes" if t["active"] else "no",
                ",".join(t["groups"]) or None,
                t["packets"], t["bytes"], t["new_flows"], t["reply_packets"], t["reply_bytes"],
                *([_rate(t, "packets"), _rate(t, "bytes"), _rate(t, "new_flows")] if watching else [])]
               for t in info["targets"]]
    out.append(table(targets, ["target", "id", "active", "groups", "packets", "bytes", "new flows", "reply pkts",
                               "reply bytes", *rate_heads]))
    counters = [[c["reason"], c["packets"], *([_rate(c, "packets")] if watching else []), c["help"]]
                for c in info["counters"]]
    out.append(table(counters, ["counter", "packets", *(["pkt/s"] if watching else []), "meaning"]))
    tables = [[t["table"], t["entries"], t["capacity"], f"{100 * t['entries'] / max(1, t['capacity']):.1f}%",
               t["inserts"], t["removed"], t["evictions"]] for t in info.get("tables", [])]
    out.append(table(tables, ["flow table", "entries", "capacity", "full", "inserts", "removed", "evictions"]))
    return "\n\n".join(out)


@click.command()
@click.option("--watch", type=click.FloatRange(min=0.1), metavar="SECONDS",
              help="Print again every SECONDS, with rates since the previous print (Ctrl-C stops).")
@click.option("--count", type=click.IntRange(min=1), default=None, help="With --watch: stop after N prints.")
@config_option
@json_option
def stats(watch: float | None, count: int | None, config_path: str | None, as_json: bool) -> None:
    """Per-VIP and per-target packets, bytes, new flows; global counters with their reasons.

    Counters are read from the per-CPU maps and summed. With --watch and
    --json, one JSON object per line.
    """
    config = load_config(config_path)
    with inspect_errors():
        before = inspect.stats(config)
        if watch is None:
            if as_json:
                echo_json(before)
            else:
                click.echo(render(before))
            return
        try:
            for n in itertools.count(1):
                time.sleep(watch)
                after = inspect.stats(config)
                info = inspect.stats_rates(before, after)
                if as_json:
                    click.echo(json.dumps(info, sort_keys=True))
                else:
                    click.echo(f"--- {time.strftime('%H:%M:%S')} (rates over {info['interval_s']:.1f}s)")
                    click.echo(render(info))
                before = after
                if count is not None and n >= count:
                    return
        except KeyboardInterrupt:
            return

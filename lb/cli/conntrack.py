"""`lb conntrack`: the L4 flows the kernel tracks, and where each one goes."""

from __future__ import annotations

import click

from lb import inspect
from lb.cli.common import config_option, echo_json, inspect_errors, json_option, load_config, table


@click.command()
@click.option("--vip", metavar="ADDR[:PORT]", help="Only flows to this VIP.")
@click.option("--target", metavar="ADDR[:PORT]", help="Only flows sent to this target.")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most N flows (default: all).")
@config_option
@json_option
def conntrack(vip: str | None, target: str | None, limit: int, config_path: str | None, as_json: bool) -> None:
    """Flows in the conntrack map, then the half-open ones: 5-tuple, target, age, idle time, TCP state.

    State "expired" (idle past the timeout) and "retired" (its target left)
    are still in the LRU, but their next packet is hashed onto the ring again.
    TCP: syn_sent and syn_recv (half-open: the handshake is not complete,
    tcp_syn_timeout), established, closing (one FIN), time_wait (FIN both
    ways, tcp_time_wait_timeout) or closed (RST, tcp_closed_timeout); a SYN
    does not follow a time_wait or closed entry. Mode: nat, full-nat (lb
    source: lb's address and the port it gave the flow) or dsr.
    """
    config = load_config(config_path)
    with inspect_errors():
        info = inspect.conntrack(config, vip=vip, target=target, limit=limit or None)
    if as_json:
        echo_json(info)
        return
    rows = [[f["protocol"], f["client"], f["vip"], f["mode"], f["source"] or "-", f["target"], f"{f['age_s']:.1f}s",
             f"{f['idle_s']:.1f}s", f["state"], f["tcp_state"]] for f in info["flows"]]
    click.echo(table(rows, ["proto", "client", "vip", "mode", "lb source", "target", "age", "idle", "state", "tcp"]))
    click.echo(f"{info['count']} flows{' (truncated: --limit)' if info['truncated'] else ''}")

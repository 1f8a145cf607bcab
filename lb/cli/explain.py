"""`lb explain http`, `lb explain flow`: where a request or a packet would go, and why."""

from __future__ import annotations

from typing import Any

import click

from lb import inspect
from lb.cli.common import config_option, echo_json, inspect_errors, json_option, load_config, table


@click.group()
def explain() -> None:
    """Explain a routing decision (L7 rules, L4 conntrack and ring)."""


def describe(action: dict[str, Any]) -> str:
    if action["type"] == "forward":
        groups = action["target_groups"]
        if len(groups) == 1:
            return f"forward to {groups[0]['name']}"
        return "forward to " + ", ".join(f"{g['name']} (weight {g['weight']})" for g in groups)
    if action["type"] == "redirect":
        return f"redirect {action['status_code']}"
    return f"fixed-response {action['status_code']}"


@explain.command("http")
@click.option("--listener", "-l", help="HTTP listener name (optional when there is one).")
@click.option("--method", "-m", default="GET", show_default=True)
@click.option("--host", "-H", default=None, help="Host header (leave out: no Host).")
@click.option("--path", "-p", default="/", show_default=True, help="Path, optionally with ?query.")
@click.option("--header", "headers", multiple=True, metavar="NAME:VALUE", help="A request header (repeatable).")
@click.option("--source", metavar="IP", default=None, help="Client address (default 0.0.0.0).")
@config_option
@json_option
def http(listener: str | None, method: str, host: str | None, path: str, headers: tuple[str, ...],
         source: str | None, config_path: str | None, as_json: bool) -> None:
    """The rule a request matches, why the earlier ones did not, and the target group."""
    config = load_config(config_path)
    with inspect_errors():
        info = inspect.explain_http(config, listener, method, host, path, headers, source)
    if as_json:
        echo_json(info)
        return
    li, req = info["listener"], info["request"]
    query = f"?{req['query']}" if req["query"] else ""
    click.echo(f"listener {li['name']} ({li['address']}:{li['port']}): {req['method']} "
               f"host {req['host'] or '(none)'} {req['path']}{query} from {req['source_ip']}")
    rows = []
    reached = True  # rules run in priority order until one matches
    for rule in info["rules"]:
        priority = "default" if rule["priority"] is None else rule["priority"]
        if rule["selected"]:
            rows.append([priority, "MATCH", describe(rule["action"]), None])
            reached = False
        elif reached:
            rows.append([priority, "no", describe(rule["action"]), rule["reason"]])
        else:
            rows.append([priority, "not reached", describe(rule["action"]), None])
    click.echo(table(rows, ["priority", "result", "action", "why not"]))
    selected = info["selected"]
    rule = "the default rule" if selected["priority"] is None else f"rule {selected['priority']}"
    click.echo(f"=> {rule}: {describe(selected['action'])}")
    for group in info["target_groups"]:
        targets = ", ".join(f"{bracketed(t['target'])}:{t['port']} ({t['state']})"
                            for t in group["targets"]) or "no targets"
        click.echo(f"   target group {group['name']}: {targets}")
    response = info["response"]
    if response and "location" in response:
        click.echo(f"   Location: {response['location']}")
    elif response:
        click.echo(f"   {response['content_type']}: {response['body']!r}")


def bracketed(address: str) -> str:
    """An IPv6 address in brackets, to be followed by :PORT."""
    return f"[{address}]" if ":" in address else address


@explain.command("flow")
@click.argument("protocol", type=click.Choice(["TCP", "UDP"], case_sensitive=False))
@click.argument("source", metavar="SRC:PORT")
@click.argument("destination", metavar="DST:PORT")
@config_option
@json_option
def flow(protocol: str, source: str, destination: str, config_path: str | None, as_json: bool) -> None:
    """The conntrack entry of a flow (its TCP state, and why it does or does not
    decide), else the ring slot and target; what a SYN would do; its replies."""
    config = load_config(config_path)
    with inspect_errors():
        info = inspect.explain_flow(config, protocol, source, destination)
    if as_json:
        echo_json(info)
        return
    head = f"{info['protocol']} {info['client']} -> {info['vip']}"
    if info["vip_id"] is None:
        click.echo(f"{head}: not a VIP; XDP passes it to the kernel untouched")
        return
    click.echo(f"{head} (listener {info['listener'] or '?'}, vip id {info['vip_id']}, mode {info['mode']})")
    ct, ring = info["conntrack"], info["ring"]
    if ct is None:
        click.echo("conntrack: no entry")
    else:
        tcp = f", {ct['tcp_state']}" if ct["tcp_state"] else ""
        click.echo(f"conntrack: target {ct['target']} (id {ct['target_id']}), age {ct['age_s']:.1f}s, "
                   f"idle {ct['idle_s']:.1f}s (timeout {ct['timeout_s']}s), {ct['state']}{tcp}: {ct['why']}")
    click.echo(f"ring: hash {ring['hash']:#010x} -> slot {ring['slot']} of {ring['size']} (half {ring['half']}) "
               f"-> target {ring['target'] or 'none'}")
    if info["decision"] == "conntrack":
        verdict = "the conntrack entry decides"
    elif info["decision"] == "ring":
        made = "an entry is made" if info["makes_entry"] else "no entry is made (only a SYN makes one)"
        verdict = f"hashed onto the ring, {made}" if info["protocol"] == "TCP" else "a new flow, hashed onto the ring"
    else:
        verdict = "no active target in that slot: dropped"
    segment = "a segment" if info["protocol"] == "TCP" else "a datagram"
    click.echo(f"=> {segment}: {info['target'] or 'no target'}: {verdict}")
    syn = info["syn"]
    if syn is not None:
        click.echo(f"=> a SYN: {syn['target'] or 'no target'}: {syn['why']}")
    full_nat = info["full_nat"]
    if full_nat is not None:
        whence = "the flow's entry" if full_nat["from_entry"] else "the first port a new flow tries"
        click.echo(f"full NAT: leaves lb from {full_nat['source'] or 'nowhere (no route to the target)'} ({whence}); "
                   "replies come back to it")
    reply = info["reply"]
    if reply is not None and info["mode"] == "nat":
        how = {"entry": "back to the VIP by the flow's entry",
               "ring": "back to the VIP by the ring alone (a half flow: no entry)",
               None: "passed untouched (no route to this VIP)"}[reply["by"]]
        click.echo(f"replies from {reply['target']}: {how}")

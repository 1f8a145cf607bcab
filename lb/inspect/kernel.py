"""The L4 tables in the kernel, named after the config: VIPs and their rings
(`lb vips`), conntrack (`lb conntrack`) and traffic counters (`lb stats`)."""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import itertools
import time
from typing import Any

from lb.dataplane.maps import Flow, IPAddress, Traffic, endpoint_text
from lb.dataplane.structs import COUNTER_HELP, NO_TARGET, Limits
from lb.inspect.access import open_maps
from lb.inspect.names import endpoint_groups, l4_listeners, parse_endpoint, vip_dict
from lb.model import LoadBalancer


def vips(config: LoadBalancer) -> list[dict[str, Any]]:
    """Every L4 VIP in the kernel with its ring.

    [{"vip": "ADDR:PORT", "protocol", "address", "port", "listener",
    "target_group" (None for a VIP the config does not know), "vip_id",
    "mode" (nat|full-nat|dsr), "ring_half" (live half), "ring_size", "empty_slots", "targets":
    [{"target_id", "target": "ADDR:PORT"|None, "active", "in_service", "slots",
    "share" (slots / ring_size)}]}], sorted by VIP; targets by target id.
    """
    listeners = l4_listeners(config)
    with open_maps(config, "lb vips") as maps:
        known = {t.target_id: t for t in maps.targets()}
        out = []
        for entry in maps.vips():
            counts = collections.Counter(maps.read_ring(entry.vip_id, entry.ring))
            empty = counts.pop(NO_TARGET, 0)
            size = maps.limits.ring_size
            listener, group = listeners.get(entry.vip, (None, None))
            targets = []
            for target_id, slots in sorted(counts.items()):
                t = known.get(target_id)
                targets.append({"target_id": target_id, "target": str(t.endpoint) if t else None,
                                "active": bool(t and t.active), "in_service": bool(t and t.in_service),
                                "slots": slots, "share": round(slots / size, 6)})
            out.append({**vip_dict(entry.vip), "listener": listener, "target_group": group, "vip_id": entry.vip_id,
                        "mode": entry.mode, "ring_half": entry.ring, "ring_size": size, "empty_slots": empty, "targets": targets})
        return out


def entry_timeout(flow: Flow, limits: Limits) -> int:
    """Seconds the entry lives without a packet, as bpf/lb.c timeout_ns() has it."""
    if flow.vip.protocol != "TCP":
        return limits.udp_idle_timeout
    if flow.half_open:
        return limits.tcp_syn_timeout
    if flow.tcp_state == "closed":
        return limits.tcp_closed_timeout
    if flow.tcp_state == "time_wait":
        return limits.tcp_time_wait_timeout
    return limits.tcp_idle_timeout


def flow_state(flow: Flow, limits: Limits, active: bool) -> str:
    """Whether the entry decides a (non-SYN) packet: live, or why not."""
    if flow.idle_s >= entry_timeout(flow, limits):
        return "expired"  # still in the LRU; the next packet is hashed again
    if not flow.current:
        return "stale"  # its VIP was deleted since: the next packet takes the vips path
    return "live" if active else "retired"  # retired: its target left, the next packet is hashed again


def conntrack(config: LoadBalancer, vip: str | None = None, target: str | None = None,
              limit: int | None = None) -> dict[str, Any]:
    """Flows in the conntrack LRU, then the half-open TCP flows (handshake not
    complete), optionally only to VIP or to TARGET ("ADDR[:PORT]").

    {"flows": [{"protocol", "client": "ADDR:PORT", "client_address",
    "client_port", "vip": "ADDR:PORT", "listener", "vip_id", "target":
    "ADDR:PORT"|None, "target_id", "age_s", "idle_s", "state"
    (live|expired|stale|retired), "tcp_state" (syn_sent|syn_recv|established|
    closing|time_wait|closed; None for UDP), "half_open" (true: in the
    half_open table, syn_sent or syn_recv), "timeout_s" (how long the entry
    lives without a packet in its TCP state), "mode" (nat|full-nat|dsr, the
    VIP's when the flow began), "source": "ADDR:PORT" (full NAT: lb's address
    and the port it gave the flow toward its target)|None}], "count",
    "truncated"}, sorted by VIP then client.
    """
    vip_filter = parse_endpoint(vip, port_required=False) if vip else None
    target_filter = parse_endpoint(target, port_required=False) if target else None
    listeners = l4_listeners(config)
    with open_maps(config, "lb conntrack") as maps:
        known = {t.target_id: t for t in maps.targets()}
        flows: list[dict[str, Any]] = []
        truncated = False
        for flow in itertools.chain(maps.flows(), maps.half_open_flows()):
            t = known.get(flow.target_id)
            if vip_filter and not _matches(vip_filter, flow.vip.address, flow.vip.port):
                continue
            if target_filter and not (t and _matches(target_filter, t.endpoint.address, t.endpoint.port)):
                continue
            if limit and len(flows) >= limit:
                truncated = True
                break
            flows.append({
                "protocol": flow.vip.protocol, "client": str(flow.client), "client_address": str(flow.client.address),
                "client_port": flow.client.port, "vip": endpoint_text(flow.vip.address, flow.vip.port),
                "listener": listeners.get(flow.vip, (None, None))[0], "vip_id": flow.vip_id,
                "target": str(t.endpoint) if t else None, "target_id": flow.target_id,
                "age_s": round(flow.age_s, 3), "idle_s": round(flow.idle_s, 3),
                "state": flow_state(flow, maps.limits, bool(t and t.active)), "tcp_state": flow.tcp_state,
                "half_open": flow.half_open, "timeout_s": entry_timeout(flow, maps.limits),
                "mode": flow.mode, "source": str(flow.source) if flow.source else None,
            })
        flows.sort(key=lambda f: (f["vip"], f["protocol"], _address_key(f["client_address"]), f["client_port"]))
        return {"flows": flows, "count": len(flows), "truncated": truncated}


def _address_key(text: str) -> tuple[int, int]:
    """IPv4 before IPv6, each in address order."""
    address = ipaddress.ip_address(text)
    return address.version, int(address)


def _matches(wanted: tuple[IPAddress, int | None], address: Any, port: int) -> bool:
    return wanted[0] == address and wanted[1] in (None, port)


_TRAFFIC = ("packets", "bytes", "new_flows", "reply_packets", "reply_bytes")


def _traffic(traffic: Traffic) -> dict[str, int]:
    return {f: getattr(traffic, f) for f in _TRAFFIC}


def stats(config: LoadBalancer) -> dict[str, Any]:
    """Traffic counters, per-CPU values summed.

    {"time" (epoch s), "vips": [{"vip", "protocol", "address", "port",
    "listener", "vip_id", "packets", "bytes", "new_flows", "reply_packets",
    "reply_bytes"}], "targets": [{"target", "target_id", "active", "in_service",
    "groups", ...the same five counters}], "counters": [{"reason", "packets",
    "help"}], "tables": [{"table" (conntrack|half_open), "capacity", "entries",
    "inserts", "removed", "evictions"}]} (counters: every enum lb_counter
    reason, bpf/consts.h; tables: Maps.table_usage, entries and evictions
    estimated from the program's bookkeeping, no walk).
    Forward packets count client → target, reply packets target → client.
    """
    listeners, groups = l4_listeners(config), endpoint_groups(config)
    with open_maps(config, "lb stats") as maps:
        now = time.time()
        vip_rows = [{**vip_dict(e.vip), "listener": listeners.get(e.vip, (None, None))[0], "vip_id": e.vip_id,
                     **_traffic(maps.vip_traffic(e.vip_id))} for e in maps.vips()]
        target_rows = [{"target": str(t.endpoint), "target_id": t.target_id, "active": t.active,
                        "in_service": t.in_service, "groups": groups.get(t.endpoint, []),
                        **_traffic(maps.target_traffic(t.target_id))}
                       for t in maps.targets()]
        counters = [{"reason": c.label, "packets": n, "help": COUNTER_HELP[c]} for c, n in maps.counters().items()]
        tables = [dataclasses.asdict(usage) for usage in maps.table_usage()]
    return {"time": now, "vips": vip_rows, "targets": target_rows, "counters": counters, "tables": tables}


def stats_rates(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """`after` with per-second rates since `before` (two stats() answers).

    Adds "interval_s", and to every row "rates": {"packets", "bytes",
    "new_flows"} per second (counters: {"packets"}); a row new since
    `before` counts from zero.
    """
    interval = max(after["time"] - before["time"], 1e-6)
    out: dict[str, Any] = {**after, "interval_s": round(interval, 3)}
    for section, key, fields in (("vips", "vip", ("packets", "bytes", "new_flows")),
                                 ("targets", "target_id", ("packets", "bytes", "new_flows")),
                                 ("counters", "reason", ("packets",))):
        old = {(row[key], row.get("protocol")): row for row in before[section]}
        rows = []
        for row in after[section]:
            prev = old.get((row[key], row.get("protocol")), {})
            rates = {f: round(max(0, row[f] - prev.get(f, 0)) / interval, 3) for f in fields}
            rows.append({**row, "rates": rates})
        out[section] = rows
    return out

"""Why traffic goes where it goes: which rule an HTTP request matches
(`lb explain http`), and where a packet's 5-tuple lands (`lb explain flow`),
with the kernel's flow hash recomputed in Python."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from lb.dataplane.maps import Endpoint, IPAddress, Maps, VipAddr, endpoint_text
from lb.dataplane.structs import CLOSED_TCP_STATES, FLOW_HASH_SEED, PROTO_NUMBERS, ip6_to_net, ip_to_net, port_to_net
from lb.inspect.access import InspectError, ask_daemon, open_maps
from lb.inspect.kernel import entry_timeout, flow_state
from lb.inspect.names import l4_listeners, parse_endpoint
from lb.l7.actions import Redirect
from lb.l7.rules import Request, Router
from lb.model import Action, FixedResponseAction, ForwardAction, LoadBalancer, Protocol, RedirectAction

_U32 = 0xFFFFFFFF


def _action(action: Action) -> dict[str, Any]:
    if isinstance(action, ForwardAction):
        return {"type": "forward", "stickiness": action.stickiness.enabled,
                "target_groups": [{"name": g.name, "weight": g.weight} for g in action.target_groups]}
    if isinstance(action, RedirectAction):
        return {"type": "redirect", "status_code": action.status_code, "protocol": action.protocol,
                "host": action.host, "port": action.port, "path": action.path, "query": action.query}
    assert isinstance(action, FixedResponseAction)
    return {"type": "fixed-response", "status_code": action.status_code, "content_type": action.content_type,
            "body": action.body}


def _group_targets(config: LoadBalancer, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Each named group's targets: with their health from one daemon request
    when it answers, else from the config (state "unknown")."""
    rows, _ = ask_daemon(config, "targets") if os.geteuid() == 0 else (None, None)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        if rows is not None:
            out[name] = [{"target": r["target"], "port": r["port"], "state": r["state"]}
                         for r in rows if r["group"] == name]
        else:
            group = config.target_group(name)
            out[name] = [{"target": str(t.address), "port": t.traffic_port(group.port), "state": "unknown"}
                         for t in group.targets]
    return out


def explain_http(config: LoadBalancer, listener: str | None, method: str, host: str | None, path: str,
                 headers: list[str] | tuple[str, ...] = (), source: str | None = None) -> dict[str, Any]:
    """Which rule of an HTTP listener a request matches, and why not the earlier ones.

    `path` may carry "?query"; `headers` are "Name: value" strings; `source`
    is the client address (default 0.0.0.0); `listener` may be None when
    there is one HTTP listener.

    {"listener": {"name", "address", "port"}, "request": {"method", "host",
    "path", "query", "headers": [[name, value]], "source_ip"}, "rules":
    [{"priority" (None: the default rule), "matched", "selected", "reason"
    (why the first failing condition failed), "action"}], "selected": the
    selected rule's object, "target_groups": [{"name", "weight", "targets":
    [{"target", "port", "state"}]}] (forward only), "response": {"status",
    "location"} for a redirect, {"status", "content_type", "body"} for a
    fixed response, else None}. Actions: {"type": "forward", "target_groups":
    [{"name", "weight"}], "stickiness"} | {"type": "redirect", "status_code",
    "protocol", "host", "port", "path", "query"} | {"type": "fixed-response",
    "status_code", "content_type", "body"}.
    """
    http = config.listeners_of(Protocol.HTTP)
    if listener is None:
        if len(http) != 1:
            names = ", ".join(li.name for li in http) or "none is HTTP"
            raise InspectError(f"say which listener (--listener): {names}")
        chosen = http[0]
    else:
        found = [li for li in config.listeners if li.name == listener]
        if not found or found[0].protocol is not Protocol.HTTP:
            names = ", ".join(li.name for li in http) or "none"
            raise InspectError(f"no HTTP listener {listener!r} (HTTP listeners: {names})")
        chosen = found[0]
    path, _, query = path.partition("?")
    if not path.startswith("/"):
        raise InspectError(f"path {path!r} must start with '/'")
    parsed = []
    for header in headers:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            raise InspectError(f"header {header!r} is not NAME:VALUE")
        parsed.append((name.strip().lower(), value.strip()))
    try:
        source_ip = ipaddress.ip_address(source or "0.0.0.0")
    except ValueError:
        raise InspectError(f"source {source!r} is not an IP address") from None
    request = Request(method, host, path, query, tuple(parsed), source_ip)
    verdicts = Router.compile(chosen).explain(request)
    rules = [{"priority": v.priority, "matched": v.matched, "selected": v.selected, "reason": v.reason,
              "action": _action(v.action)} for v in verdicts]
    selected = next(v for v in verdicts if v.selected)
    action = selected.action
    response: dict[str, Any] | None = None
    groups = []
    if isinstance(action, ForwardAction):
        targets = _group_targets(config, [g.name for g in action.target_groups])
        groups = [{"name": g.name, "weight": g.weight, "targets": targets[g.name]} for g in action.target_groups]
    elif isinstance(action, RedirectAction):
        location = Redirect(action).location(host, path, query, chosen.port, str(chosen.address))
        response = {"status": action.status_code, "location": location}
    else:
        assert isinstance(action, FixedResponseAction)
        response = {"status": action.status_code, "content_type": action.content_type, "body": action.body}
    return {
        "listener": {"name": chosen.name, "address": str(chosen.address), "port": chosen.port},
        "request": {"method": method, "host": host, "path": path, "query": query,
                    "headers": [list(h) for h in parsed], "source_ip": str(source_ip)},
        "rules": rules,
        "selected": next(r for r in rules if r["selected"]),
        "target_groups": groups,
        "response": response,
    }


def _mix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _U32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _U32
    return h ^ (h >> 16)


def flow_hash(protocol: str, src: IPAddress, sport: int, dst: IPAddress, dport: int) -> int:
    """bpf/lb.c flow_hash() (flow_hash6 for IPv6): murmur3's finalizer over the
    5-tuple, fields as the packet holds them (network order, read as
    little-endian u32/u16; an IPv6 address as four such words)."""
    h = FLOW_HASH_SEED
    for address in (src, dst):
        if isinstance(address, ipaddress.IPv6Address):
            for word in ip6_to_net(address).words:
                h = _mix32(h ^ word)
        else:
            h = _mix32(h ^ ip_to_net(address))
    h = _mix32(h ^ ((port_to_net(sport) << 16) | port_to_net(dport)))
    return _mix32(h ^ PROTO_NUMBERS[protocol])


def fullnat_port(flow_hash_value: int, attempt: int, low: int, high: int) -> int:
    """bpf/fullnat.h fullnat_port(): the source port full NAT tries `attempt`-th
    (from 0) for a flow of this flow_hash, in LOW..HIGH (host order)."""
    x = flow_hash_value ^ ((attempt * 0x9E3779B9) & _U32)
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _U32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _U32
    x ^= x >> 16
    return low + x % (high - low + 1)


def explain_flow(config: LoadBalancer, protocol: str, source: str, destination: str) -> dict[str, Any]:
    """Where a packet of this 5-tuple goes, as bpf/lb.c decides it: its
    conntrack entry, else the ring; what a SYN would do; and its replies.

    {"protocol", "client", "vip", "listener", "vip_id" (None: not a VIP),
    "decision" (for a segment of the flow that is not a SYN, or any UDP
    datagram: "conntrack": the entry decides | "ring": hashed onto the ring |
    "drop": no target in the slot | "pass": not a VIP, the kernel gets it),
    "target": "ADDR:PORT"|None, "target_id", "makes_entry" (taking the ring,
    the packet makes or replaces the entry: a UDP datagram, or a TCP segment
    whose open entry could not decide; a TCP segment of no entry makes none),
    "conntrack": {"target", "target_id", "age_s", "idle_s", "state"
    (live|expired|stale|retired), "half_open" (true: the TCP handshake is not
    complete, the entry is in half_open), "tcp_state" (syn_sent|syn_recv|
    established|closing|time_wait|closed; None for UDP), "timeout_s",
    "decides" (for a segment),
    "syn_decides", "why" (why it does or does not decide)}|None, "syn":
    {"decision", "target", "target_id", "why"}|None (TCP only: a SYN does not
    follow an entry that is closed or whose target is out of service), "ring":
    {"hash", "size", "half", "slot", "target_id", "target"}|None, "reply":
    {"target" (whose replies the flow gets), "vips" (the VIPs that endpoint
    serves), "by" ("entry": the flow's entry names the VIP | "ring": no entry,
    the ring sends this flow to that target | None: its replies pass
    untouched), "half_flow" (true: no entry, the replies go back by the ring
    alone)}|None, "mode" (the VIP's: nat|full-nat|dsr), "full_nat": {"source"
    ("ADDR:PORT": lb's address and the flow's port, from its entry; or the
    first port a new flow would try), "from_entry"}|None}. "ring" is where a
    new flow would land, given even when a live entry decides. A full-NAT
    flow's replies come to lb's source address, not through `replies`.
    """
    proto = protocol.upper()
    if proto not in PROTO_NUMBERS:
        raise InspectError(f"protocol {protocol!r}: TCP or UDP")
    src_ip, sport = parse_endpoint(source)
    dst_ip, dport = parse_endpoint(destination)
    assert sport is not None and dport is not None
    if src_ip.version != dst_ip.version:
        raise InspectError(f"{source} -> {destination}: a flow stays within one family (IPv4 or IPv6)")
    with open_maps(config, "lb explain flow") as maps:
        out = explain_flow_in(maps, proto, Endpoint(src_ip, sport), Endpoint(dst_ip, dport))
    out["listener"] = l4_listeners(config).get(VipAddr(dst_ip, dport, proto), (None, None))[0]
    return out


def explain_flow_in(maps: Maps, proto: str, client: Endpoint, destination: Endpoint) -> dict[str, Any]:
    """explain_flow on open maps (no "listener" names: those come from the config)."""
    vip = VipAddr(destination.address, destination.port, proto)
    out: dict[str, Any] = {"protocol": proto, "client": str(client), "vip": str(destination), "listener": None,
                           "vip_id": None, "mode": None, "full_nat": None, "decision": "pass", "target": None, "target_id": None,
                           "makes_entry": False, "conntrack": None, "syn": None, "ring": None, "reply": None}
    entry = next((e for e in maps.vips() if e.vip == vip), None)
    if entry is None:
        return out
    out["vip_id"] = entry.vip_id
    out["mode"] = entry.mode
    known = {t.target_id: t for t in maps.targets()}

    def name(target_id: int | None) -> str | None:
        t = known.get(target_id) if target_id is not None else None
        return str(t.endpoint) if t else None

    size = maps.limits.ring_size
    hashed = flow_hash(proto, client.address, client.port, destination.address, destination.port)
    ring_target = maps.ring_slot(entry.vip_id, entry.ring, hashed % size)
    out["ring"] = {"hash": hashed, "size": size, "half": entry.ring, "slot": hashed % size,
                   "target_id": ring_target, "target": name(ring_target)}
    ring_ok = ring_target is not None and bool(known.get(ring_target) and known[ring_target].active)
    by_ring = ({"decision": "ring", "target": name(ring_target), "target_id": ring_target} if ring_ok
               else {"decision": "drop", "target": None, "target_id": None})

    flow = maps.flow(proto, client, destination)
    decides = syn_decides = False
    if flow is not None:
        t = known.get(flow.target_id)
        state = flow_state(flow, maps.limits, bool(t and t.active))
        closed = flow.tcp_state in CLOSED_TCP_STATES
        decides = state == "live"
        syn_decides = decides and bool(t and t.in_service) and not closed
        why = _entry_why(state, flow.tcp_state, bool(t and t.in_service), entry_timeout(flow, maps.limits))
        if flow.half_open and decides:
            why = (f"half-open ({flow.tcp_state}): its segments go to its target; the client's ACK of the "
                   "target's SYN-ACK moves it to conntrack"
                   + ("" if syn_decides else "; its target is out of service: a SYN takes the ring"))
        out["conntrack"] = {"target": name(flow.target_id), "target_id": flow.target_id,
                            "half_open": flow.half_open,
                            "age_s": round(flow.age_s, 3), "idle_s": round(flow.idle_s, 3), "state": state,
                            "tcp_state": flow.tcp_state, "timeout_s": entry_timeout(flow, maps.limits),
                            "mode": flow.mode, "source": str(flow.source) if flow.source else None,
                            "decides": decides, "syn_decides": syn_decides, "why": why}
    if decides:
        assert flow is not None
        out.update(decision="conntrack", target=name(flow.target_id), target_id=flow.target_id)
    else:
        out.update(by_ring)
        reopens = flow is not None and not flow.half_open and flow.tcp_state not in CLOSED_TCP_STATES
        out["makes_entry"] = ring_ok and (proto == "UDP" or reopens)
    if proto == "TCP":
        if syn_decides:
            assert flow is not None
            out["syn"] = {"decision": "conntrack", "target": name(flow.target_id), "target_id": flow.target_id,
                          "why": "its entry is open and its target in service: a retransmitted SYN stays there"}
        else:
            why = ("a new flow, hashed onto the ring" if flow is None
                   else "its entry must not decide a SYN: hashed onto the ring, the entry replaced")
            out["syn"] = {**by_ring, "why": why}

    # Replies: from whichever target the flow's next segment reaches.
    target_id = out["target_id"]
    if entry.mode == "full-nat" and target_id is not None:
        if decides and flow is not None and flow.source is not None:
            out["full_nat"] = {"source": str(flow.source), "from_entry": True}
        else:
            source = maps.fullnat_source(target_id)
            port = fullnat_port(hashed, 0, maps.limits.fullnat_port_min, maps.limits.fullnat_port_max)
            out["full_nat"] = {"source": endpoint_text(source, port) if source else None, "from_entry": False}
    if target_id is not None and target_id in known:
        endpoint = known[target_id].endpoint
        route = maps.route(endpoint, proto)
        vips = [endpoint_text(v.vip.address, v.vip.port) for v in route.vips] if route else []
        by: str | None = None
        if route is not None and any(v.vip == vip for v in route.vips):
            entry_names_it = (flow is not None and flow.target_id == target_id and flow.current
                              and flow.idle_s < entry_timeout(flow, maps.limits))
            by = "entry" if entry_names_it else "ring" if ring_target == target_id else None
        out["reply"] = {"target": str(endpoint), "vips": vips, "by": by, "half_flow": by == "ring"}
    return out


def _entry_why(state: str, tcp: str | None, in_service: bool, timeout: int) -> str:
    if state == "expired":
        return f"idle past its {timeout} s timeout: the ring decides"
    if state == "stale":
        return "its VIP was deleted since: the ring decides"
    if state == "retired":
        return "its target is not active (removed or its connections terminated): the ring decides"
    if tcp in CLOSED_TCP_STATES:
        return f"{tcp}: segments still go to its target for {timeout} s idle; a SYN takes the ring"
    if not in_service:
        return "its target is out of service (draining or unhealthy): its segments go on, a SYN takes the ring"
    return "it decides, for a SYN too"

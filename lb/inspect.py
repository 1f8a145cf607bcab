"""What the kernel and the daemon are doing, as plain data.

The API under `lb status`, `lb vips`, `lb targets`, `lb maps`, `lb conntrack`,
`lb stats` and `lb explain`: every function takes the config and returns
JSON-able dicts and lists whose keys are a stable schema, written down in
each docstring (keys are only ever added). Addresses are strings, endpoints
"ADDRESS:PORT", durations seconds (floats), missing values None.

Where the answers come from:

- kernel state (VIPs, rings, targets, conntrack, counters) from the maps
  pinned under /sys/fs/bpf/lb/<name>/, opened with libbpf and no compiler,
  so they work whether the daemon runs or not;
- target health from the daemon's admin socket: only the daemon checks
  targets; without it, the config's targets are listed with state "unknown";
- rules (`explain_http`) from the config alone.

Errors a user can cause raise InspectError with a message to print: not root
("... needs root: run with sudo"), nothing pinned ("nothing loaded for
<name>: is lb up?"), an unknown group, map, listener or a malformed address.
"""

from __future__ import annotations

import collections
import ctypes
import ipaddress
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lb import admin
from lb.dataplane.libbpf import BpfError, BpfMap
from lb.dataplane.maps import Endpoint, Flow, Maps, MapsNotLoaded, Traffic, VipAddr
from lb.dataplane.structs import (
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    COUNTER_HELP,
    FLOW_HASH_SEED,
    MAP_TYPE_NAMES,
    NO_TARGET,
    PROTO_NAMES,
    PROTO_NUMBERS,
    Counter,
    Limits,
    MapName,
    ip_to_net,
    map_specs,
    net_to_ip,
    net_to_port,
    port_to_net,
)
from lb.model import Action, FixedResponseAction, ForwardAction, LoadBalancer, Protocol, RedirectAction

_U32 = 0xFFFFFFFF


class InspectError(RuntimeError):
    """The question cannot be answered; the message says why and what to do."""


# --- access ----------------------------------------------------------------------


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise InspectError(f"{what} needs root: run with sudo (it reads pinned BPF maps and /run/lb)")


def limits_for(config: LoadBalancer) -> Limits:
    from lb.daemon import limits_for as daemon_limits  # the daemon's, so both open maps alike

    return daemon_limits(config)


@contextmanager
def open_maps(config: LoadBalancer, what: str) -> Iterator[Maps]:
    """The pinned maps of `config.name`, read-only in spirit (nothing here writes)."""
    from lb.dataplane.loader import check_pinned_maps, pin_dir

    require_root(what)
    directory, limits = pin_dir(config.name), limits_for(config)
    try:
        problems = check_pinned_maps(directory, limits)
        maps = Maps(directory, limits)
    except MapsNotLoaded:
        raise InspectError(f"nothing loaded for {config.name}: is lb up? (no maps pinned under {directory})") from None
    except BpfError as exc:
        raise InspectError(f"{directory}: {exc}") from None
    if problems:
        maps.close()
        raise InspectError("the pinned maps do not match this config's limits:\n  " + "\n  ".join(problems))
    with maps:
        yield maps


def _daemon(config: LoadBalancer, cmd: str, **args: Any) -> tuple[Any, str | None]:
    """(result, None) from the admin socket, or (None, why the daemon could not answer)."""
    try:
        return admin.request(config.admin_socket, cmd, timeout=5, **args), None
    except admin.AdminError as exc:
        return None, str(exc)


# --- naming things ---------------------------------------------------------------


def _vip_dict(vip: VipAddr) -> dict[str, Any]:
    return {"vip": f"{vip.address}:{vip.port}", "protocol": vip.protocol, "address": str(vip.address), "port": vip.port}


def _l4_listeners(config: LoadBalancer) -> dict[VipAddr, tuple[str, str | None]]:
    """VIP → (listener name, its target group)."""
    out = {}
    for li in config.listeners_of(Protocol.TCP, Protocol.UDP):
        action = li.default_action
        group = action.target_groups[0].name if isinstance(action, ForwardAction) else None
        out[VipAddr(li.address, li.port, li.protocol.value)] = (li.name, group)  # type: ignore[arg-type]
    return out


def _endpoint_groups(config: LoadBalancer) -> dict[Endpoint, list[str]]:
    """L4 target endpoint → the target groups (of the config) that list it."""
    out: dict[Endpoint, list[str]] = collections.defaultdict(list)
    for group in config.target_groups:
        if group.protocol.is_l4:
            for address, port in group.endpoints():
                out[Endpoint(address, port)].append(group.name)  # type: ignore[arg-type]
    return out


def parse_endpoint(text: str, *, port_required: bool = True) -> tuple[ipaddress.IPv4Address, int | None]:
    """"10.0.0.2:40000" → (address, port); "10.0.0.2" when the port is optional."""
    address, colon, port = text.strip().rpartition(":")
    if not colon:
        address, port = text.strip(), ""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise InspectError(f"{text!r} is not an IPv4 ADDRESS{':PORT' if port_required else '[:PORT]'}") from None
    if not port:
        if port_required:
            raise InspectError(f"{text!r}: a port is needed (ADDRESS:PORT)")
        return ip, None
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise InspectError(f"{text!r}: the port must be 1..65535")
    return ip, int(port)


# --- status ----------------------------------------------------------------------


def attached_interfaces(config: LoadBalancer) -> list[str]:
    """Interfaces the last `lb up` attached to (its state file), else the config's."""
    from lb.daemon import RuntimeState, xdp_interfaces

    state = RuntimeState.load(config.name)
    if state is not None and state.attachments:
        return [a["ifname"] for a in state.attachments]
    if config.interfaces:
        return list(config.interfaces)
    if config.netns is None:
        return xdp_interfaces(config)
    return []


def pinned_program(config: LoadBalancer) -> dict[str, Any] | None:
    """The program pinned at <pin dir>/prog: {"id", "name", "loaded_at" (epoch s)}, or None."""
    from lb.dataplane import libbpf
    from lb.dataplane.loader import PROGRAM_PIN, pin_dir

    path = os.path.join(pin_dir(config.name), PROGRAM_PIN)
    if not os.path.exists(path):
        return None
    fd = libbpf.obj_get(path)
    try:
        info = libbpf.prog_info(fd)
    finally:
        os.close(fd)
    since_load = time.clock_gettime(time.CLOCK_BOOTTIME) - info.load_time_ns / 1e9
    return {"id": info.prog_id, "name": info.name, "loaded_at": time.time() - since_load}


def status(config: LoadBalancer) -> dict[str, Any]:
    """Is the daemon up, where is XDP attached, what is pinned, which config.

    {"name", "daemon": {"running": bool, "reason": str|None, "pid"?, ...the
    admin "status" answer when running}, "config": {"path", "loaded_at"}
    (from the daemon, else its state file; None when unknown), "xdp":
    [{"interface", "mode" (native|generic|None|"no such interface"),
    "program_id", "ours" (the pinned program is the one attached)}],
    "program": pinned_program(), "pin_dir", "maps_pinned", "metrics_address",
    "listeners": [{"name", "protocol", "address", "port"}]}
    """
    from lb import netlink as nl
    from lb.daemon import RuntimeState
    from lb.dataplane.loader import pin_dir

    require_root("lb status")
    running, reason = _daemon(config, "status")
    daemon: dict[str, Any] = {"running": False, "reason": reason}
    if running:
        daemon = {"running": True, "reason": None, **running}
    state = RuntimeState.load(config.name)
    if running:
        loaded = {"path": running["config"], "loaded_at": running["loaded_at"]}
    elif state is not None:
        loaded = {"path": state.config_path or "<embedded default>", "loaded_at": state.loaded_at}
    else:
        loaded = {"path": None, "loaded_at": None}
    program = pinned_program(config)
    xdp = []
    if config.netns is None or nl.netns_exists(config.netns):
        with nl.iproute(config.netns) as ipr:
            for ifname in attached_interfaces(config):
                try:
                    mode, prog_id = nl.xdp_info(ipr, ifname)
                except nl.NetlinkLookupError:
                    mode, prog_id = "no such interface", None
                ours = program is not None and prog_id == program["id"]
                xdp.append({"interface": ifname, "mode": mode, "program_id": prog_id, "ours": ours})
    return {
        "name": config.name,
        "daemon": daemon,
        "config": loaded,
        "xdp": xdp,
        "program": program,
        "pin_dir": pin_dir(config.name),
        "maps_pinned": os.path.isdir(pin_dir(config.name)) and os.path.exists(
            os.path.join(pin_dir(config.name), MapName.VIPS.value)),
        "metrics_address": config.metrics_address,
        "listeners": [
            {"name": li.name, "protocol": li.protocol.value, "address": str(li.address), "port": li.port}
            for li in config.listeners
        ],
    }


# --- vips ------------------------------------------------------------------------


def vips(config: LoadBalancer) -> list[dict[str, Any]]:
    """Every L4 VIP in the kernel with its ring.

    [{"vip": "ADDR:PORT", "protocol", "address", "port", "listener",
    "target_group" (None for a VIP the config does not know), "vip_id",
    "ring_half" (live half), "ring_size", "empty_slots", "targets":
    [{"target_id", "target": "ADDR:PORT"|None, "active", "slots", "share"
    (slots / ring_size)}]}], sorted by VIP; targets by target id.
    """
    listeners = _l4_listeners(config)
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
                                "active": bool(t and t.active), "slots": slots, "share": round(slots / size, 6)})
            out.append({**_vip_dict(entry.vip), "listener": listener, "target_group": group, "vip_id": entry.vip_id,
                        "ring_half": entry.ring, "ring_size": size, "empty_slots": empty, "targets": targets})
        return out


# --- targets ---------------------------------------------------------------------


def targets(config: LoadBalancer, group: str | None = None) -> dict[str, Any]:
    """Every registered target with its health, as describe-target-health.

    {"daemon": {"running": bool, "reason": str|None}, "targets": [{"group",
    "target" (address), "port", "state", "reason", "description",
    "last_latency_ms", "last_result" ("passed"|"failed"|None),
    "last_checked_ago_s"}]}. The last two are None unless the daemon reports
    them. With the daemon down: the config's targets, state "unknown".
    """
    require_root("lb targets")
    names = [g.name for g in config.target_groups]
    if group is not None and group not in names:
        raise InspectError(f"no target group {group!r} (groups: {', '.join(names) or 'none'})")
    rows, reason = _daemon(config, "targets", group=group)
    if rows is None and reason is not None and reason.startswith("no target group"):
        raise InspectError(f"the running daemon: {reason} (reload it after changing the config)")
    if rows is not None:
        fields = ("group", "target", "port", "state", "reason", "description", "last_latency_ms",
                  "last_result", "last_checked_ago_s")
        return {"daemon": {"running": True, "reason": None},
                "targets": [{key: row.get(key) for key in fields} for row in rows]}
    out = []
    for g in config.target_groups:
        if group is None or g.name == group:
            for t in g.targets:
                out.append({"group": g.name, "target": str(t.address), "port": t.traffic_port(g.port),
                            "state": "unknown", "reason": None, "description": "the daemon is not running",
                            "last_latency_ms": None, "last_result": None, "last_checked_ago_s": None})
    return {"daemon": {"running": False, "reason": reason}, "targets": out}


# --- maps ------------------------------------------------------------------------

_ARRAYS = (BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY)
_ADDRESS_FIELDS = ("addr", "src", "dst", "vip_addr")
_PORT_FIELDS = ("port", "sport", "dport", "vip_port")
COUNT_CAP = 1_000_000  # keys walked to count a hash map's entries


def _map_names() -> str:
    return ", ".join(name.value for name in MapName)


def maps_list(config: LoadBalancer) -> list[dict[str, Any]]:
    """Every pinned map.

    [{"name", "path", "type" (hash|array|percpu_array|lru_hash), "id",
    "key_size", "value_size", "max_entries", "entries", "per_cpu"}].
    "entries": keys present for a hash map (walked, up to COUNT_CAP); for an
    array, max_entries (every index of an array exists).
    """
    with open_maps(config, "lb maps list") as maps:
        out = []
        for name, spec in map_specs(maps.limits).items():
            bpf_map, info = maps.raw(name), maps.raw(name).info
            if info.map_type in _ARRAYS:
                entries = info.max_entries
            else:
                entries = sum(1 for _, _ in zip(range(COUNT_CAP), bpf_map.keys()))
            out.append({"name": name.value, "path": os.path.join(maps.directory, name.value),
                        "type": MAP_TYPE_NAMES.get(info.map_type, str(info.map_type)), "id": info.map_id,
                        "key_size": info.key_size, "value_size": info.value_size, "max_entries": info.max_entries,
                        "entries": entries, "per_cpu": spec.per_cpu})
        return out


def _fields(struct: ctypes.Structure) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, *_ in struct._fields_:
        if field == "pad":
            continue
        value = getattr(struct, field)
        if field in _ADDRESS_FIELDS:
            value = str(net_to_ip(value))
        elif field in _PORT_FIELDS:
            value = net_to_port(value)
        elif field == "proto":
            value = PROTO_NAMES.get(value, value)
        out[field] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, ctypes.Structure):
        return _fields(value)
    return int(value.value if hasattr(value, "value") else value)


def _decode_key(name: MapName, key: Any, limits: Limits) -> Any:
    if name is MapName.COUNTERS:
        index = int(key.value)
        return {"index": index, "reason": Counter(index).label if index < len(Counter) else None}
    if name is MapName.RINGS:
        slot = int(key.value)
        block, index = divmod(slot, limits.ring_size)
        return {"slot": slot, "vip_id": block // 2, "half": block % 2, "index": index}
    return _plain(key)


def _decode_value(name: MapName, value: Any, per_cpu: bool, now_ns: int) -> Any:
    if per_cpu:
        cells = [_plain(cell) for cell in value]
        if cells and isinstance(cells[0], dict):
            return {"total": {f: sum(c[f] for c in cells) for f in cells[0]}, "per_cpu": cells}
        return {"total": sum(cells), "per_cpu": cells}
    plain = _plain(value)
    if name is MapName.RINGS:
        return None if plain == NO_TARGET else plain
    if name is MapName.CONNTRACK:
        plain["age_s"] = round(max(0, now_ns - plain["created_ns"]) / 1e9, 3)
        plain["idle_s"] = round(max(0, now_ns - plain["last_seen_ns"]) / 1e9, 3)
    return plain


def _is_zero(value: Any) -> bool:
    return not any(bytes(value))


def maps_dump(config: LoadBalancer, name: str, limit: int = 100) -> dict[str, Any]:
    """The decoded entries of one map.

    {"name", "type", "entries": [{"key", "value"}], "count", "truncated"}.
    Keys and values are decoded: structs become objects (addresses dotted,
    ports in host order, pad fields left out), per-CPU values
    {"total", "per_cpu": [...]}; `counters` keys {"index", "reason"},
    `rings` keys {"slot", "vip_id", "half", "index"} and values a target id
    (None: empty slot). Array entries whose value is all zero bytes are left
    out, except in `rings` (0 is a target id). limit 0: no limit.
    """
    try:
        map_name = MapName(name)
    except ValueError:
        raise InspectError(f"no map {name!r} (maps: {_map_names()})") from None
    with open_maps(config, "lb maps dump") as maps:
        spec = map_specs(maps.limits)[map_name]
        bpf_map: BpfMap = maps.raw(map_name)
        skip_zero = bpf_map.info.map_type in _ARRAYS and map_name is not MapName.RINGS
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        entries: list[dict[str, Any]] = []
        truncated = False
        for key, value in bpf_map.items():
            if skip_zero and _is_zero(value):
                continue
            if limit and len(entries) >= limit:
                truncated = True
                break
            entries.append({"key": _decode_key(map_name, key, maps.limits),
                            "value": _decode_value(map_name, value, spec.per_cpu, now_ns)})
        return {"name": map_name.value, "type": MAP_TYPE_NAMES.get(bpf_map.info.map_type, ""),
                "entries": entries, "count": len(entries), "truncated": truncated}


# --- conntrack -------------------------------------------------------------------


def _flow_state(flow: Flow, limits: Limits, active: bool) -> str:
    timeout = limits.tcp_idle_timeout if flow.vip.protocol == "TCP" else limits.udp_idle_timeout
    if flow.idle_s >= timeout:
        return "expired"  # still in the LRU; the next packet is hashed again
    return "live" if active else "retired"  # retired: its target left, the next packet is hashed again


def conntrack(config: LoadBalancer, vip: str | None = None, target: str | None = None,
              limit: int | None = None) -> dict[str, Any]:
    """Flows in the conntrack LRU, optionally only to VIP or to TARGET ("ADDR[:PORT]").

    {"flows": [{"protocol", "client": "ADDR:PORT", "client_address",
    "client_port", "vip": "ADDR:PORT", "listener", "vip_id", "target":
    "ADDR:PORT"|None, "target_id", "age_s", "idle_s", "state"
    (live|expired|retired)}], "count", "truncated"}, sorted by VIP then client.
    """
    vip_filter = parse_endpoint(vip, port_required=False) if vip else None
    target_filter = parse_endpoint(target, port_required=False) if target else None
    listeners = _l4_listeners(config)
    with open_maps(config, "lb conntrack") as maps:
        known = {t.target_id: t for t in maps.targets()}
        flows: list[dict[str, Any]] = []
        truncated = False
        for flow in maps.flows():
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
                "client_port": flow.client.port, "vip": f"{flow.vip.address}:{flow.vip.port}",
                "listener": listeners.get(flow.vip, (None, None))[0], "vip_id": flow.vip_id,
                "target": str(t.endpoint) if t else None, "target_id": flow.target_id,
                "age_s": round(flow.age_s, 3), "idle_s": round(flow.idle_s, 3),
                "state": _flow_state(flow, maps.limits, bool(t and t.active)),
            })
        flows.sort(key=lambda f: (f["vip"], f["protocol"], ipaddress.IPv4Address(f["client_address"]),
                                  f["client_port"]))
        return {"flows": flows, "count": len(flows), "truncated": truncated}


def _matches(wanted: tuple[ipaddress.IPv4Address, int | None], address: Any, port: int) -> bool:
    return wanted[0] == address and wanted[1] in (None, port)


# --- stats -----------------------------------------------------------------------

_TRAFFIC = ("packets", "bytes", "new_flows", "reply_packets", "reply_bytes")


def _traffic(traffic: Traffic) -> dict[str, int]:
    return {f: getattr(traffic, f) for f in _TRAFFIC}


def stats(config: LoadBalancer) -> dict[str, Any]:
    """Traffic counters, per-CPU values summed.

    {"time" (epoch s), "vips": [{"vip", "protocol", "address", "port",
    "listener", "vip_id", "packets", "bytes", "new_flows", "reply_packets",
    "reply_bytes"}], "targets": [{"target", "target_id", "active", "groups",
    ...the same five counters}], "counters": [{"reason", "packets", "help"}]}.
    Forward packets count client → target, reply packets target → client.
    """
    listeners, groups = _l4_listeners(config), _endpoint_groups(config)
    with open_maps(config, "lb stats") as maps:
        now = time.time()
        vip_rows = [{**_vip_dict(e.vip), "listener": listeners.get(e.vip, (None, None))[0], "vip_id": e.vip_id,
                     **_traffic(maps.vip_traffic(e.vip_id))} for e in maps.vips()]
        target_rows = [{"target": str(t.endpoint), "target_id": t.target_id, "active": t.active,
                        "groups": groups.get(t.endpoint, []), **_traffic(maps.target_traffic(t.target_id))}
                       for t in maps.targets()]
        counters = [{"reason": c.label, "packets": n, "help": COUNTER_HELP[c]} for c, n in maps.counters().items()]
    return {"time": now, "vips": vip_rows, "targets": target_rows, "counters": counters}


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


# --- explain ---------------------------------------------------------------------


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


def _group_targets(config: LoadBalancer, name: str) -> list[dict[str, Any]]:
    """A group's targets: with their health when the daemon answers, else from the config."""
    rows, _ = _daemon(config, "targets", group=name) if os.geteuid() == 0 else (None, None)
    if rows is not None:
        return [{"target": r["target"], "port": r["port"], "state": r["state"]} for r in rows]
    group = config.target_group(name)
    return [{"target": str(t.address), "port": t.traffic_port(group.port), "state": "unknown"} for t in group.targets]


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
    from lb.l7.actions import Redirect
    from lb.l7.rules import Request, Router

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
        groups = [{"name": g.name, "weight": g.weight, "targets": _group_targets(config, g.name)}
                  for g in action.target_groups]
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


def flow_hash(protocol: str, src: ipaddress.IPv4Address, sport: int, dst: ipaddress.IPv4Address, dport: int) -> int:
    """bpf/lb.c flow_hash(): murmur3's finalizer over the 5-tuple, fields as the
    packet holds them (network order, read as little-endian u32/u16)."""
    h = FLOW_HASH_SEED
    h = _mix32(h ^ ip_to_net(src))
    h = _mix32(h ^ ip_to_net(dst))
    h = _mix32(h ^ ((port_to_net(sport) << 16) | port_to_net(dport)))
    return _mix32(h ^ PROTO_NUMBERS[protocol])


def explain_flow(config: LoadBalancer, protocol: str, source: str, destination: str) -> dict[str, Any]:
    """Where a packet of this 5-tuple goes: its conntrack entry, else the ring.

    {"protocol", "client", "vip", "listener", "vip_id" (None: not a VIP),
    "decision" ("conntrack": the entry decides | "ring": a new flow, hashed |
    "drop": no target in the slot | "pass": not a VIP, the kernel gets it),
    "target": "ADDR:PORT"|None, "target_id", "conntrack": {"target",
    "target_id", "age_s", "idle_s", "state"}|None, "ring": {"hash", "size",
    "half", "slot", "target_id", "target"}|None}. "ring" is where a new
    flow would land, given even when a live entry decides.
    """
    proto = protocol.upper()
    if proto not in PROTO_NUMBERS:
        raise InspectError(f"protocol {protocol!r}: TCP or UDP")
    src_ip, sport = parse_endpoint(source)
    dst_ip, dport = parse_endpoint(destination)
    assert sport is not None and dport is not None
    vip = VipAddr(dst_ip, dport, proto)
    out: dict[str, Any] = {"protocol": proto, "client": f"{src_ip}:{sport}", "vip": f"{dst_ip}:{dport}",
                           "listener": _l4_listeners(config).get(vip, (None, None))[0], "vip_id": None,
                           "decision": "pass", "target": None, "target_id": None, "conntrack": None, "ring": None}
    with open_maps(config, "lb explain flow") as maps:
        entry = next((e for e in maps.vips() if e.vip == vip), None)
        if entry is None:
            return out
        out["vip_id"] = entry.vip_id
        known = {t.target_id: t for t in maps.targets()}

        def name(target_id: int | None) -> str | None:
            t = known.get(target_id) if target_id is not None else None
            return str(t.endpoint) if t else None

        size = maps.limits.ring_size
        hashed = flow_hash(proto, src_ip, sport, dst_ip, dport)
        index = (entry.vip_id * 2 + (entry.ring & 1)) * size + hashed % size
        cell = maps.raw(MapName.RINGS).lookup(ctypes.c_uint32(index))
        ring_target = None if cell is None or cell.value == NO_TARGET else int(cell.value)
        out["ring"] = {"hash": hashed, "size": size, "half": entry.ring, "slot": hashed % size,
                       "target_id": ring_target, "target": name(ring_target)}
        flow = maps.flow(proto, Endpoint(src_ip, sport), Endpoint(dst_ip, dport))
        if flow is not None:
            t = known.get(flow.target_id)
            state = _flow_state(flow, maps.limits, bool(t and t.active))
            out["conntrack"] = {"target": name(flow.target_id), "target_id": flow.target_id,
                                "age_s": round(flow.age_s, 3), "idle_s": round(flow.idle_s, 3), "state": state}
            if state == "live":
                out.update(decision="conntrack", target_id=flow.target_id, target=name(flow.target_id))
                return out
        ring_ok = ring_target is not None and bool(known.get(ring_target) and known[ring_target].active)
        out.update(decision="ring" if ring_ok else "drop", target_id=ring_target if ring_ok else None,
                   target=name(ring_target) if ring_ok else None)
        return out

"""The pinned maps as they are (`lb maps list`, `lb maps dump`): entries decoded
from their ctypes structs to plain JSON-able values."""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

from lb.dataplane.libbpf import BpfMap
from lb.dataplane.maps import CLOCK_MONOTONIC_COARSE
from lb.dataplane.structs import (
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_PERCPU_ARRAY,
    IPPROTO_TCP,
    MAP_TYPE_NAMES,
    NO_TARGET,
    PROTO_NAMES,
    Addr6,
    Counter,
    Limits,
    MapName,
    map_specs,
    net_to_ip,
    net_to_ip6,
    net_to_port,
    half_open_state,
    tcp_state,
)
from lb.inspect.access import InspectError, open_maps
from lb.model import LoadBalancer

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
            bpf_map = maps.raw(name)
            info = bpf_map.info
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
        if isinstance(value, Addr6):  # an IPv6 address, wherever it is
            value = str(net_to_ip6(value))
        elif isinstance(value, ctypes.Structure):  # half_open's flow, conntrack6's flow, ...
            value = _fields(value)
        elif isinstance(value, ctypes.Array):  # reply_route.vips: the first `count`
            value = [_plain(item) for item in value[:getattr(struct, "count", len(value))]]
        elif field in _ADDRESS_FIELDS:
            value = str(net_to_ip(value))
        elif field in _PORT_FIELDS:
            value = net_to_port(value)
        elif field == "proto":
            value = PROTO_NAMES.get(value, value)
        out[field] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Addr6):  # fullnat_srcs6's values
        return str(net_to_ip6(value))
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


def _decode_value(name: MapName, key: Any, value: Any, per_cpu: bool, now_ns: int) -> Any:
    if per_cpu:
        cells = [_plain(cell) for cell in value]
        if cells and isinstance(cells[0], dict):
            return {"total": {f: sum(c[f] for c in cells) for f in cells[0]}, "per_cpu": cells}
        return {"total": sum(cells), "per_cpu": cells}
    plain = _plain(value)
    if name is MapName.RINGS:
        return None if plain == NO_TARGET else plain
    if name in (MapName.CONNTRACK, MapName.CONNTRACK6):
        state = value.flow if name is MapName.CONNTRACK6 else value
        plain["tcp_state"] = tcp_state(state) if key.proto == IPPROTO_TCP else None
        plain["age_s"] = round(max(0, now_ns - state.created_ns) / 1e9, 3)
        plain["idle_s"] = round(max(0, now_ns - state.last_seen_ns) / 1e9, 3)
    if name in (MapName.HALF_OPEN, MapName.HALF_OPEN6):
        half = value.half if name is MapName.HALF_OPEN6 else value
        plain["tcp_state"] = half_open_state(half)
        plain["age_s"] = round(max(0, now_ns - half.flow.created_ns) / 1e9, 3)
        plain["idle_s"] = round(max(0, now_ns - half.flow.last_seen_ns) / 1e9, 3)
    return plain


def _is_zero(value: Any) -> bool:
    return not any(bytes(value))


def maps_dump(config: LoadBalancer, name: str, limit: int = 100) -> dict[str, Any]:
    """The decoded entries of one map.

    {"name", "type", "entries": [{"key", "value"}], "count", "truncated"}.
    Keys and values are decoded: structs become objects (addresses dotted,
    ports in host order, pad fields left out, arrays as lists), per-CPU values
    {"total", "per_cpu": [...]}; `counters` keys {"index", "reason"},
    `rings` keys {"slot", "vip_id", "half", "index"} and values a target id
    (None: empty slot); `conntrack` values also "tcp_state" (structs.tcp_state,
    None for UDP), "age_s" and "idle_s"; `half_open` values too (syn_sent|syn_recv). Array entries whose value is all zero bytes are left
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
        now_ns = time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)  # the program's flow clock
        entries: list[dict[str, Any]] = []
        truncated = False
        for key, value in bpf_map.items():
            if skip_zero and _is_zero(value):
                continue
            if limit and len(entries) >= limit:
                truncated = True
                break
            entries.append({"key": _decode_key(map_name, key, maps.limits),
                            "value": _decode_value(map_name, key, value, spec.per_cpu, now_ns)})
        return {"name": map_name.value, "type": MAP_TYPE_NAMES.get(bpf_map.info.map_type, ""),
                "entries": entries, "count": len(entries), "truncated": truncated}

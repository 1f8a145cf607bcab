"""Typed access to each pinned map; the only place that converts to and from ctypes.

Opened from the pin directory through libbpf, so the daemon (after bcc has
loaded the program) and the CLI (with no compiler at all) read the same way.

Both families go through the same calls: a VipAddr, Endpoint or Flow holds
an IPv4 or an IPv6 address, and each call picks the family's map (`vips` or
`vips6`, `targets` or `targets6`, ...); readers return both families'
entries. VIP and target ids are one space for both (rings, generations and
statistics are shared), so a target id is in `targets` or in `targets6`,
never both: writing it in one zeroes it in the other.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from lb.dataplane.libbpf import BpfMap
from lb.dataplane.structs import (
    FWD_FULLNAT,
    MODE_NAMES,
    MODE_NUMBERS,
    MAX_REPLY_VIPS,
    NO_TARGET,
    PROTO_NAMES,
    PROTO_NUMBERS,
    REPLY_PORT_WORDS,
    TABLE_CONNTRACK,
    TABLE_CONNTRACK6,
    TABLE_HALF_OPEN,
    TABLE_HALF_OPEN6,
    TABLE_NAMES,
    TARGET_F_ACTIVE,
    TARGET_F_IN_SERVICE,
    Addr6,
    Counter,
    EndpointKey,
    EndpointKey6,
    FlowKey,
    FlowKey6,
    FlowState,
    FlowState6,
    HalfOpenFlow,
    HalfOpenFlow6,
    Limits,
    MapName,
    ReplyRoute,
    ReplyRoute6,
    ReplyVip,
    ReplyVip6,
    Target,
    Target6,
    TrafficStats,
    VipKey,
    VipKey6,
    VipMeta,
    fill_held,
    fill_removed_by_lb,
    half_open_state,
    ip6_to_net,
    ip_to_net,
    map_specs,
    net_to_ip,
    net_to_ip6,
    net_to_port,
    port_to_net,
    tcp_state,
)

IPAddress = IPv4Address | IPv6Address


class MapsNotLoaded(LookupError):
    """Nothing is pinned under the directory: no program has been loaded."""


def _address_key(address: IPAddress) -> tuple[int, int]:
    """IPv4 before IPv6, each in address order (the two do not compare)."""
    return address.version, int(address)


def endpoint_text(address: IPAddress, port: int) -> str:
    """address:port, an IPv6 address in brackets ([fd00::1]:80)."""
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


@functools.total_ordering
@dataclass(frozen=True)
class VipAddr:
    """A VIP as packets address it."""

    address: IPAddress
    port: int
    protocol: str  # "TCP" | "UDP"

    def __str__(self) -> str:
        return f"{self.protocol} {endpoint_text(self.address, self.port)}"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, VipAddr):
            return NotImplemented
        return (_address_key(self.address), self.port, self.protocol) < \
            (_address_key(other.address), other.port, other.protocol)


@dataclass(frozen=True)
class VipEntry:
    vip: VipAddr
    vip_id: int
    ring: int  # live half
    gen: int = 0  # the VIP id's generation when this VIP was written
    mode: str = "nat"  # forwarding mode: "nat", "full-nat" or "dsr" (structs.MODE_NAMES)


@functools.total_ordering
@dataclass(frozen=True)
class Endpoint:
    address: IPAddress
    port: int

    def __str__(self) -> str:
        return endpoint_text(self.address, self.port)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Endpoint):
            return NotImplemented
        return (_address_key(self.address), self.port) < (_address_key(other.address), other.port)


@dataclass(frozen=True)
class TargetEntry:
    target_id: int
    endpoint: Endpoint
    active: bool  # its flows may go on
    in_service: bool = False  # in the ring: a SYN may follow an entry to it


@dataclass(frozen=True)
class Flow:
    """One conntrack entry: a client's flow to a VIP and the target it got."""

    client: Endpoint
    vip: VipAddr
    target_id: int
    vip_id: int
    age_s: float
    idle_s: float
    current: bool = True  # begun under the VIP's current generation (else stale: hashed again)
    tcp_state: str | None = None  # structs.tcp_state() of a TCP flow; None for UDP
    half_open: bool = False  # in half_open (handshake not complete), not in conntrack
    mode: str = "nat"  # the VIP's forwarding mode when the flow began
    source: Endpoint | None = None  # full NAT: lb's address:port the flow leaves from toward its target


@dataclass(frozen=True)
class ReplyVipEntry:
    """One VIP a target endpoint's replies may belong to."""

    vip: VipAddr
    vip_id: int
    gen: int


@dataclass(frozen=True)
class RouteEntry:
    """A `replies` entry: a target endpoint, its id, and the VIPs it serves."""

    endpoint: Endpoint
    protocol: str
    target_id: int
    vips: tuple[ReplyVipEntry, ...]


@dataclass(frozen=True)
class TableUsage:
    """A flow table's fullness, from the program's bookkeeping (table_stats,
    table_fill), without walking it. The LRU evicts silently, so the program
    keeps a model of the table that evicts only when full: `entries` is what
    it holds, `evictions` the new keys it took while full. The kernel's LRU
    begins evicting a little before it is full (it keeps up to 128 free
    entries per CPU), so both are within 128 a CPU (and 128) of the truth."""

    table: str  # conntrack | half_open
    capacity: int
    inserts: int
    removed: int  # by the program (half_open: the handshake completed, a RST) and by lb (termination)
    entries: int
    evictions: int


@dataclass(frozen=True)
class Traffic:
    packets: int = 0
    bytes: int = 0
    new_flows: int = 0
    reply_packets: int = 0
    reply_bytes: int = 0


CLOCK_MONOTONIC_COARSE = 6  # <linux/time.h>; not exported by Python's time module


def _monotonic_ns() -> int:
    # The program stamps flows with bpf_ktime_get_coarse_ns(): CLOCK_MONOTONIC_COARSE.
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


class Maps:
    """Every map of one load balancer, by name."""

    def __init__(self, directory: str, limits: Limits) -> None:
        if not os.path.exists(os.path.join(directory, MapName.VIPS.value)):
            raise MapsNotLoaded(f"no maps pinned under {directory}: is lb up?")
        self.directory = directory
        self.limits = limits
        self._maps: dict[MapName, BpfMap] = {}
        try:
            for name, spec in map_specs(limits).items():
                self._maps[name] = BpfMap.open_pinned(
                    os.path.join(directory, name.value), spec.key, spec.value, spec.per_cpu
                )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for bpf_map in self._maps.values():
            bpf_map.close()
        self._maps.clear()

    def __enter__(self) -> Maps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def raw(self, name: MapName) -> BpfMap:
        return self._maps[name]

    # --- vips ----------------------------------------------------------------

    @staticmethod
    def _vip_key(vip: VipAddr) -> tuple[MapName, VipKey | VipKey6]:
        port, proto = port_to_net(vip.port), PROTO_NUMBERS[vip.protocol]
        if isinstance(vip.address, IPv6Address):
            return MapName.VIPS6, VipKey6(ip6_to_net(vip.address), port, proto, 0)
        return MapName.VIPS, VipKey(ip_to_net(vip.address), port, proto, 0)

    @staticmethod
    def _vip_addr(key: VipKey | VipKey6) -> VipAddr:
        address = net_to_ip6(key.addr) if isinstance(key, VipKey6) else net_to_ip(key.addr)
        return VipAddr(address, net_to_port(key.port), PROTO_NAMES.get(key.proto, str(key.proto)))

    def vips(self) -> list[VipEntry]:
        """Every VIP, IPv4 (vips) then IPv6 (vips6)."""
        return sorted(
            (VipEntry(self._vip_addr(k), v.vip_id, v.ring, v.gen, MODE_NAMES.get(v.mode, str(v.mode)))
             for name in (MapName.VIPS, MapName.VIPS6) for k, v in self._maps[name].items()),
            key=lambda e: e.vip,
        )

    def put_vip(self, vip: VipAddr, vip_id: int, ring: int, gen: int, mode: str = "nat") -> None:
        name, key = self._vip_key(vip)
        self._maps[name].update(key, VipMeta(vip_id, ring, gen, MODE_NUMBERS[mode]))

    def vip_gen(self, vip_id: int) -> int:
        value = self._maps[MapName.VIP_GENS].lookup(ctypes.c_uint32(vip_id))
        return 0 if value is None else int(value.value)

    def bump_vip_gen(self, vip_id: int) -> int:
        """A new generation for a VIP id: flows begun under the old one go stale."""
        gen = (self.vip_gen(vip_id) + 1) & 0xFFFFFFFF
        self._maps[MapName.VIP_GENS].update(ctypes.c_uint32(vip_id), ctypes.c_uint32(gen))
        return gen

    def delete_vip(self, vip: VipAddr) -> bool:
        name, key = self._vip_key(vip)
        return self._maps[name].delete(key)

    # --- targets -------------------------------------------------------------

    def targets(self) -> list[TargetEntry]:
        """Every target slot ever written (non-zero address), of either family, by id."""
        v4, v6 = self._maps[MapName.TARGETS], self._maps[MapName.TARGETS6]
        entries = []
        for target_id in range(self.limits.max_targets):
            value = v4.lookup(ctypes.c_uint32(target_id))
            if value is not None and value.addr != 0:
                endpoint = Endpoint(net_to_ip(value.addr), net_to_port(value.port))
            else:
                value = v6.lookup(ctypes.c_uint32(target_id))
                if value is None or not any(value.addr.words):
                    continue
                endpoint = Endpoint(net_to_ip6(value.addr), net_to_port(value.port))
            entries.append(TargetEntry(target_id, endpoint, bool(value.flags & TARGET_F_ACTIVE),
                                       bool(value.flags & TARGET_F_IN_SERVICE)))
        return entries

    def put_target(self, target_id: int, endpoint: Endpoint, active: bool, in_service: bool = False) -> None:
        """Write a target: active (its flows may go on), in service (in the
        ring: a SYN may follow an entry to it; implies active). In its
        family's map; the other family's slot of the id is zeroed (an id
        that served an IPv6 endpoint may serve an IPv4 one next)."""
        flags = (TARGET_F_ACTIVE | TARGET_F_IN_SERVICE) if in_service else TARGET_F_ACTIVE if active else 0
        key = ctypes.c_uint32(target_id)
        port = port_to_net(endpoint.port)
        if isinstance(endpoint.address, IPv6Address):
            self._maps[MapName.TARGETS6].update(key, Target6(ip6_to_net(endpoint.address), port, flags))
            self._maps[MapName.TARGETS].update(key, Target())
        else:
            self._maps[MapName.TARGETS].update(key, Target(ip_to_net(endpoint.address), port, flags))
            self._maps[MapName.TARGETS6].update(key, Target6())
        # After the target: a packet between the two writes cannot reach a new
        # endpoint yet (rings name it later), and none after them finds the
        # next hop of the id's former endpoint.
        next_hops = self._maps[MapName.NEXT_HOPS]
        next_hops.update(ctypes.c_uint32(target_id), next_hops.cell_type())

    # --- full NAT ------------------------------------------------------------

    def put_fullnat_source(self, target_id: int, address: IPAddress | None) -> None:
        """lb's own address toward a target: its full-NAT flows' source (None:
        none), in fullnat_sources or fullnat_srcs6 by its family; the id's
        slot in the other is zeroed (see put_target)."""
        key = ctypes.c_uint32(target_id)
        value6 = ip6_to_net(address) if isinstance(address, IPv6Address) else Addr6()
        value = ip_to_net(address) if isinstance(address, IPv4Address) else 0
        self._maps[MapName.FULLNAT_SOURCES6].update(key, value6)
        self._maps[MapName.FULLNAT_SOURCES].update(key, ctypes.c_uint32(value))

    def fullnat_source(self, target_id: int) -> IPAddress | None:
        value = self._maps[MapName.FULLNAT_SOURCES].lookup(ctypes.c_uint32(target_id))
        if value is not None and value.value != 0:
            return net_to_ip(value.value)
        value6 = self._maps[MapName.FULLNAT_SOURCES6].lookup(ctypes.c_uint32(target_id))
        return None if value6 is None or not any(value6.words) else net_to_ip6(value6)

    def fullnat_owner(self, protocol: str, target: Endpoint, source: Endpoint) -> tuple[Endpoint, VipAddr] | None:
        """Which client flow (client, VIP) holds lb's `source` address:port toward `target`."""
        name, key = self._flow_key(protocol, target, source)
        owner = self._maps[MapName.FULLNAT_FLOWS6 if name is MapName.CONNTRACK6 else MapName.FULLNAT_FLOWS].lookup(key)
        if owner is None:
            return None
        client, vip = self._flow_ends(owner)
        return client, VipAddr(vip.address, vip.port, protocol)

    # --- replies (target endpoint -> VIPs) and reply_ports --------------------

    @staticmethod
    def _endpoint_key(endpoint: Endpoint, protocol: str) -> tuple[MapName, EndpointKey | EndpointKey6]:
        port, proto = port_to_net(endpoint.port), PROTO_NUMBERS[protocol]
        if isinstance(endpoint.address, IPv6Address):
            return MapName.REPLIES6, EndpointKey6(ip6_to_net(endpoint.address), port, proto, 0)
        return MapName.REPLIES, EndpointKey(ip_to_net(endpoint.address), port, proto, 0)

    def routes(self) -> list[RouteEntry]:
        """Every replies and replies6 entry."""
        out = []
        for name in (MapName.REPLIES, MapName.REPLIES6):
            to_ip = net_to_ip6 if name is MapName.REPLIES6 else net_to_ip
            for key, value in self._maps[name].items():
                protocol = PROTO_NAMES.get(key.proto, str(key.proto))
                vips = tuple(ReplyVipEntry(VipAddr(to_ip(v.addr), net_to_port(v.port), protocol), v.vip_id, v.gen)
                             for v in value.vips[:min(value.count, MAX_REPLY_VIPS)])
                out.append(RouteEntry(Endpoint(to_ip(key.addr), net_to_port(key.port)), protocol,
                                      value.target_id, vips))
        return sorted(out, key=lambda r: (r.endpoint, r.protocol))

    def route(self, endpoint: Endpoint, protocol: str) -> RouteEntry | None:
        return next((r for r in self.routes() if r.endpoint == endpoint and r.protocol == protocol), None)

    def put_route(self, route: RouteEntry) -> None:
        if not 0 < len(route.vips) <= MAX_REPLY_VIPS:
            raise ValueError(f"{route.endpoint}: 1..{MAX_REPLY_VIPS} VIPs a route, got {len(route.vips)}")
        name, key = self._endpoint_key(route.endpoint, route.protocol)
        value: ReplyRoute | ReplyRoute6
        six = name is MapName.REPLIES6
        value = ReplyRoute6(route.target_id, len(route.vips)) if six else ReplyRoute(route.target_id, len(route.vips))
        for i, v in enumerate(route.vips):
            address, port = v.vip.address, port_to_net(v.vip.port)
            if isinstance(address, IPv6Address) and six:
                value.vips[i] = ReplyVip6(ip6_to_net(address), port, 0, v.vip_id, v.gen)
            elif isinstance(address, IPv4Address) and not six:
                value.vips[i] = ReplyVip(ip_to_net(address), port, 0, v.vip_id, v.gen)
            else:
                raise ValueError(f"{route.endpoint}: a target's replies go back from VIPs of its family only")
        self._maps[name].update(key, value)

    def delete_route(self, endpoint: Endpoint, protocol: str) -> bool:
        name, key = self._endpoint_key(endpoint, protocol)
        return self._maps[name].delete(key)

    def write_reply_ports(self, ports: set[int]) -> None:
        """Set exactly these ports' bits in reply_ports (every word written, in one batch)."""
        words = [0] * REPLY_PORT_WORDS
        for port in ports:
            words[port >> 6] |= 1 << (port & 63)
        keys = (ctypes.c_uint32 * REPLY_PORT_WORDS)(*range(REPLY_PORT_WORDS))
        values = (ctypes.c_uint64 * REPLY_PORT_WORDS)(*words)
        self._maps[MapName.REPLY_PORTS].update_batch(keys, values, REPLY_PORT_WORDS)

    def reply_ports(self) -> set[int]:
        bpf_map = self._maps[MapName.REPLY_PORTS]
        ports: set[int] = set()
        for word in range(REPLY_PORT_WORDS):
            value = bpf_map.lookup(ctypes.c_uint32(word))
            bits = 0 if value is None else int(value.value)
            ports.update(word * 64 + bit for bit in range(64) if bits >> bit & 1)
        return ports

    # --- rings ---------------------------------------------------------------

    def _ring_base(self, vip_id: int, half: int) -> int:
        return (vip_id * 2 + half) * self.limits.ring_size

    def write_ring(self, vip_id: int, half: int, target_ids: Sequence[int]) -> None:
        """Fill one half of a VIP's ring in one batch (NO_TARGET for empty slots)."""
        size = self.limits.ring_size
        if len(target_ids) != size:
            raise ValueError(f"a ring has {size} slots, got {len(target_ids)}")
        base = self._ring_base(vip_id, half)
        keys = (ctypes.c_uint32 * size)(*range(base, base + size))
        values = (ctypes.c_uint32 * size)(*target_ids)
        self._maps[MapName.RINGS].update_batch(keys, values, size)

    def ring_slot(self, vip_id: int, half: int, index: int) -> int | None:
        """One slot of a VIP's ring, as bpf/lb.c reads it for a new flow
        (index = flow hash % ring size); None when the slot has no target."""
        value = self._maps[MapName.RINGS].lookup(ctypes.c_uint32(self._ring_base(vip_id, half & 1) + index))
        return None if value is None or value.value == NO_TARGET else int(value.value)

    def read_ring(self, vip_id: int, half: int) -> list[int]:
        bpf_map = self._maps[MapName.RINGS]
        base = self._ring_base(vip_id, half)
        ring = []
        for slot in range(base, base + self.limits.ring_size):
            value = bpf_map.lookup(ctypes.c_uint32(slot))
            ring.append(NO_TARGET if value is None else int(value.value))
        return ring

    # --- conntrack -----------------------------------------------------------

    @staticmethod
    def _flow_key(protocol: str, src: Endpoint, dst: Endpoint) -> tuple[MapName, FlowKey | FlowKey6]:
        """The 5-tuple src -> dst as its family's flow tables key it (CONNTRACK
        or CONNTRACK6 names the family); ValueError for two families."""
        ports = port_to_net(src.port), port_to_net(dst.port)
        proto = PROTO_NUMBERS[protocol]
        if isinstance(src.address, IPv6Address) and isinstance(dst.address, IPv6Address):
            return MapName.CONNTRACK6, FlowKey6(ip6_to_net(src.address), ip6_to_net(dst.address), *ports, proto)
        if isinstance(src.address, IPv4Address) and isinstance(dst.address, IPv4Address):
            return MapName.CONNTRACK, FlowKey(ip_to_net(src.address), ip_to_net(dst.address), *ports, proto)
        raise ValueError(f"{src} -> {dst}: a flow stays within one family")

    @staticmethod
    def _flow_ends(key: FlowKey | FlowKey6) -> tuple[Endpoint, Endpoint]:
        """(source, destination) of a flow key."""
        if isinstance(key, FlowKey6):
            return (Endpoint(net_to_ip6(key.src), net_to_port(key.sport)),
                    Endpoint(net_to_ip6(key.dst), net_to_port(key.dport)))
        return (Endpoint(net_to_ip(key.src), net_to_port(key.sport)),
                Endpoint(net_to_ip(key.dst), net_to_port(key.dport)))

    def flows(self, limit: int | None = None) -> Iterator[Flow]:
        """Every flow (one entry each), IPv4 (conntrack) then IPv6 (conntrack6), read in batches."""
        now = _monotonic_ns()
        gens: dict[int, int] = {}
        n = 0
        for name in (MapName.CONNTRACK, MapName.CONNTRACK6):
            for key, value in self._maps[name].items_batch():
                if limit is not None and n >= limit:
                    return
                n += 1
                state = value.flow if isinstance(value, FlowState6) else value
                if state.vip_id not in gens:
                    gens[state.vip_id] = self.vip_gen(state.vip_id)
                yield self._flow(key, value, now, gens[state.vip_id])

    def flow(self, protocol: str, client: Endpoint, vip: Endpoint) -> Flow | None:
        """The flow's conntrack entry, else its half-open one (a TCP flow whose
        handshake is not complete), else None (also for two families)."""
        try:
            name, key = self._flow_key(protocol, client, vip)
        except ValueError:
            return None
        six = name is MapName.CONNTRACK6
        value = self._maps[name].lookup(key)
        if value is not None:
            state = value.flow if six else value
            return self._flow(key, value, _monotonic_ns(), self.vip_gen(state.vip_id))
        if key.proto != PROTO_NUMBERS["TCP"]:
            return None
        half = self._maps[MapName.HALF_OPEN6 if six else MapName.HALF_OPEN].lookup(key)
        return None if half is None else self._half_open_flow(key, half, _monotonic_ns())

    def half_open_flows(self, limit: int | None = None) -> Iterator[Flow]:
        """Every half-open TCP flow, IPv4 then IPv6, read in batches."""
        now = _monotonic_ns()
        n = 0
        for name in (MapName.HALF_OPEN, MapName.HALF_OPEN6):
            for key, half in self._maps[name].items_batch():
                if limit is not None and n >= limit:
                    return
                n += 1
                yield self._half_open_flow(key, half, now)

    def _half_open_flow(self, key: FlowKey | FlowKey6, value: HalfOpenFlow | HalfOpenFlow6, now: int) -> Flow:
        half = value.half if isinstance(value, HalfOpenFlow6) else value
        state: FlowState | FlowState6 = half.flow
        if isinstance(value, HalfOpenFlow6):
            state = FlowState6(half.flow, value.snat_addr)
        flow = self._flow(key, state, now, self.vip_gen(half.flow.vip_id))
        return replace(flow, tcp_state=half_open_state(half), half_open=True)

    @staticmethod
    def _flow(key: FlowKey | FlowKey6, value: FlowState | FlowState6, now: int, gen: int) -> Flow:
        protocol = PROTO_NAMES.get(key.proto, str(key.proto))
        client, vip = Maps._flow_ends(key)
        state = value.flow if isinstance(value, FlowState6) else value
        source = None
        if state.mode == FWD_FULLNAT:
            address = net_to_ip6(value.snat_addr) if isinstance(value, FlowState6) else net_to_ip(state.snat_addr)
            source = Endpoint(address, net_to_port(state.snat_port))
        return Flow(
            client=client,
            vip=VipAddr(vip.address, vip.port, protocol),
            target_id=state.target_id,
            vip_id=state.vip_id,
            age_s=max(0, now - state.created_ns) / 1e9,
            idle_s=max(0, now - state.last_seen_ns) / 1e9,
            current=state.vip_gen == gen,
            tcp_state=tcp_state(state) if protocol == "TCP" else None,
            mode=MODE_NAMES.get(state.mode, str(state.mode)),
            source=source,
        )

    # The flow tables of both families, each with its key and value types and its table_fill slot.
    FLOW_TABLES: tuple[tuple[MapName, Any, Any, int], ...] = (
        (MapName.CONNTRACK, FlowKey, FlowState, TABLE_CONNTRACK),
        (MapName.HALF_OPEN, FlowKey, HalfOpenFlow, TABLE_HALF_OPEN),
        (MapName.CONNTRACK6, FlowKey6, FlowState6, TABLE_CONNTRACK6),
        (MapName.HALF_OPEN6, FlowKey6, HalfOpenFlow6, TABLE_HALF_OPEN6),
    )

    def delete_flows(self, target_ids: set[int]) -> int:
        """Remove every conntrack and half-open entry (of both families) whose
        target is one of `target_ids` (connection termination); returns how many went.

        A target that has not forwarded a packet since its id was given to
        it (reset_target_stats) can have no entry: every entry is made by a
        packet forwarded to its target. The others cost one walk of each
        table, read in batches and looked at as raw bytes (target_id is the
        value's first field): half a million entries in a fraction of a
        second."""
        wanted = {i for i in target_ids if self.target_traffic(i).packets}
        if not wanted:
            return 0
        return sum(self._delete_by_target(name, key_type, value_type, table, wanted)
                   for name, key_type, value_type, table in self.FLOW_TABLES)

    def _delete_by_target(self, name: MapName, key_type: Any, value_type: Any, fill_table: int,
                          wanted: set[int]) -> int:
        table = self._maps[name]
        key_size, value_size = ctypes.sizeof(key_type), ctypes.sizeof(value_type)
        assert FlowState.target_id.offset == 0 and HalfOpenFlow.flow.offset == 0 and value_size % 4 == 0
        assert FlowState6.flow.offset == 0 and HalfOpenFlow6.half.offset == 0
        doomed = bytearray()
        for keys, values, n in table.scan_batch():
            ids = memoryview(values).cast("B").cast("I")[: n * value_size // 4 : value_size // 4]
            raw = memoryview(keys).cast("B")
            for i, target_id in enumerate(ids):
                if target_id in wanted:
                    doomed += raw[i * key_size:(i + 1) * key_size]
        count = len(doomed) // key_size
        if not count:
            return 0
        deleted = table.delete_batch((key_type * count).from_buffer(doomed), count)
        self._removed_by_lb(fill_table, deleted)
        return deleted

    def _fill(self, slot: int) -> int:
        value = self._maps[MapName.TABLE_FILL].lookup(ctypes.c_uint32(slot))
        return 0 if value is None else int(value.value)

    def _removed_by_lb(self, table: int, count: int) -> None:
        """Add to table_fill's count of the entries lb deleted (userspace is its only writer)."""
        slot = fill_removed_by_lb(table)
        self._maps[MapName.TABLE_FILL].update(ctypes.c_uint32(slot), ctypes.c_uint64(self._fill(slot) + count))

    def table_usage(self) -> list[TableUsage]:
        """Each flow table's fullness and LRU evictions (TableUsage): a few
        array reads, whatever the table's size."""
        # The IPv6 tables' size as pinned: inspection reads them at any size (loader.map_mismatch).
        capacity = {TABLE_CONNTRACK: self.limits.conntrack_size, TABLE_HALF_OPEN: self.limits.half_open_size,
                    TABLE_CONNTRACK6: self._maps[MapName.CONNTRACK6].info.max_entries,
                    TABLE_HALF_OPEN6: self._maps[MapName.HALF_OPEN6].info.max_entries}
        out = []
        for table, name in TABLE_NAMES.items():
            cells = self._maps[MapName.TABLE_STATS].lookup(ctypes.c_uint32(table))
            by_lb = self._fill(fill_removed_by_lb(table))
            held = (self._fill(fill_held(table)) - by_lb) % 2**64
            entries = 0 if held >= 2**63 else min(held, capacity[table])  # lb deleted entries older than table_fill
            out.append(TableUsage(name, capacity[table], sum(c.inserts for c in cells) if cells else 0,
                                  (sum(c.removed for c in cells) if cells else 0) + by_lb, entries,
                                  sum(c.evictions for c in cells) if cells else 0))
        return out

    def reset_target_stats(self, target_id: int) -> None:
        """Zero a target id's traffic counters (on every CPU): for an id given to a new endpoint."""
        stats = self._maps[MapName.TARGET_STATS]
        stats.update(ctypes.c_uint32(target_id), stats.cell_type())

    # --- statistics ----------------------------------------------------------

    @staticmethod
    def _sum(cells: ctypes.Array[TrafficStats] | None) -> Traffic:
        if cells is None:
            return Traffic()
        return Traffic(*(sum(getattr(c, f) for c in cells) for f, *_ in TrafficStats._fields_))

    def vip_traffic(self, vip_id: int) -> Traffic:
        return self._sum(self._maps[MapName.VIP_STATS].lookup(ctypes.c_uint32(vip_id)))

    def target_traffic(self, target_id: int) -> Traffic:
        return self._sum(self._maps[MapName.TARGET_STATS].lookup(ctypes.c_uint32(target_id)))

    def counters(self) -> dict[Counter, int]:
        bpf_map = self._maps[MapName.COUNTERS]
        out = {}
        for reason in Counter:
            cells = bpf_map.lookup(ctypes.c_uint32(reason))
            out[reason] = 0 if cells is None else sum(int(c) for c in cells)
        return out

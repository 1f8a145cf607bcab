"""Typed access to each pinned map; the only place that converts to and from ctypes.

Opened from the pin directory through libbpf, so the daemon (after bcc has
loaded the program) and the CLI (with no compiler at all) read the same way.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from lb.dataplane.libbpf import BpfMap
from lb.dataplane.structs import (
    FLOW_FORWARD,
    FWD_NAT,
    NO_TARGET,
    PROTO_NAMES,
    PROTO_NUMBERS,
    TARGET_F_ACTIVE,
    Counter,
    FlowKey,
    FlowState,
    Limits,
    MapName,
    Target,
    TrafficStats,
    VipKey,
    VipMeta,
    ip_to_net,
    map_specs,
    net_to_ip,
    net_to_port,
    port_to_net,
)


class MapsNotLoaded(LookupError):
    """Nothing is pinned under the directory: no program has been loaded."""


@dataclass(frozen=True, order=True)
class VipAddr:
    """A VIP as packets address it."""

    address: IPv4Address
    port: int
    protocol: str  # "TCP" | "UDP"

    def __str__(self) -> str:
        return f"{self.protocol} {self.address}:{self.port}"


@dataclass(frozen=True)
class VipEntry:
    vip: VipAddr
    vip_id: int
    ring: int  # live half
    gen: int = 0  # the VIP id's generation when this VIP was written


@dataclass(frozen=True, order=True)
class Endpoint:
    address: IPv4Address
    port: int

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class TargetEntry:
    target_id: int
    endpoint: Endpoint
    active: bool


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
    def _vip_key(vip: VipAddr) -> VipKey:
        return VipKey(ip_to_net(vip.address), port_to_net(vip.port), PROTO_NUMBERS[vip.protocol], 0)

    @staticmethod
    def _vip_addr(key: VipKey) -> VipAddr:
        return VipAddr(net_to_ip(key.addr), net_to_port(key.port), PROTO_NAMES.get(key.proto, str(key.proto)))

    def vips(self) -> list[VipEntry]:
        return sorted(
            (VipEntry(self._vip_addr(k), v.vip_id, v.ring, v.gen) for k, v in self._maps[MapName.VIPS].items()),
            key=lambda e: e.vip,
        )

    def put_vip(self, vip: VipAddr, vip_id: int, ring: int, gen: int) -> None:
        self._maps[MapName.VIPS].update(self._vip_key(vip), VipMeta(vip_id, ring, gen, FWD_NAT))

    def vip_gen(self, vip_id: int) -> int:
        value = self._maps[MapName.VIP_GENS].lookup(ctypes.c_uint32(vip_id))
        return 0 if value is None else int(value.value)

    def bump_vip_gen(self, vip_id: int) -> int:
        """A new generation for a VIP id: flows begun under the old one go stale."""
        gen = (self.vip_gen(vip_id) + 1) & 0xFFFFFFFF
        self._maps[MapName.VIP_GENS].update(ctypes.c_uint32(vip_id), ctypes.c_uint32(gen))
        return gen

    def delete_vip(self, vip: VipAddr) -> bool:
        return self._maps[MapName.VIPS].delete(self._vip_key(vip))

    # --- targets -------------------------------------------------------------

    def targets(self) -> list[TargetEntry]:
        """Every target slot ever written (non-zero address)."""
        bpf_map = self._maps[MapName.TARGETS]
        entries = []
        for target_id in range(self.limits.max_targets):
            value = bpf_map.lookup(ctypes.c_uint32(target_id))
            if value is None or value.addr == 0:
                continue
            endpoint = Endpoint(net_to_ip(value.addr), net_to_port(value.port))
            entries.append(TargetEntry(target_id, endpoint, bool(value.flags & TARGET_F_ACTIVE)))
        return entries

    def put_target(self, target_id: int, endpoint: Endpoint, active: bool) -> None:
        value = Target(ip_to_net(endpoint.address), port_to_net(endpoint.port), TARGET_F_ACTIVE if active else 0)
        self._maps[MapName.TARGETS].update(ctypes.c_uint32(target_id), value)

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

    def flows(self, limit: int | None = None) -> Iterator[Flow]:
        """Every flow, by its forward entry (each flow also has a reply entry)."""
        now = _monotonic_ns()
        gens: dict[int, int] = {}
        n = 0
        for key, state in self._maps[MapName.CONNTRACK].items():
            if state.kind != FLOW_FORWARD:
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            if state.vip_id not in gens:
                gens[state.vip_id] = self.vip_gen(state.vip_id)
            yield self._flow(key, state, now, gens[state.vip_id])

    def flow(self, protocol: str, client: Endpoint, vip: Endpoint) -> Flow | None:
        key = FlowKey(ip_to_net(client.address), ip_to_net(vip.address), port_to_net(client.port),
                      port_to_net(vip.port), PROTO_NUMBERS[protocol])
        state = self._maps[MapName.CONNTRACK].lookup(key)
        if state is None or state.kind != FLOW_FORWARD:
            return None
        return self._flow(key, state, _monotonic_ns(), self.vip_gen(state.vip_id))

    @staticmethod
    def _flow(key: FlowKey, state: FlowState, now: int, gen: int) -> Flow:
        return Flow(
            client=Endpoint(net_to_ip(key.src), net_to_port(key.sport)),
            vip=VipAddr(net_to_ip(key.dst), net_to_port(key.dport), PROTO_NAMES.get(key.proto, str(key.proto))),
            target_id=state.target_id,
            vip_id=state.vip_id,
            age_s=max(0, now - state.created_ns) / 1e9,
            idle_s=max(0, now - state.last_seen_ns) / 1e9,
            current=state.vip_gen == gen,
        )

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

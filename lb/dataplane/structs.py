"""ctypes mirrors of bpf/structs.h, and the names and limits of bpf/consts.h.

Mirrored once, here; tests/test_structs.py checks every size and field offset
against the types bcc decodes from the compiled program, and the constants
against the C headers. No bcc import: the CLI uses this module to read pinned
maps without compiling anything.

Byte order: fields marked "network order" hold the bytes as they sit in the
packet; use the helpers below to convert.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
from dataclasses import dataclass

# --- constants (bpf/consts.h) -------------------------------------------------

NO_TARGET = 0xFFFFFFFF
FLOW_HASH_SEED = 0x6C620001  # every host sharing VIPs must use the same one
TARGET_F_ACTIVE = 0x1
# vip_meta.reserved is written as this: 0, what it held when it was `mode`
# and FWD_NAT its only value (lb/dataplane/maps.py writes it by that name).
# No longer in consts.h: the program never reads the field.
FWD_NAT = 0
FLOW_FORWARD = 0  # conntrack entry of client -> VIP packets
FLOW_REPLY = 1  # conntrack entry of target -> client packets

IPPROTO_TCP = socket.IPPROTO_TCP
IPPROTO_UDP = socket.IPPROTO_UDP
PROTO_NAMES = {IPPROTO_TCP: "TCP", IPPROTO_UDP: "UDP"}
PROTO_NUMBERS = {name: number for number, name in PROTO_NAMES.items()}


class Counter(enum.IntEnum):
    """enum lb_counter: global reasons, one slot each in the `counters` map."""

    PASS_NOT_IPV4 = 0
    PASS_NOT_VIP = 1
    PASS_PARSE_ERROR = 2
    PASS_IP_OPTIONS = 3
    PASS_FRAGMENT = 4
    PASS_FIB = 5
    DROP_TTL = 6
    DROP_NO_TARGET = 7
    REDIRECTED = 8
    TX = 9
    CONNTRACK_HIT = 10
    CONNTRACK_MISS = 11
    REVERSE_NAT = 12
    DROP_BAD_IP_CSUM = 13

    @property
    def label(self) -> str:
        return self.name.lower()


COUNTER_MAX = len(Counter)

COUNTER_HELP = {
    Counter.PASS_NOT_IPV4: "not IPv4 (ARP, IPv6, VLAN): passed",
    Counter.PASS_NOT_VIP: "IPv4 not for a TCP/UDP VIP, nor a reply: passed",
    Counter.PASS_PARSE_ERROR: "truncated header, bad IHL or length: passed",
    Counter.PASS_IP_OPTIONS: "IPv4 options: passed",
    Counter.PASS_FRAGMENT: "IPv4 fragment: passed",
    Counter.PASS_FIB: "rewritten, no neighbour yet: passed to the kernel",
    Counter.DROP_TTL: "TTL <= 1: dropped",
    Counter.DROP_NO_TARGET: "VIP without targets: dropped",
    Counter.REDIRECTED: "forwarded (redirect)",
    Counter.TX: "forwarded (XDP_TX)",
    Counter.CONNTRACK_HIT: "packet of a known flow",
    Counter.CONNTRACK_MISS: "new flow hashed onto the ring",
    Counter.REVERSE_NAT: "reply rewritten to the VIP",
    Counter.DROP_BAD_IP_CSUM: "IPv4 header checksum wrong: dropped",
}


# --- map names (bpf/maps.h) ----------------------------------------------------

class MapName(str, enum.Enum):
    VIPS = "vips"
    TARGETS = "targets"
    RINGS = "rings"
    CONNTRACK = "conntrack"
    VIP_GENS = "vip_gens"
    VIP_STATS = "vip_stats"
    TARGET_STATS = "target_stats"
    COUNTERS = "counters"


# --- structs (bpf/structs.h) ---------------------------------------------------

class VipKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),  # network order
        ("port", ctypes.c_uint16),  # network order
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class VipMeta(ctypes.Structure):
    _fields_ = [
        ("vip_id", ctypes.c_uint32),
        ("ring", ctypes.c_uint32),  # live half: 0 or 1
        ("gen", ctypes.c_uint32),  # vip_gens[vip_id] when written
        ("reserved", ctypes.c_uint32),  # written as FWD_NAT (0); unread; keeps the pinned layout
    ]


class Target(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),  # network order
        ("port", ctypes.c_uint16),  # network order
        ("flags", ctypes.c_uint16),
    ]


class FlowKey(ctypes.Structure):
    _fields_ = [
        ("src", ctypes.c_uint32),  # network order
        ("dst", ctypes.c_uint32),  # network order
        ("sport", ctypes.c_uint16),  # network order
        ("dport", ctypes.c_uint16),  # network order
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class FlowState(ctypes.Structure):
    _fields_ = [
        ("target_id", ctypes.c_uint32),
        ("vip_id", ctypes.c_uint32),
        ("created_ns", ctypes.c_uint64),  # CLOCK_MONOTONIC_COARSE
        ("last_seen_ns", ctypes.c_uint64),
        ("vip_gen", ctypes.c_uint32),
        ("vip_addr", ctypes.c_uint32),  # network order; FLOW_REPLY entries
        ("vip_port", ctypes.c_uint16),  # network order; FLOW_REPLY entries
        ("kind", ctypes.c_uint8),  # FLOW_FORWARD | FLOW_REPLY
        ("pad", ctypes.c_uint8 * 5),
    ]


class TrafficStats(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("new_flows", ctypes.c_uint64),
        ("reply_packets", ctypes.c_uint64),
        ("reply_bytes", ctypes.c_uint64),
    ]


# --- the program's limits (cflags) ---------------------------------------------

@dataclass(frozen=True)
class Limits:
    """Compile-time limits of the program; each becomes a -D cflag.

    Changing one changes map sizes, so pinned maps from another set of limits
    cannot be reused (the loader says so instead of corrupting them).
    """

    ring_size: int = 65537
    max_vips: int = 64
    max_targets: int = 1024
    conntrack_size: int = 524288  # entries: two per flow
    tcp_idle_timeout: int = 350  # seconds
    udp_idle_timeout: int = 120  # seconds

    def cflags(self) -> list[str]:
        return [
            f"-DRING_SIZE={self.ring_size}",
            f"-DMAX_VIPS={self.max_vips}",
            f"-DMAX_TARGETS={self.max_targets}",
            f"-DCONNTRACK_SIZE={self.conntrack_size}",
            f"-DTCP_IDLE_NS={self.tcp_idle_timeout * 1_000_000_000}ULL",
            f"-DUDP_IDLE_NS={self.udp_idle_timeout * 1_000_000_000}ULL",
        ]


@dataclass(frozen=True)
class MapSpec:
    """What a pinned map must look like for this program to reuse it, and how
    the loader creates it when none is pinned yet."""

    name: MapName
    map_type: int  # BPF_MAP_TYPE_*
    # _SimpleCData is generic only in typeshed: at run time _SimpleCData[Any] raises
    # TypeError (typing.get_type_hints would), so its parameter stays unwritten.
    key: type[ctypes._SimpleCData] | type[ctypes.Structure]  # type: ignore[type-arg]  # see above
    value: type[ctypes._SimpleCData] | type[ctypes.Structure]  # type: ignore[type-arg]  # see above
    max_entries: int
    per_cpu: bool = False
    flags: int = 0  # BPF_F_*, as declared in maps.h: the loader creates the map with them


BPF_F_NO_COMMON_LRU = 0x2  # an LRU list per CPU
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
MAP_TYPE_NAMES = {
    BPF_MAP_TYPE_HASH: "hash",
    BPF_MAP_TYPE_ARRAY: "array",
    BPF_MAP_TYPE_PERCPU_ARRAY: "percpu_array",
    BPF_MAP_TYPE_LRU_HASH: "lru_hash",
}


def map_specs(limits: Limits) -> dict[MapName, MapSpec]:
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    specs = [
        MapSpec(MapName.VIPS, BPF_MAP_TYPE_HASH, VipKey, VipMeta, limits.max_vips),
        MapSpec(MapName.TARGETS, BPF_MAP_TYPE_ARRAY, u32, Target, limits.max_targets),
        MapSpec(MapName.RINGS, BPF_MAP_TYPE_ARRAY, u32, u32, limits.max_vips * 2 * limits.ring_size),
        MapSpec(MapName.CONNTRACK, BPF_MAP_TYPE_LRU_HASH, FlowKey, FlowState, limits.conntrack_size,
                flags=BPF_F_NO_COMMON_LRU),
        MapSpec(MapName.VIP_GENS, BPF_MAP_TYPE_ARRAY, u32, u32, limits.max_vips),
        MapSpec(MapName.VIP_STATS, BPF_MAP_TYPE_PERCPU_ARRAY, u32, TrafficStats, limits.max_vips, True),
        MapSpec(MapName.TARGET_STATS, BPF_MAP_TYPE_PERCPU_ARRAY, u32, TrafficStats, limits.max_targets, True),
        MapSpec(MapName.COUNTERS, BPF_MAP_TYPE_PERCPU_ARRAY, u32, u64, COUNTER_MAX, True),
    ]
    return {spec.name: spec for spec in specs}


# --- conversions -----------------------------------------------------------------

def ip_to_net(address: ipaddress.IPv4Address | str) -> int:
    """An IPv4 address as the u32 whose memory holds it in network order."""
    return int.from_bytes(ipaddress.IPv4Address(address).packed, "little")


def net_to_ip(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value.to_bytes(4, "little"))


def port_to_net(port: int) -> int:
    return socket.htons(port)


def net_to_port(value: int) -> int:
    return socket.ntohs(value)

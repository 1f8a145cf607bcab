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
TARGET_F_ACTIVE = 0x1  # its flows may go on
TARGET_F_IN_SERVICE = 0x2  # in the ring: a SYN may follow an entry to it
TABLE_CONNTRACK, TABLE_HALF_OPEN, TABLE_CONNTRACK6, TABLE_HALF_OPEN6 = 0, 1, 2, 3  # table_stats index
TABLE_NAMES = {TABLE_CONNTRACK: "conntrack", TABLE_HALF_OPEN: "half_open",
               TABLE_CONNTRACK6: "conntrack6", TABLE_HALF_OPEN6: "half_open6"}


def fill_held(table: int) -> int:
    """table_fill's slot of the entries the program holds in `table` (FILL_HELD)."""
    return table * 2


def fill_removed_by_lb(table: int) -> int:
    """table_fill's slot of the entries lb deleted from `table` (FILL_REMOVED_BY_LB; userspace writes it)."""
    return table * 2 + 1
MAX_REPLY_VIPS = 4  # VIPs one target endpoint can serve (reply_route.vips)
BPF_F_NO_COMMON_LRU = 0x2  # an LRU list per CPU (uapi/linux/bpf.h)
# Free entries a CPU takes at a time from an LRU hash's shared free list into
# its own (LOCAL_FREE_TARGET, kernel/bpf/bpf_lru_list.h).
LRU_LOCAL_FREE_TARGET = 128
# vip_meta.mode and flow_state.mode (consts.h FWD_*). The field was
# `reserved`, always 0 (FWD_NAT), in earlier builds.
FWD_NAT = 0  # destination rewritten; the client's address kept
FWD_FULLNAT = 1  # and the source rewritten to lb's address and a port of its own
FWD_DSR = 2  # only the destination MAC rewritten
MODE_NAMES = {FWD_NAT: "nat", FWD_FULLNAT: "full-nat", FWD_DSR: "dsr"}
MODE_NUMBERS = {name: number for number, name in MODE_NAMES.items()}
# Full NAT's source ports (FULLNAT_PORT_MIN/MAX, FULLNAT_PORT_TRIES): Limits.

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
    SYN_RESCHEDULED = 14
    MISS_NO_ENTRY = 15
    REPLY_NO_ENTRY = 16
    FLOW_CLOSED = 17
    FLOOD_NO_ENTRY = 18
    FLOW_ESTABLISHED = 19
    HANDSHAKE_MISMATCH = 20
    FIB_NO_NEIGH = 21
    FIB_FWD_DISABLED = 22
    FIB_BLACKHOLE = 23
    FIB_FRAG_NEEDED = 24
    FIB_NO_ROUTE = 25
    DROP_NO_PORT = 26
    DROP_NO_SOURCE = 27
    DROP_NO_ENTRY = 28
    FULLNAT_PORT_BUSY = 29
    FULLNAT_REVERSE = 30
    DSR = 31
    DROP_NO_NEIGH = 32
    ICMP_TOO_BIG = 33
    ICMP_TO_CLIENT = 34
    ICMP_TO_TARGET = 35
    PASS_IPV6 = 36
    PASS_IPV6_EXT_HDR = 37
    PASS_IPV6_FRAGMENT = 38
    PASS_ICMPV6 = 39
    IPV6_FORWARDED = 40

    @property
    def label(self) -> str:
        return self.name.lower()


COUNTER_MAX = len(Counter)

COUNTER_HELP = {
    Counter.PASS_NOT_IPV4: "neither IPv4 nor IPv6 (ARP, VLAN): passed",
    Counter.PASS_NOT_VIP: "IPv4 not for a TCP/UDP VIP, nor a reply: passed",
    Counter.PASS_PARSE_ERROR: "truncated header, bad IHL or length: passed",
    Counter.PASS_IP_OPTIONS: "IPv4 options: passed",
    Counter.PASS_FRAGMENT: "IPv4 fragment: passed",
    Counter.PASS_FIB: "rewritten, bpf_fib_lookup would not forward it: passed to the kernel (fib_* say why)",
    Counter.DROP_TTL: "TTL (IPv6: hop limit) <= 1: dropped",
    Counter.DROP_NO_TARGET: "VIP without targets: dropped",
    Counter.REDIRECTED: "forwarded (redirect)",
    Counter.TX: "forwarded (XDP_TX)",
    Counter.CONNTRACK_HIT: "packet of a known flow",
    Counter.CONNTRACK_MISS: "new flow hashed onto the ring",
    Counter.REVERSE_NAT: "reply rewritten to the VIP",
    Counter.DROP_BAD_IP_CSUM: "IPv4 header checksum wrong: dropped",
    Counter.SYN_RESCHEDULED: "SYN whose entry it must not follow (target out of service, flow closed, "
                             "expired): hashed onto the ring, entry replaced",
    Counter.MISS_NO_ENTRY: "TCP segment (not a SYN) of no tracked flow: forwarded by the ring, no entry "
                           "made (an evicted or untracked flow, or a stray or spoofed packet)",
    Counter.REPLY_NO_ENTRY: "reply of a flow with no entry (half flow): rewritten, as the ring sends it there",
    Counter.FLOW_CLOSED: "TCP flow closed (RST, or FIN both ways): short timeout, a SYN replaces it",
    Counter.FLOOD_NO_ENTRY: "new flow above new_flow_rate_limit: forwarded by the ring, no entry made",
    Counter.FLOW_ESTABLISHED: "handshake completed (the client acknowledged the target's SYN-ACK): "
                              "the half-open entry moved to conntrack",
    Counter.HANDSHAKE_MISMATCH: "ACK of a half-open flow not acknowledging the target's SYN-ACK (spoofed, "
                                "or early): forwarded, the flow stays half-open",
    Counter.FIB_NO_NEIGH: "pass_fib: the next hop's MAC is not known yet (the kernel resolves it)",
    Counter.FIB_FWD_DISABLED: "pass_fib: IPv4 forwarding is off on the receiving interface (the kernel drops it: "
                              "set net.ipv4.ip_forward=1)",
    Counter.FIB_BLACKHOLE: "pass_fib: the route is a blackhole, unreachable or prohibit (the kernel drops it)",
    Counter.FIB_FRAG_NEEDED: "pass_fib: bigger than the egress MTU (the kernel fragments it or answers ICMP)",
    Counter.FIB_NO_ROUTE: "pass_fib: no route to the destination (or it is local)",
    Counter.DROP_NO_PORT: "full NAT: no free source port toward the target after the tries: dropped",
    Counter.DROP_NO_SOURCE: "full NAT: lb has no address toward the target: dropped",
    Counter.DROP_NO_ENTRY: "full NAT: new flow above new_flow_rate_limit (it needs an entry): dropped",
    Counter.FULLNAT_PORT_BUSY: "full NAT: a source port tried was held by a live flow (another was tried)",
    Counter.FULLNAT_REVERSE: "full NAT: reply to lb's address:port rewritten back to VIP -> client",
    Counter.DSR: "DSR: only the destination MAC rewritten toward the target",
    Counter.DROP_NO_NEIGH: "full NAT or DSR: no neighbour entry toward the target yet: dropped",
    Counter.ICMP_TOO_BIG: "packet with DF (IPv6: any) too big for the path to its target: fragmentation needed "
                          "(ICMPv6 packet too big) sent back",
    Counter.ICMP_TO_CLIENT: "ICMP error about a packet sent toward a target: rewritten back, sent to the client",
    Counter.ICMP_TO_TARGET: "ICMP error about a reply sent from a VIP: rewritten, sent to the target",
    Counter.PASS_IPV6: "IPv6, no extension header, not ICMPv6, not TCP/UDP to an IPv6 VIP nor a reply: passed",
    Counter.PASS_IPV6_EXT_HDR: "IPv6 with an extension header (hop-by-hop, routing, destination options, "
                               "AH, ESP, ...): passed",
    Counter.PASS_IPV6_FRAGMENT: "IPv6 fragment: passed",
    Counter.PASS_ICMPV6: "ICMPv6 (neighbour discovery, echo, errors of no tracked flow): passed",
    Counter.IPV6_FORWARDED: "IPv6 frame forwarded (to a target, back to a client, an ICMPv6 error); "
                            "also counted as redirected or tx",
}


# --- map names (bpf/maps.h) ----------------------------------------------------

class MapName(str, enum.Enum):
    VIPS = "vips"
    TARGETS = "targets"
    RINGS = "rings"
    CONNTRACK = "conntrack"
    HALF_OPEN = "half_open"
    VIP_GENS = "vip_gens"
    VIP_STATS = "vip_stats"
    TARGET_STATS = "target_stats"
    COUNTERS = "counters"
    REPLIES = "replies"
    REPLY_PORTS = "reply_ports"
    FLOOD_GUARD = "flood_guard"
    NEXT_HOPS = "next_hops"
    TABLE_STATS = "table_stats"
    TABLE_FILL = "table_fill"
    FULLNAT_SOURCES = "fullnat_sources"
    FULLNAT_FLOWS = "fullnat_flows"
    # IPv6: maps of their own, ids shared with IPv4 (bpf/maps.h)
    VIPS6 = "vips6"
    TARGETS6 = "targets6"
    CONNTRACK6 = "conntrack6"
    HALF_OPEN6 = "half_open6"
    REPLIES6 = "replies6"
    FULLNAT_SOURCES6 = "fullnat_srcs6"  # a kernel map name holds 15 characters: "fullnat_sources6" is cut
    FULLNAT_FLOWS6 = "fullnat_flows6"


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
        ("mode", ctypes.c_uint32),  # FWD_*; was `reserved` (0, FWD_NAT): the pinned layout is kept
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
        ("syn_only", ctypes.c_uint8),  # 1: made by a SYN, no other client segment yet
        ("fin_client", ctypes.c_uint8),  # 1: the client sent a FIN
        ("fin_target", ctypes.c_uint8),  # 1: the target sent a FIN
        ("rst", ctypes.c_uint8),  # 1: either side sent a RST
        ("snat_addr", ctypes.c_uint32),  # network order; full NAT: lb's address the flow leaves from
        ("snat_port", ctypes.c_uint16),  # network order; full NAT: the source port lb allocated
        ("mode", ctypes.c_uint8),  # FWD_* of the VIP when the flow began
        ("pad", ctypes.c_uint8),
    ]


def tcp_state(state: FlowState) -> str:
    """A TCP entry's state by name: syn_sent, established, closing (one FIN),
    time_wait (FIN both ways) or closed (RST); the last two are closed."""
    if state.rst:
        return "closed"
    if state.fin_client and state.fin_target:
        return "time_wait"
    if state.fin_client or state.fin_target:
        return "closing"
    return "syn_sent" if state.syn_only else "established"


CLOSED_TCP_STATES = ("time_wait", "closed")


class HalfOpenFlow(ctypes.Structure):
    """A TCP flow whose handshake is not complete (half_open map)."""

    _fields_ = [
        ("flow", FlowState),  # as it will be in conntrack; syn_only is 1
        ("target_isn", ctypes.c_uint32),  # the sequence number of the target's SYN-ACK
        ("synack_seen", ctypes.c_uint32),  # 1: target_isn is set
    ]


def half_open_state(half: HalfOpenFlow) -> str:
    """A half-open entry's TCP state by name, as conntrack's: syn_sent, or
    syn_recv once the target's SYN-ACK was seen."""
    return "syn_recv" if half.synack_seen else "syn_sent"


class EndpointKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),  # network order
        ("port", ctypes.c_uint16),  # network order
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class ReplyVip(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),  # network order
        ("port", ctypes.c_uint16),  # network order
        ("pad", ctypes.c_uint16),
        ("vip_id", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
    ]


class ReplyRoute(ctypes.Structure):
    _fields_ = [
        ("target_id", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("vips", ReplyVip * MAX_REPLY_VIPS),
    ]


class FloodWindow(ctypes.Structure):
    _fields_ = [
        ("start_ns", ctypes.c_uint64),
        ("entries", ctypes.c_uint64),
    ]


class NextHop(ctypes.Structure):
    _fields_ = [
        ("expires_ns", ctypes.c_uint64),  # CLOCK_MONOTONIC_COARSE; 0: empty
        ("ifindex", ctypes.c_uint32),
        ("in_ifindex", ctypes.c_uint32),
        ("max_len", ctypes.c_uint16),
        ("dmac", ctypes.c_uint8 * 6),
        ("smac", ctypes.c_uint8 * 6),
        ("pad", ctypes.c_uint8 * 2),
    ]


class TableStats(ctypes.Structure):
    _fields_ = [
        ("inserts", ctypes.c_uint64),  # new keys the program put in
        ("removed", ctypes.c_uint64),  # entries the program deleted
        ("evictions", ctypes.c_uint64),  # inserts that found the table full (the LRU made room)
    ]


class TrafficStats(ctypes.Structure):
    _fields_ = [
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("new_flows", ctypes.c_uint64),
        ("reply_packets", ctypes.c_uint64),
        ("reply_bytes", ctypes.c_uint64),
    ]


# --- IPv6 structs (bpf/structs.h): ids shared with IPv4 ---------------------------

class Addr6(ctypes.Structure):
    """An IPv6 address, network order (the 16 bytes as packets carry them);
    four words in C. ip6_to_net() makes one, net_to_ip6() reads one."""

    _fields_ = [
        ("words", ctypes.c_uint32 * 4),  # network order
    ]


class VipKey6(ctypes.Structure):
    _fields_ = [
        ("addr", Addr6),
        ("port", ctypes.c_uint16),  # network order
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class Target6(ctypes.Structure):
    _fields_ = [
        ("addr", Addr6),
        ("port", ctypes.c_uint16),  # network order
        ("flags", ctypes.c_uint16),
    ]


class FlowKey6(ctypes.Structure):
    _fields_ = [
        ("src", Addr6),
        ("dst", Addr6),
        ("sport", ctypes.c_uint16),  # network order
        ("dport", ctypes.c_uint16),  # network order
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class FlowState6(ctypes.Structure):
    """conntrack6 value: an IPv4 flow's state (flow.snat_addr 0), and full NAT's IPv6 source."""

    _fields_ = [
        ("flow", FlowState),
        ("snat_addr", Addr6),  # full NAT: lb's address the flow leaves from; else zero
    ]


class HalfOpenFlow6(ctypes.Structure):
    """half_open6 value: as half_open's (half.flow.snat_addr 0), and full NAT's IPv6 source."""

    _fields_ = [
        ("half", HalfOpenFlow),
        ("snat_addr", Addr6),
    ]


class EndpointKey6(ctypes.Structure):
    _fields_ = [
        ("addr", Addr6),
        ("port", ctypes.c_uint16),  # network order
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class ReplyVip6(ctypes.Structure):
    _fields_ = [
        ("addr", Addr6),
        ("port", ctypes.c_uint16),  # network order
        ("pad", ctypes.c_uint16),
        ("vip_id", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
    ]


class ReplyRoute6(ctypes.Structure):
    _fields_ = [
        ("target_id", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("vips", ReplyVip6 * MAX_REPLY_VIPS),
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
    conntrack_size: int = 524288  # flows (one entry each)
    half_open_size: int = 131072  # TCP flows whose handshake is not complete
    tcp_idle_timeout: int = 350  # seconds
    udp_idle_timeout: int = 120  # seconds
    tcp_closed_timeout: int = 10  # seconds, after a RST
    tcp_time_wait_timeout: int = 120  # seconds, after FIN both ways
    tcp_syn_timeout: int = 60  # seconds a half-open entry lives after its client's last SYN
    new_flow_rate_limit: int = 20000  # new entries per CPU per second; 0: no limit
    # An LRU list per CPU (BPF_F_NO_COMMON_LRU), the map made conntrack_size x
    # possible CPUs so each CPU still holds conntrack_size flows; only the
    # benchmark sets it, to compare with the shared list.
    conntrack_per_cpu_lru: bool = False
    # The same for half_open (the map made half_open_size x possible CPUs).
    half_open_per_cpu_lru: bool = False
    # How long the forward path keeps a target's next hop (bpf_fib_lookup's
    # answer) per CPU, in milliseconds; 0: a lookup for every packet.
    next_hop_cache_ms: int = 1000
    # Full NAT's source ports, per (lb address, target endpoint, protocol),
    # and how many hashed ones a new flow tries before it is dropped.
    fullnat_port_min: int = 1024
    fullnat_port_max: int = 32767
    fullnat_port_tries: int = 16
    # The IPv6 flow tables (conntrack6, half_open6, fullnat_flows6) at the
    # IPv4 ones' sizes: the config has an IPv6 TCP/UDP listener (limits_for;
    # True for a Limits built by hand: tests, benchmarks). False:
    # unused_flow_table_entries() each, instead of 173 MiB at the default
    # sizes that nothing would write. The IPv4 maps are the same either way.
    ipv6_flows: bool = True

    def cflags(self) -> list[str]:
        return [
            f"-DRING_SIZE={self.ring_size}",
            f"-DMAX_VIPS={self.max_vips}",
            f"-DMAX_TARGETS={self.max_targets}",
            f"-DCONNTRACK_SIZE={self.conntrack_size}",
            f"-DHALF_OPEN_SIZE={self.half_open_size}",
            f"-DCONNTRACK6_SIZE={self.conntrack6_entries()}",
            f"-DHALF_OPEN6_SIZE={self.half_open6_entries()}",
            f"-DTCP_SYN_NS={self.tcp_syn_timeout * 1_000_000_000}ULL",
            f"-DTCP_IDLE_NS={self.tcp_idle_timeout * 1_000_000_000}ULL",
            f"-DUDP_IDLE_NS={self.udp_idle_timeout * 1_000_000_000}ULL",
            f"-DTCP_CLOSED_NS={self.tcp_closed_timeout * 1_000_000_000}ULL",
            f"-DTCP_TIME_WAIT_NS={self.tcp_time_wait_timeout * 1_000_000_000}ULL",
            f"-DNEW_FLOW_RATE_LIMIT={self.new_flow_rate_limit}ULL",
            f"-DCONNTRACK_LRU_FLAGS={BPF_F_NO_COMMON_LRU if self.conntrack_per_cpu_lru else 0}",
            f"-DHALF_OPEN_LRU_FLAGS={BPF_F_NO_COMMON_LRU if self.half_open_per_cpu_lru else 0}",
            f"-DNEXT_HOP_CACHE_NS={self.next_hop_cache_ms * 1_000_000}ULL",
            f"-DFULLNAT_PORT_MIN={self.fullnat_port_min}",
            f"-DFULLNAT_PORT_MAX={self.fullnat_port_max}",
            f"-DFULLNAT_PORT_TRIES={self.fullnat_port_tries}",
        ]

    def conntrack_entries(self) -> int:
        """max_entries of the conntrack map: conntrack_size, times the possible
        CPUs with a per-CPU LRU (each CPU's list gets max_entries / CPUs)."""
        if self.conntrack_per_cpu_lru:
            from lb.dataplane.libbpf import possible_cpus  # a ctypes binding, no compiler

            return self.conntrack_size * possible_cpus()
        return self.conntrack_size

    def half_open_entries(self) -> int:
        """max_entries of the half_open map (as conntrack_entries)."""
        if self.half_open_per_cpu_lru:
            from lb.dataplane.libbpf import possible_cpus  # a ctypes binding, no compiler

            return self.half_open_size * possible_cpus()
        return self.half_open_size

    def conntrack6_entries(self) -> int:
        """max_entries of conntrack6 and fullnat_flows6: conntrack_size, or
        the unused size (no larger) when the config has no IPv6 TCP/UDP listener."""
        return self.conntrack_size if self.ipv6_flows else min(self.conntrack_size, unused_flow_table_entries())

    def half_open6_entries(self) -> int:
        """max_entries of half_open6 (as conntrack6_entries, from half_open_size)."""
        return self.half_open_size if self.ipv6_flows else min(self.half_open_size, unused_flow_table_entries())


def unused_flow_table_entries() -> int:
    """The size of an IPv6 flow table when the config has no IPv6 TCP/UDP listener.

    Not 1: the program puts nothing in it then, except for a moment after a
    restart that removed the last IPv6 listener (vips6 holds its VIPs until
    the controller's first reconcile), and the table must still behave as an
    LRU. Its free entries go to a CPU's own list LRU_LOCAL_FREE_TARGET at a
    time: with fewer than that for every possible CPU, the first CPUs to
    insert hold all the free entries, and another CPU's insert evicts a live
    entry (or steals) from a table that is nearly empty, which also breaks
    table_fill's model (exact to about LRU_LOCAL_FREE_TARGET a CPU). So one
    batch a CPU: 256 entries (41 KiB for conntrack6) on 2 CPUs, 8192 on 64."""
    from lb.dataplane.libbpf import possible_cpus  # a ctypes binding, no compiler (as conntrack_entries)

    return LRU_LOCAL_FREE_TARGET * possible_cpus()


class Resize(enum.Enum):
    """What the loader does with a pinned map that differs from its MapSpec in
    max_entries alone (lb.dataplane.loader)."""

    REFUSE = "refuse"  # lb up stops, naming it: its entries would be lost
    WHEN_EMPTY = "when empty"  # replaced (unpinned, made anew) if it holds no entries; else refused
    ALWAYS = "always"  # replaced: nothing it holds belongs to a VIP of this config


IPV6_LISTENERS = "IPv6 TCP/UDP listeners (any or none)"  # MapSpec.sized_by of the IPv6 flow tables


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
    sized_by: tuple[str, ...] = ()  # the config keys (lb.model.LoadBalancer) its max_entries follows
    resize: Resize = Resize.REFUSE  # what the loader does with a pinned one of another max_entries


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


REPLY_PORT_WORDS = 1024  # reply_ports: 65536 bits, 64 a word


def map_specs(limits: Limits) -> dict[MapName, MapSpec]:
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    VIPS, TARGETS = ("max_vips",), ("max_targets",)  # noqa: N806 (constants of this table)
    # Without an IPv6 listener nothing the config serves can be in the IPv6 flow tables.
    ipv6_resize = Resize.WHEN_EMPTY if limits.ipv6_flows else Resize.ALWAYS
    specs = [
        MapSpec(MapName.VIPS, BPF_MAP_TYPE_HASH, VipKey, VipMeta, limits.max_vips, sized_by=VIPS),
        MapSpec(MapName.TARGETS, BPF_MAP_TYPE_ARRAY, u32, Target, limits.max_targets, sized_by=TARGETS),
        MapSpec(MapName.RINGS, BPF_MAP_TYPE_ARRAY, u32, u32, limits.max_vips * 2 * limits.ring_size,
                sized_by=("max_vips", "ring_size")),
        MapSpec(MapName.CONNTRACK, BPF_MAP_TYPE_LRU_HASH, FlowKey, FlowState, limits.conntrack_entries(),
                flags=BPF_F_NO_COMMON_LRU if limits.conntrack_per_cpu_lru else 0, sized_by=("conntrack_size",)),
        MapSpec(MapName.HALF_OPEN, BPF_MAP_TYPE_LRU_HASH, FlowKey, HalfOpenFlow, limits.half_open_entries(),
                flags=BPF_F_NO_COMMON_LRU if limits.half_open_per_cpu_lru else 0, sized_by=("half_open_size",)),
        MapSpec(MapName.VIP_GENS, BPF_MAP_TYPE_ARRAY, u32, u32, limits.max_vips, sized_by=VIPS),
        MapSpec(MapName.VIP_STATS, BPF_MAP_TYPE_PERCPU_ARRAY, u32, TrafficStats, limits.max_vips, True, sized_by=VIPS),
        MapSpec(MapName.TARGET_STATS, BPF_MAP_TYPE_PERCPU_ARRAY, u32, TrafficStats, limits.max_targets, True,
                sized_by=TARGETS),
        MapSpec(MapName.COUNTERS, BPF_MAP_TYPE_PERCPU_ARRAY, u32, u64, COUNTER_MAX, True),
        MapSpec(MapName.REPLIES, BPF_MAP_TYPE_HASH, EndpointKey, ReplyRoute, limits.max_targets * 2, sized_by=TARGETS),
        MapSpec(MapName.REPLY_PORTS, BPF_MAP_TYPE_ARRAY, u32, u64, REPLY_PORT_WORDS),
        MapSpec(MapName.FLOOD_GUARD, BPF_MAP_TYPE_PERCPU_ARRAY, u32, FloodWindow, 1, True),
        MapSpec(MapName.NEXT_HOPS, BPF_MAP_TYPE_PERCPU_ARRAY, u32, NextHop, limits.max_targets, True,
                sized_by=TARGETS),
        MapSpec(MapName.TABLE_STATS, BPF_MAP_TYPE_PERCPU_ARRAY, u32, TableStats, len(TABLE_NAMES), True),
        MapSpec(MapName.TABLE_FILL, BPF_MAP_TYPE_ARRAY, u32, u64, len(TABLE_NAMES) * 2),
        MapSpec(MapName.FULLNAT_SOURCES, BPF_MAP_TYPE_ARRAY, u32, u32, limits.max_targets, sized_by=TARGETS),
        MapSpec(MapName.FULLNAT_FLOWS, BPF_MAP_TYPE_LRU_HASH, FlowKey, FlowKey, limits.conntrack_size,
                sized_by=("conntrack_size",)),
        MapSpec(MapName.VIPS6, BPF_MAP_TYPE_HASH, VipKey6, VipMeta, limits.max_vips, sized_by=VIPS),
        MapSpec(MapName.TARGETS6, BPF_MAP_TYPE_ARRAY, u32, Target6, limits.max_targets, sized_by=TARGETS),
        MapSpec(MapName.CONNTRACK6, BPF_MAP_TYPE_LRU_HASH, FlowKey6, FlowState6, limits.conntrack6_entries(),
                sized_by=("conntrack_size", IPV6_LISTENERS), resize=ipv6_resize),
        MapSpec(MapName.HALF_OPEN6, BPF_MAP_TYPE_LRU_HASH, FlowKey6, HalfOpenFlow6, limits.half_open6_entries(),
                sized_by=("half_open_size", IPV6_LISTENERS), resize=ipv6_resize),
        MapSpec(MapName.REPLIES6, BPF_MAP_TYPE_HASH, EndpointKey6, ReplyRoute6, limits.max_targets * 2,
                sized_by=TARGETS),
        MapSpec(MapName.FULLNAT_SOURCES6, BPF_MAP_TYPE_ARRAY, u32, Addr6, limits.max_targets, sized_by=TARGETS),
        MapSpec(MapName.FULLNAT_FLOWS6, BPF_MAP_TYPE_LRU_HASH, FlowKey6, FlowKey6, limits.conntrack6_entries(),
                sized_by=("conntrack_size", IPV6_LISTENERS), resize=ipv6_resize),
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


def ip6_to_net(address: ipaddress.IPv6Address | str) -> Addr6:
    """An IPv6 address as the program holds it (Addr6: the 16 bytes in network order)."""
    return Addr6.from_buffer_copy(ipaddress.IPv6Address(address).packed)


def net_to_ip6(value: Addr6 | bytes) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(bytes(value))

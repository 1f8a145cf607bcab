"""IPv6 in the XDP program, on packet fixtures (BPF_PROG_TEST_RUN).

IPv6 VIPs and targets live in maps of their own (vips6, targets6,
conntrack6, ...) with ids shared with IPv4. This module writes them
directly, as the control plane does (the struct layouts are
lb/dataplane/structs.py's), next to the IPv4 services of
tests/test_xdp_packets.py, and checks each packet as that module does:
the XDP action, the frame as it leaves (byte for byte; the expected one
built by scapy with checksums computed from scratch, so the program's
incremental updates over 16-byte addresses are checked too) and the exact
change of every counter. No IPv6 header checksum; the hop limit goes down
as the TTL does.
"""

from __future__ import annotations

import ctypes
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.compat import raw
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lb import netlink as nl
from lb.dataplane import libbpf
from lb.dataplane.loader import Program, purge_pins
from lb.dataplane.maps import Maps
from lb.dataplane.structs import (
    FWD_DSR,
    FWD_FULLNAT,
    FWD_NAT,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TARGET_F_ACTIVE,
    TARGET_F_IN_SERVICE,
    Counter,
    EndpointKey6,
    FlowKey6,
    Limits,
    MapName,
    ReplyRoute6,
    ReplyVip6,
    Target6,
    VipKey6,
    VipMeta,
    ip6_to_net,
    net_to_port,
    port_to_net,
)
from lb.inspect.explain import flow_hash
from tests.names import name
from tests.test_xdp_packets import SERVICES, TARGET_ISN
from tests.xdp_fixture import (
    ACTION_NAMES,
    CLIENT_IF,
    LIMITS,
    MAC,
    NETNS,
    TARGET_IF,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    XDP_TX,
    Case,
    PacketLab,
    assert_frame,
    packet_lab,
    run_case,
)

pytestmark = pytest.mark.root

CLIENT6 = "fd00::2"
VIP6 = "fd00::100"
LB6 = "fd00:1::1"  # lb's address toward the targets: full NAT's source
SMALL_MTU_TARGET, SMALL_MTU_MAC = "fd00:1::15", "02:00:00:00:01:15"  # a host route with MTU 1280 leads there
TARGET_MAC = {"fd00:1::11": MAC["t1"], "fd00:1::12": MAC["t2"], "fd00:1::13": MAC["t3"], "fd00::50": MAC["near"],
              SMALL_MTU_TARGET: SMALL_MTU_MAC}


@dataclass(frozen=True)
class Service6:
    vip_id: int
    address: str
    port: int
    proto: int
    mode: int
    target_id: int
    target: str
    target_port: int


# Ids above those the IPv4 SERVICES take (Dataplane hands out the lowest free ones).
SERVICES6 = [
    Service6(10, VIP6, 9000, IPPROTO_TCP, FWD_NAT, 20, "fd00:1::11", 9000),
    Service6(11, VIP6, 9000, IPPROTO_UDP, FWD_NAT, 21, "fd00:1::12", 9000),
    Service6(12, VIP6, 8080, IPPROTO_TCP, FWD_NAT, 22, "fd00:1::13", 9000),  # port translation
    Service6(13, "fd00::102", 9000, IPPROTO_TCP, FWD_NAT, 23, "fd00::50", 9000),  # back out of fxa: XDP_TX
    Service6(14, "fd00::130", 9000, IPPROTO_TCP, FWD_DSR, 24, "fd00:1::12", 9000),
    Service6(15, "fd00::140", 9000, IPPROTO_TCP, FWD_FULLNAT, 25, "fd00:1::13", 9001),
    Service6(9, "fd00::150", 9000, IPPROTO_TCP, FWD_NAT, 26, SMALL_MTU_TARGET, 9000),
    Service6(8, "fd00::140", 9000, IPPROTO_UDP, FWD_FULLNAT, 27, "fd00:1::12", 9001),
    Service6(6, "fd00::131", 9000, IPPROTO_TCP, FWD_DSR, 29, "fd00:1::14", 9000),  # no neighbour
]


def write_services6(maps: Maps, services: list[Service6] | None = None, ring_size: int = LIMITS.ring_size) -> None:
    """What the control plane writes for SERVICES6: targets6, each VIP's ring
    (live half 0, every slot its one target), vips6; replies6 and the
    reply_ports bit for NAT VIPs; fullnat_srcs6 for full-NAT targets."""
    m = ring_size
    rings = maps.raw(MapName.RINGS)
    for s in SERVICES6 if services is None else services:
        flags = TARGET_F_ACTIVE | TARGET_F_IN_SERVICE
        maps.raw(MapName.TARGETS6).update(ctypes.c_uint32(s.target_id),
                                          Target6(ip6_to_net(s.target), port_to_net(s.target_port), flags))
        for slot in range(m):
            rings.update(ctypes.c_uint32(s.vip_id * 2 * m + slot), ctypes.c_uint32(s.target_id))
        maps.raw(MapName.VIPS6).update(VipKey6(ip6_to_net(s.address), port_to_net(s.port), s.proto),
                                       VipMeta(s.vip_id, 0, 0, s.mode))
        if s.mode == FWD_NAT:
            route = ReplyRoute6(s.target_id, 1)
            route.vips[0] = ReplyVip6(ip6_to_net(s.address), port_to_net(s.port), 0, s.vip_id, 0)
            maps.raw(MapName.REPLIES6).update(EndpointKey6(ip6_to_net(s.target), port_to_net(s.target_port),
                                                           s.proto), route)
            word = maps.raw(MapName.REPLY_PORTS)
            bits = word.lookup(ctypes.c_uint32(s.target_port >> 6))
            value = (0 if bits is None else int(bits.value)) | (1 << (s.target_port & 63))
            word.update(ctypes.c_uint32(s.target_port >> 6), ctypes.c_uint64(value))
        if s.mode == FWD_FULLNAT:
            maps.raw(MapName.FULLNAT_SOURCES6).update(ctypes.c_uint32(s.target_id), ip6_to_net(LB6))


# --- frame builders ----------------------------------------------------------------


def from_client(l4: Packet, dst: str = VIP6, hlim: int = 64, src: str = CLIENT6) -> Packet:
    return Ether(src=MAC["client"], dst=MAC["fxa"]) / IPv6(src=src, dst=dst, hlim=hlim) / l4


def from_target(src: str, l4: Packet, dst: str = CLIENT6) -> Packet:
    return Ether(src=TARGET_MAC[src], dst=MAC["fxb"]) / IPv6(src=src, dst=dst, hlim=64) / l4


def tcp(sport: int, dport: int = 9000, flags: str = "S", payload: bytes = b"") -> Packet:
    seq = TARGET_ISN if flags == "SA" else 1000
    segment = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=0 if "A" not in flags else TARGET_ISN + 1,
                  window=64240)
    return segment / Raw(payload) if payload else segment


def udp(sport: int, dport: int = 9000, payload: bytes = b"ping") -> Packet:
    return UDP(sport=sport, dport=dport) / Raw(payload)


def rewritten(pkt: Packet, *, out_src_mac: str, out_dst_mac: str, dst: str | None = None, dport: int | None = None,
              src: str | None = None, sport: int | None = None) -> bytes:
    """The frame as the program must emit it: the hop limit one less, the L4 checksum computed from scratch."""
    out = pkt.copy()
    out[Ether].src = out_src_mac
    out[Ether].dst = out_dst_mac
    if dst:
        out[IPv6].dst = dst
    if src:
        out[IPv6].src = src
    out[IPv6].hlim -= 1
    l4 = out[TCP] if TCP in out else out[UDP]
    if dport is not None:
        l4.dport = dport
    if sport is not None:
        l4.sport = sport
    l4.chksum = None
    return raw(out)


def handshake(sport: int, address: str = VIP6, port: int = 9000, target: str = "fd00:1::11",
              target_port: int = 9000) -> list[tuple[bytes, str]]:
    syn = from_client(tcp(sport, dport=port), dst=address)
    synack = from_target(target, tcp(target_port, sport, flags="SA"))
    ack = from_client(tcp(sport, dport=port, flags="A"), dst=address)
    return [(raw(syn), CLIENT_IF), (raw(synack), TARGET_IF), (raw(ack), CLIENT_IF)]


# --- the table -------------------------------------------------------------------------


FWD = {Counter.REDIRECTED: 1, Counter.IPV6_FORWARDED: 1}
TO_T1: dict[str, Any] = {"out_src_mac": MAC["fxb"], "out_dst_mac": MAC["t1"]}
TO_CLIENT: dict[str, Any] = {"out_src_mac": MAC["fxa"], "out_dst_mac": MAC["client"]}


def nat_cases() -> Iterator[Case]:
    syn = from_client(tcp(41001))
    yield Case("nat SYN: DNAT to the target, hop limit down, out of the target side", raw(syn), XDP_REDIRECT,
               rewritten(syn, dst="fd00:1::11", **TO_T1), {Counter.CONNTRACK_MISS: 1, **FWD})

    synack = from_target("fd00:1::11", tcp(9000, 41002, flags="SA"))
    yield Case("nat SYN-ACK of a half-open flow: source back to the VIP", raw(synack), XDP_REDIRECT,
               rewritten(synack, src=VIP6, **TO_CLIENT), {Counter.REVERSE_NAT: 1, **FWD}, TARGET_IF,
               before=[(raw(from_client(tcp(41002))), CLIENT_IF)])

    ack = from_client(tcp(41003, flags="A"))
    yield Case("nat ACK of the target's SYN-ACK: the flow moves to conntrack6", raw(ack), XDP_REDIRECT,
               rewritten(ack, dst="fd00:1::11", **TO_T1),
               {Counter.CONNTRACK_HIT: 1, Counter.FLOW_ESTABLISHED: 1, **FWD}, before=handshake(41003)[:2])

    early = from_client(tcp(41004, flags="A"))
    yield Case("nat ACK before the target's SYN-ACK: forwarded, the flow stays half-open", raw(early), XDP_REDIRECT,
               rewritten(early, dst="fd00:1::11", **TO_T1),
               {Counter.CONNTRACK_HIT: 1, Counter.HANDSHAKE_MISMATCH: 1, **FWD},
               before=[(raw(from_client(tcp(41004))), CLIENT_IF)])

    data = from_client(tcp(41005, flags="PA", payload=b"x" * 300))
    yield Case("nat established: the entry decides", raw(data), XDP_REDIRECT,
               rewritten(data, dst="fd00:1::11", **TO_T1), {Counter.CONNTRACK_HIT: 1, **FWD},
               before=handshake(41005))

    answer = from_target("fd00:1::11", tcp(9000, 41006, flags="PA", payload=b"y" * 100))
    yield Case("nat reply of an established flow: source back to the VIP", raw(answer), XDP_REDIRECT,
               rewritten(answer, src=VIP6, **TO_CLIENT), {Counter.REVERSE_NAT: 1, **FWD}, TARGET_IF,
               before=handshake(41006))

    stray = from_target("fd00:1::11", tcp(9000, 41007, flags="A"))
    yield Case("nat reply of a flow with no entry: the ring finds its VIP", raw(stray), XDP_REDIRECT,
               rewritten(stray, src=VIP6, **TO_CLIENT), {Counter.REVERSE_NAT: 1, Counter.REPLY_NO_ENTRY: 1, **FWD},
               TARGET_IF)

    fin = from_client(tcp(41008, flags="FA"))
    yield Case("nat FIN from the client, after the target's: the flow closes", raw(fin), XDP_REDIRECT,
               rewritten(fin, dst="fd00:1::11", **TO_T1), {Counter.CONNTRACK_HIT: 1, Counter.FLOW_CLOSED: 1, **FWD},
               before=[*handshake(41008), (raw(from_target("fd00:1::11", tcp(9000, 41008, flags="FA"))), TARGET_IF)])

    rst = from_client(tcp(41009, flags="R"))
    yield Case("nat RST from the client: the flow closes", raw(rst), XDP_REDIRECT,
               rewritten(rst, dst="fd00:1::11", **TO_T1), {Counter.CONNTRACK_HIT: 1, Counter.FLOW_CLOSED: 1, **FWD},
               before=handshake(41009))

    refused = from_target("fd00:1::11", tcp(9000, 41010, flags="RA"))
    yield Case("nat RST from the target to a SYN: the half-open entry goes", raw(refused), XDP_REDIRECT,
               rewritten(refused, src=VIP6, **TO_CLIENT), {Counter.REVERSE_NAT: 1, Counter.FLOW_CLOSED: 1, **FWD},
               TARGET_IF, before=[(raw(from_client(tcp(41010))), CLIENT_IF)])

    late = from_client(tcp(41011, flags="A"))
    yield Case("nat late segment after a RST: the closed entry still decides", raw(late), XDP_REDIRECT,
               rewritten(late, dst="fd00:1::11", **TO_T1), {Counter.CONNTRACK_HIT: 1, **FWD},
               before=[*handshake(41011), (raw(from_client(tcp(41011, flags="R"))), CLIENT_IF)])

    resyn = from_client(tcp(41012))
    yield Case("nat SYN after a close: rescheduled, a new half-open entry", raw(resyn), XDP_REDIRECT,
               rewritten(resyn, dst="fd00:1::11", **TO_T1),
               {Counter.CONNTRACK_MISS: 1, Counter.SYN_RESCHEDULED: 1, **FWD},
               before=[*handshake(41012), (raw(from_client(tcp(41012, flags="R"))), CLIENT_IF)])

    moved = from_client(tcp(41013, dport=8080))
    yield Case("nat port translation: VIP port 8080 to target port 9000", raw(moved), XDP_REDIRECT,
               rewritten(moved, dst="fd00:1::13", dport=9000, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t3"]),
               {Counter.CONNTRACK_MISS: 1, **FWD})

    back = from_target("fd00:1::13", tcp(9000, 41014, flags="SA"))
    yield Case("nat port translation, reply: source back to VIP:8080", raw(back), XDP_REDIRECT,
               rewritten(back, src=VIP6, sport=8080, **TO_CLIENT), {Counter.REVERSE_NAT: 1, **FWD}, TARGET_IF,
               before=[(raw(from_client(tcp(41014, dport=8080))), CLIENT_IF)])

    dgram = from_client(udp(51001))
    yield Case("nat UDP: DNAT, an entry made", raw(dgram), XDP_REDIRECT,
               rewritten(dgram, dst="fd00:1::12", out_src_mac=MAC["fxb"], out_dst_mac=MAC["t2"]),
               {Counter.CONNTRACK_MISS: 1, **FWD})

    again = from_client(udp(51002, payload=b"again"))
    yield Case("nat UDP of a known flow: the entry decides", raw(again), XDP_REDIRECT,
               rewritten(again, dst="fd00:1::12", out_src_mac=MAC["fxb"], out_dst_mac=MAC["t2"]),
               {Counter.CONNTRACK_HIT: 1, **FWD}, before=[(raw(from_client(udp(51002))), CLIENT_IF)])

    pong = from_target("fd00:1::12", udp(9000, 51003, payload=b"pong"))
    yield Case("nat UDP reply: source back to the VIP", raw(pong), XDP_REDIRECT,
               rewritten(pong, src=VIP6, **TO_CLIENT), {Counter.REVERSE_NAT: 1, **FWD}, TARGET_IF,
               before=[(raw(from_client(udp(51003))), CLIENT_IF)])

    near = from_client(tcp(41015), dst="fd00::102")
    yield Case("nat target on the receiving side: back out of it (XDP_TX)", raw(near), XDP_TX,
               rewritten(near, dst="fd00::50", out_src_mac=MAC["fxa"], out_dst_mac=MAC["near"]),
               {Counter.CONNTRACK_MISS: 1, Counter.TX: 1, Counter.IPV6_FORWARDED: 1})

    last_hop = from_client(tcp(41016), hlim=1)
    yield Case("hop limit 1: dropped", raw(last_hop), XDP_DROP, None, {Counter.DROP_TTL: 1})


def dsr_cases() -> Iterator[Case]:
    to_t2: dict[str, Any] = {"out_src_mac": MAC["fxb"], "out_dst_mac": MAC["t2"]}
    syn = from_client(tcp(42001), dst="fd00::130")
    yield Case("dsr SYN: only the MACs and the hop limit change", raw(syn), XDP_REDIRECT, rewritten(syn, **to_t2),
               {Counter.CONNTRACK_MISS: 1, Counter.DSR: 1, **FWD})

    ack = from_client(tcp(42002, flags="A"), dst="fd00::130")
    yield Case("dsr first ACK: established (no SYN-ACK crosses lb)", raw(ack), XDP_REDIRECT, rewritten(ack, **to_t2),
               {Counter.CONNTRACK_HIT: 1, Counter.FLOW_ESTABLISHED: 1, Counter.DSR: 1, **FWD},
               before=[(raw(from_client(tcp(42002), dst="fd00::130")), CLIENT_IF)])

    data = from_client(tcp(42003, flags="PA", payload=b"z" * 64), dst="fd00::130")
    yield Case("dsr established: the entry decides, MACs only", raw(data), XDP_REDIRECT, rewritten(data, **to_t2),
               {Counter.CONNTRACK_HIT: 1, Counter.DSR: 1, **FWD},
               before=[(raw(from_client(tcp(42003), dst="fd00::130")), CLIENT_IF),
                       (raw(from_client(tcp(42003, flags="A"), dst="fd00::130")), CLIENT_IF)])

    lonely = from_client(tcp(42005), dst="fd00::131")
    yield Case("dsr target with no neighbour entry: dropped, not passed (the kernel would deliver it to lb)",
               raw(lonely), XDP_DROP, None, {Counter.CONNTRACK_MISS: 1, Counter.DSR: 1, Counter.DROP_NO_NEIGH: 1})

    fin = from_client(tcp(42004, flags="FA"), dst="fd00::130")
    yield Case("dsr FIN from the client: forwarded, the entry half closed", raw(fin), XDP_REDIRECT,
               rewritten(fin, **to_t2), {Counter.CONNTRACK_HIT: 1, Counter.DSR: 1, **FWD},
               before=[(raw(from_client(tcp(42004), dst="fd00::130")), CLIENT_IF),
                       (raw(from_client(tcp(42004, flags="A"), dst="fd00::130")), CLIENT_IF)])


def malformed_cases() -> Iterator[Case]:
    """Never forwarded: passed untouched, counted by kind, even to a VIP."""
    ext = {Counter.PASS_IPV6_EXT_HDR: 1}
    yield Case("to a VIP behind a hop-by-hop header: passed", raw(from_client(IPv6ExtHdrHopByHop() / tcp(43001))),
               XDP_PASS, None, ext)
    chain = IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / tcp(43002)
    yield Case("to a VIP behind an extension header chain: passed", raw(from_client(chain)), XDP_PASS, None, ext)
    frag = from_client(IPv6ExtHdrFragment(id=9, m=1) / tcp(43003, payload=b"f" * 64))
    yield Case("a fragment to a VIP: passed", raw(frag), XDP_PASS, None, {Counter.PASS_IPV6_FRAGMENT: 1})
    whole = raw(from_client(tcp(43004)))
    parse_error = {Counter.PASS_PARSE_ERROR: 1}
    yield Case("TCP header cut short: passed", whole[:14 + 40 + 12], XDP_PASS, None, parse_error)
    yield Case("payload length past the frame: passed", raw(from_client(tcp(43005)))[:-4], XDP_PASS, None,
               parse_error)
    zero = from_client(UDP(sport=53001, dport=9000, chksum=0) / Raw(b"no checksum"))
    yield Case("UDP with a zero checksum (IPv6 forbids it): passed, the kernel drops it", raw(zero), XDP_PASS,
               None, parse_error)
    yield Case("ICMPv6 to a VIP: passed", raw(from_client(ICMPv6EchoRequest())), XDP_PASS, None,
               {Counter.PASS_ICMPV6: 1})
    yield Case("TCP to no VIP: passed", raw(from_client(tcp(43006), dst="fd00::199")), XDP_PASS, None,
               {Counter.PASS_IPV6: 1})
    yield Case("TCP to a VIP's address, another port: passed", raw(from_client(tcp(43007, dport=9999))), XDP_PASS,
               None, {Counter.PASS_IPV6: 1})


CASES = [*nat_cases(), *dsr_cases(), *malformed_cases()]


@pytest.fixture(scope="module")
def pkt_lab() -> Iterator[PacketLab]:
    with packet_lab() as the_lab:
        with nl.iproute(NETNS) as ipr:
            oif = nl.ifindex(ipr, TARGET_IF)
            ipr.route("add", dst=f"{SMALL_MTU_TARGET}/128", oif=oif, metrics={"mtu": 1280, "lock": 1 << 2})
            nl.add_neighbor(ipr, TARGET_IF, SMALL_MTU_TARGET, SMALL_MTU_MAC)
        the_lab.dataplane.apply(SERVICES)  # IPv4 beside IPv6, as lb runs them
        write_services6(the_lab.maps)
        yield the_lab


def check(pkt_lab: PacketLab, case: Case) -> bytes:
    result = run_case(pkt_lab, case)
    assert_frame(result.data, case.frame if case.expect is None else case.expect)
    return result.data


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_packet(pkt_lab: PacketLab, case: Case) -> None:
    check(pkt_lab, case)


def flow_key6(src: str, sport: int, dst: str, dport: int, proto: int = IPPROTO_TCP) -> FlowKey6:
    return FlowKey6(ip6_to_net(src), ip6_to_net(dst), port_to_net(sport), port_to_net(dport), proto)


def test_an_established_flow_is_in_conntrack6_not_conntrack(pkt_lab: PacketLab) -> None:
    for frame, ingress in handshake(44001):
        pkt_lab.run(frame, ingress)
    entry = pkt_lab.maps.raw(MapName.CONNTRACK6).lookup(flow_key6(CLIENT6, 44001, VIP6, 9000))
    assert entry is not None
    assert (entry.flow.target_id, entry.flow.vip_id, entry.flow.mode, entry.flow.syn_only) == (20, 10, FWD_NAT, 0)
    assert pkt_lab.maps.raw(MapName.HALF_OPEN6).lookup(flow_key6(CLIENT6, 44001, VIP6, 9000)) is None
    usage = {u.table: u for u in pkt_lab.maps.table_usage()}
    assert usage["conntrack6"].entries >= 1 and usage["half_open6"].inserts >= 1


# --- full NAT --------------------------------------------------------------------------

FULLNAT_VIP = "fd00::140"
TO_T3: dict[str, Any] = {"out_src_mac": MAC["fxb"], "out_dst_mac": MAC["t3"]}


def fullnat_port(pkt_lab: PacketLab, sport: int) -> int:
    key = flow_key6(CLIENT6, sport, FULLNAT_VIP, 9000)
    entry = pkt_lab.maps.raw(MapName.CONNTRACK6).lookup(key)
    if entry is not None:
        return net_to_port(entry.flow.snat_port)
    half = pkt_lab.maps.raw(MapName.HALF_OPEN6).lookup(key)
    assert half is not None
    return net_to_port(half.half.flow.snat_port)


def test_fullnat_syn_leaves_from_lbs_address_and_a_port_it_allocated(pkt_lab: PacketLab) -> None:
    syn = from_client(tcp(45001), dst=FULLNAT_VIP)
    result = pkt_lab.run(raw(syn))
    port = fullnat_port(pkt_lab, 45001)
    assert LIMITS.fullnat_port_min <= port <= LIMITS.fullnat_port_max
    expect = rewritten(syn, src=LB6, sport=port, dst="fd00:1::13", dport=9001, **TO_T3)
    assert (ACTION_NAMES[result.retval], result.data) == ("REDIRECT", expect)
    key = flow_key6(CLIENT6, 45001, FULLNAT_VIP, 9000)
    half = pkt_lab.maps.raw(MapName.HALF_OPEN6).lookup(key)
    assert half is not None and bytes(half.snat_addr) == ipaddress.IPv6Address(LB6).packed
    held = pkt_lab.maps.raw(MapName.FULLNAT_FLOWS6).lookup(flow_key6("fd00:1::13", 9001, LB6, port))
    assert held is not None and bytes(held) == bytes(key)


def test_fullnat_handshake_data_reply_and_close(pkt_lab: PacketLab) -> None:
    sport = 45002
    pkt_lab.run(raw(from_client(tcp(sport), dst=FULLNAT_VIP)))
    port = fullnat_port(pkt_lab, sport)

    synack = from_target("fd00:1::13", tcp(9001, port, flags="SA"), dst=LB6)
    check(pkt_lab, Case("full NAT SYN-ACK: back as VIP -> client", raw(synack), XDP_REDIRECT,
                        rewritten(synack, src=FULLNAT_VIP, sport=9000, dst=CLIENT6, dport=sport, **TO_CLIENT),
                        {Counter.FULLNAT_REVERSE: 1, **FWD}, TARGET_IF))
    ack = from_client(tcp(sport, flags="A"), dst=FULLNAT_VIP)
    check(pkt_lab, Case("full NAT ACK: established, same source", raw(ack), XDP_REDIRECT,
                        rewritten(ack, src=LB6, sport=port, dst="fd00:1::13", dport=9001, **TO_T3),
                        {Counter.CONNTRACK_HIT: 1, Counter.FLOW_ESTABLISHED: 1, **FWD}))
    assert fullnat_port(pkt_lab, sport) == port  # moved to conntrack6 with its source
    data = from_client(tcp(sport, flags="PA", payload=b"q" * 200), dst=FULLNAT_VIP)
    check(pkt_lab, Case("full NAT established", raw(data), XDP_REDIRECT,
                        rewritten(data, src=LB6, sport=port, dst="fd00:1::13", dport=9001, **TO_T3),
                        {Counter.CONNTRACK_HIT: 1, **FWD}))
    fin = from_target("fd00:1::13", tcp(9001, port, flags="FA"), dst=LB6)
    check(pkt_lab, Case("full NAT FIN from the target", raw(fin), XDP_REDIRECT,
                        rewritten(fin, src=FULLNAT_VIP, sport=9000, dst=CLIENT6, dport=sport, **TO_CLIENT),
                        {Counter.FULLNAT_REVERSE: 1, **FWD}, TARGET_IF))
    last = from_client(tcp(sport, flags="FA"), dst=FULLNAT_VIP)
    check(pkt_lab, Case("full NAT FIN from the client: closed", raw(last), XDP_REDIRECT,
                        rewritten(last, src=LB6, sport=port, dst="fd00:1::13", dport=9001, **TO_T3),
                        {Counter.CONNTRACK_HIT: 1, Counter.FLOW_CLOSED: 1, **FWD}))


def test_fullnat_udp_and_two_clients_get_distinct_ports(pkt_lab: PacketLab) -> None:
    ports = set()
    for sport in (46001, 46002, 46003):
        pkt_lab.run(raw(from_client(tcp(sport), dst=FULLNAT_VIP)))
        ports.add(fullnat_port(pkt_lab, sport))
    assert len(ports) == 3


def test_fullnat_reply_to_a_port_no_flow_holds_is_not_lbs(pkt_lab: PacketLab) -> None:
    stray = from_target("fd00:1::13", tcp(9001, 1030, flags="A"), dst=LB6)
    check(pkt_lab, Case("to lb's address, a port no flow holds: passed", raw(stray), XDP_PASS, None,
                        {Counter.PASS_IPV6: 1}, TARGET_IF))


# --- ICMPv6 ----------------------------------------------------------------------------

ROUTER6 = "fd00::50"  # on the client's side ("near")
TARGET_SIDE_ROUTER6 = "fd00:1::99"
ICMP_TO_CLIENT = {Counter.ICMP_TO_CLIENT: 1, **FWD}
ICMP_TO_TARGET = {Counter.ICMP_TO_TARGET: 1, **FWD}


def icmp6(src: str, dst: str, src_mac: str, dst_mac: str, error: Packet, quoted: bytes, hlim: int = 64) -> bytes:
    return raw(Ether(src=src_mac, dst=dst_mac) / IPv6(src=src, dst=dst, hlim=hlim) / error / Raw(quoted))


def icmp_cases() -> Iterator[Case]:
    small = "fd00::150"
    big = from_client(tcp(47001, flags="PA", payload=b"z" * 1400), dst=small)
    reply = (Ether(src=MAC["fxa"], dst=MAC["client"]) / IPv6(src=small, dst=CLIENT6, hlim=64) /
             ICMPv6PacketTooBig(mtu=1280) / Raw(raw(big[IPv6])[:48]))
    yield Case("a segment too big for the target's path: packet too big back to the client, quoting it as sent",
               raw(big), XDP_TX, raw(reply),
               {Counter.CONNTRACK_HIT: 1, Counter.ICMP_TOO_BIG: 1, Counter.IPV6_FORWARDED: 1, Counter.TX: 1},
               before=handshake(47001, address=small, target=SMALL_MTU_TARGET))
    fits = from_client(tcp(47002, flags="PA", payload=b"z" * 1200), dst=small)
    yield Case("a segment that fits the path: forwarded", raw(fits), XDP_REDIRECT,
               rewritten(fits, dst=SMALL_MTU_TARGET, out_src_mac=MAC["fxb"], out_dst_mac=SMALL_MTU_MAC),
               {Counter.CONNTRACK_HIT: 1, **FWD}, before=handshake(47002, address=small, target=SMALL_MTU_TARGET))

    seen = IPv6(src=CLIENT6, dst="fd00:1::12", hlim=63) / UDP(sport=47010, dport=9000) / Raw(b"ping")
    sent = IPv6(src=CLIENT6, dst=VIP6, hlim=63) / UDP(sport=47010, dport=9000) / Raw(b"ping")
    yield Case("port unreachable from a UDP target: quote back to client -> VIP, from the VIP",
               icmp6("fd00:1::12", CLIENT6, MAC["t2"], MAC["fxb"], ICMPv6DestUnreach(code=4), raw(seen)),
               XDP_REDIRECT,
               icmp6(VIP6, CLIENT6, MAC["fxa"], MAC["client"], ICMPv6DestUnreach(code=4), raw(sent), hlim=63),
               ICMP_TO_CLIENT, TARGET_IF, before=[(raw(from_client(udp(47010))), CLIENT_IF)])

    syn_seen = IPv6(src=CLIENT6, dst="fd00:1::11", hlim=63) / TCP(sport=47011, dport=9000, flags="S", seq=1000)
    syn_sent = IPv6(src=CLIENT6, dst=VIP6, hlim=63) / TCP(sport=47011, dport=9000, flags="S", seq=1000)
    yield Case("time exceeded beyond lb about a SYN (half-open): quote back to the VIP, the router stays the source",
               icmp6(TARGET_SIDE_ROUTER6, CLIENT6, MAC["t1"], MAC["fxb"], ICMPv6TimeExceeded(),
                     raw(syn_seen)[:48]), XDP_REDIRECT,
               icmp6(TARGET_SIDE_ROUTER6, CLIENT6, MAC["fxa"], MAC["client"], ICMPv6TimeExceeded(),
                     raw(syn_sent)[:48], hlim=63),
               ICMP_TO_CLIENT, TARGET_IF, before=[(raw(from_client(tcp(47011))), CLIENT_IF)])

    answer = IPv6(src=VIP6, dst=CLIENT6, hlim=63) / TCP(sport=9000, dport=47012, flags="PA") / Raw(b"x" * 1300)
    as_sent = IPv6(src="fd00:1::11", dst=CLIENT6, hlim=63) / TCP(sport=9000, dport=47012, flags="PA") / \
        Raw(b"x" * 1300)
    yield Case("packet too big about a reply from the VIP: to the target, quoting what it sent",
               icmp6(ROUTER6, VIP6, MAC["near"], MAC["fxa"], ICMPv6PacketTooBig(mtu=1280), raw(answer)[:1232]),
               XDP_REDIRECT,
               icmp6(ROUTER6, "fd00:1::11", MAC["fxb"], MAC["t1"], ICMPv6PacketTooBig(mtu=1280),
                     raw(as_sent)[:1232], hlim=63),
               ICMP_TO_TARGET, before=handshake(47012))

    stranger = IPv6(src=CLIENT6, dst="fd00:1::11", hlim=63) / TCP(sport=47013, dport=9000)
    yield Case("an error about no tracked flow: passed untouched",
               icmp6("fd00:1::11", CLIENT6, MAC["t1"], MAC["fxb"], ICMPv6DestUnreach(code=4), raw(stranger)),
               XDP_PASS, None, {Counter.PASS_ICMPV6: 1}, TARGET_IF)
    yield Case("an error quoting fewer than 8 bytes of ports: passed untouched",
               icmp6("fd00:1::11", CLIENT6, MAC["t1"], MAC["fxb"], ICMPv6DestUnreach(code=4), raw(stranger)[:44]),
               XDP_PASS, None, {Counter.PASS_ICMPV6: 1}, TARGET_IF)


ICMP_CASES = list(icmp_cases())


@pytest.mark.parametrize("case", ICMP_CASES, ids=[c.id for c in ICMP_CASES])
def test_icmpv6(pkt_lab: PacketLab, case: Case) -> None:
    check(pkt_lab, case)


def test_fullnat_icmpv6_both_ways(pkt_lab: PacketLab) -> None:
    pkt_lab.run(raw(from_client(tcp(47020), dst=FULLNAT_VIP)))
    port = fullnat_port(pkt_lab, 47020)
    at_target = IPv6(src=LB6, dst="fd00:1::13", hlim=63) / TCP(sport=port, dport=9001, flags="S", seq=1000)
    at_client = IPv6(src=CLIENT6, dst=FULLNAT_VIP, hlim=63) / TCP(sport=47020, dport=9000, flags="S", seq=1000)
    check(pkt_lab, Case("full NAT: an error from the target to lb's address goes to the client",
                        icmp6("fd00:1::13", LB6, MAC["t3"], MAC["fxb"], ICMPv6DestUnreach(code=1), raw(at_target)),
                        XDP_REDIRECT,
                        icmp6(FULLNAT_VIP, CLIENT6, MAC["fxa"], MAC["client"], ICMPv6DestUnreach(code=1),
                              raw(at_client), hlim=63),
                        ICMP_TO_CLIENT, TARGET_IF))

    pkt_lab.run(raw(from_client(udp(47021), dst=FULLNAT_VIP)))
    key = flow_key6(CLIENT6, 47021, FULLNAT_VIP, 9000, IPPROTO_UDP)
    entry = pkt_lab.maps.raw(MapName.CONNTRACK6).lookup(key)
    assert entry is not None
    udp_port = net_to_port(entry.flow.snat_port)
    from_vip = IPv6(src=FULLNAT_VIP, dst=CLIENT6, hlim=63) / UDP(sport=9000, dport=47021) / Raw(b"pong" * 300)
    sent_by_target = IPv6(src="fd00:1::12", dst=LB6, hlim=63) / UDP(sport=9001, dport=udp_port) / \
        Raw(b"pong" * 300)
    check(pkt_lab, Case("full NAT: an error about a reply goes to the target from lb's address, quote target -> lb",
                        icmp6(ROUTER6, FULLNAT_VIP, MAC["near"], MAC["fxa"], ICMPv6PacketTooBig(mtu=1280),
                              raw(from_vip)),
                        XDP_REDIRECT,
                        icmp6(LB6, "fd00:1::12", MAC["fxb"], MAC["t2"], ICMPv6PacketTooBig(mtu=1280),
                              raw(sent_by_target), hlim=63),
                        ICMP_TO_TARGET))


def test_fullnat_ports_under_pressure_are_distinct_and_failures_counted(pkt_lab: PacketLab) -> None:
    """20,000 concurrent IPv6 flows from one client address to one target
    (63 % of the default range): no two share a port; a flow that finds none
    is dropped and counted. A program of its own: tables big enough, no flood guard."""
    flows = 20000
    limits = Limits(ring_size=251, max_vips=16, max_targets=32, conntrack_size=32768, new_flow_rate_limit=0)
    pressure = name("pkt-v6-pressure")
    purge_pins(pressure)
    try:
        with Program.load(pressure, limits) as program, Maps(program.pin_dir, limits) as maps:
            write_services6(maps, [s for s in SERVICES6 if s.mode == FWD_FULLNAT and s.proto == IPPROTO_TCP],
                            limits.ring_size)
            frames = [raw(from_client(tcp(1024 + i), dst=FULLNAT_VIP)) for i in range(flows)]

            def body() -> list[libbpf.RunResult]:
                return [libbpf.prog_test_run(program.fd, f, ingress_ifindex=pkt_lab.ifindex[CLIENT_IF])
                        for f in frames]

            results = nl.run_in_netns(NETNS, body)
            sent = [Ether(r.data) for r in results if r.retval == XDP_REDIRECT]
            dropped = sum(1 for r in results if r.retval == XDP_DROP)
            assert len(sent) + dropped == flows
            ports = [p[TCP].sport for p in sent]
            assert len(set(ports)) == len(ports)  # no collision
            assert all(p[IPv6].src == LB6 and p[IPv6].dst == "fd00:1::13" for p in sent)
            assert maps.counters()[Counter.DROP_NO_PORT] == dropped <= flows // 1000
            assert sum(1 for _ in maps.raw(MapName.FULLNAT_FLOWS6).keys()) == len(sent)
    finally:
        purge_pins(pressure)


# --- the ring slot of an IPv6 flow (what `lb explain flow` must compute) -------------------

def test_the_ring_slot_of_an_ipv6_flow_is_flow_hash6(pkt_lab: PacketLab) -> None:
    """A VIP whose ring alternates two targets slot by slot: each flow lands
    on the target of slot flow_hash6 % M (lb.inspect.explain.flow_hash computes it)."""
    m = LIMITS.ring_size
    vip_id, vip = 7, "fd00::160"
    targets = {20: "fd00:1::11", 28: "fd00:1::12"}
    flags = TARGET_F_ACTIVE | TARGET_F_IN_SERVICE
    pkt_lab.maps.raw(MapName.TARGETS6).update(ctypes.c_uint32(28),
                                              Target6(ip6_to_net("fd00:1::12"), port_to_net(9000), flags))
    for slot in range(m):
        pkt_lab.maps.raw(MapName.RINGS).update(ctypes.c_uint32(vip_id * 2 * m + slot),
                                               ctypes.c_uint32(20 if slot % 2 == 0 else 28))
    pkt_lab.maps.raw(MapName.VIPS6).update(VipKey6(ip6_to_net(vip), port_to_net(9000), IPPROTO_TCP),
                                           VipMeta(vip_id, 0, 0, FWD_NAT))
    seen = set()
    for sport in range(48000, 48024):
        out = Ether(pkt_lab.run(raw(from_client(tcp(sport), dst=vip))).data)
        slot = flow_hash("TCP", ipaddress.IPv6Address(CLIENT6), sport, ipaddress.IPv6Address(vip), 9000) % m
        assert out[IPv6].dst == targets[20 if slot % 2 == 0 else 28]
        seen.add(out[IPv6].dst)
    assert len(seen) == 2


def test_a_ring_naming_an_ipv4_target_drops(pkt_lab: PacketLab) -> None:
    """An IPv6 VIP's ring holds IPv6 target ids; an IPv4 one there (zero in
    targets6) is no target: dropped, counted, never sent to an IPv4 address."""
    m = LIMITS.ring_size
    vip_id, vip = 7, "fd00::170"
    v4_target = pkt_lab.maps.targets()[0].target_id
    for slot in range(m):
        pkt_lab.maps.raw(MapName.RINGS).update(ctypes.c_uint32(vip_id * 2 * m + slot), ctypes.c_uint32(v4_target))
    key = VipKey6(ip6_to_net(vip), port_to_net(9000), IPPROTO_TCP)
    pkt_lab.maps.raw(MapName.VIPS6).update(key, VipMeta(vip_id, 0, 0, FWD_NAT))
    try:
        syn = from_client(tcp(48100), dst=vip)
        check(pkt_lab, Case("ring of an IPv6 VIP naming an IPv4 target", raw(syn), XDP_DROP, None,
                            {Counter.CONNTRACK_MISS: 1, Counter.DROP_NO_TARGET: 1}))
    finally:
        pkt_lab.maps.raw(MapName.VIPS6).delete(key)

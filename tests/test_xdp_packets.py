"""The XDP program on packet fixtures (BPF_PROG_TEST_RUN), as a table.

Each case: a description, the frame, where it arrives, the XDP action, the
frame as it must leave (byte for byte; None: untouched), and the exact
change of every global counter. Expected frames are built by scapy with
checksums computed from scratch, so they also check the program's
incremental checksum updates.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
import os
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Raw

from lb import maglev
from lb import netlink as nl
from lb.dataplane import libbpf
from lb.dataplane.dataplane import Dataplane, L4Service, ring_seed
from lb.dataplane.loader import Program, purge_pins
from lb.dataplane.maps import Endpoint, Maps, TableUsage, Traffic, VipAddr
from lb.dataplane.structs import IPPROTO_TCP, Counter, FlowKey, Limits, MapName, ip_to_net, port_to_net
from lb.inspect.explain import explain_flow_in, flow_hash
from tests.names import name
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
    PacketLab,
    assert_frame,
    counter_deltas,
    packet_lab,
)

pytestmark = pytest.mark.root

CLIENT = "10.0.0.2"
VIP = "10.0.0.100"
SMALL = name("pkt-small")  # pins of the programs with limits of their own
T = TypeVar("T")


def ep(address: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.IPv4Address(address), port)


def vip(address: str, port: int, proto: str = "TCP") -> VipAddr:
    return VipAddr(ipaddress.IPv4Address(address), port, proto)


SERVICES = [
    L4Service(vip(VIP, 9000), members=((ep("10.0.1.11", 9000), 1),)),
    L4Service(vip(VIP, 9000, "UDP"), members=((ep("10.0.1.12", 9000), 1),)),
    L4Service(vip(VIP, 8080), members=((ep("10.0.1.13", 9000), 1),)),  # port translation
    L4Service(vip("10.0.0.101", 9000), members=()),  # no target
    L4Service(vip("10.0.0.102", 9000), members=((ep("10.0.0.50", 9000), 1),)),  # back out of fxa: XDP_TX
    L4Service(vip("10.0.0.103", 9000), members=((ep("10.0.1.14", 9000), 1),)),  # no neighbour yet
]


# --- frame builders ----------------------------------------------------------------


def from_client(l4: Packet, dst: str = VIP, ttl: int = 64, **ip: Any) -> Packet:
    return Ether(src=MAC["client"], dst=MAC["fxa"]) / IP(src=CLIENT, dst=dst, ttl=ttl, id=7, **ip) / l4


def from_target(src: str, src_mac: str, l4: Packet, dst: str = CLIENT, **ip: Any) -> Packet:
    return Ether(src=src_mac, dst=MAC["fxb"]) / IP(src=src, dst=dst, ttl=64, id=9, **ip) / l4


TARGET_ISN = 4999  # every SYN-ACK's sequence number: the client's ACKs (ack 5000) acknowledge it


def tcp(sport: int, dport: int = 9000, flags: str = "S", payload: bytes = b"") -> Packet:
    seq = TARGET_ISN if flags == "SA" else 1000
    segment = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=0 if "A" not in flags else TARGET_ISN + 1,
                  window=64240)
    return segment / Raw(payload) if payload else segment


def handshake(sport: int, address: str = VIP, port: int = 9000, target: str = "10.0.1.11",
              target_port: int | None = None) -> list[tuple[bytes, str]]:
    """SYN, the target's SYN-ACK, the client's ACK of it: frames that leave the
    flow established in conntrack (a SYN alone leaves it half-open)."""
    syn = from_client(tcp(sport, dport=port), dst=address)
    synack = from_target(target, MAC[TARGETS[target]], tcp(target_port or port, sport, flags="SA"))
    ack = from_client(tcp(sport, dport=port, flags="A"), dst=address)
    return [(raw(syn), CLIENT_IF), (raw(synack), TARGET_IF), (raw(ack), CLIENT_IF)]


def udp(sport: int, dport: int = 9000, payload: bytes = b"ping", chksum: int | None = None) -> Packet:
    return UDP(sport=sport, dport=dport, chksum=chksum) / Raw(payload)


def rewritten(pkt: Packet, *, out_src_mac: str | None, out_dst_mac: str | None, dst: str | None = None,
              dport: int | None = None, src: str | None = None, sport: int | None = None,
              ttl_dec: bool = True, keep_l4_zero: bool = False) -> bytes:
    """The frame as the program must emit it, checksums recomputed in full."""
    out = pkt.copy()
    if out_src_mac:
        out[Ether].src = out_src_mac
    if out_dst_mac:
        out[Ether].dst = out_dst_mac
    if dst:
        out[IP].dst = dst
    if src:
        out[IP].src = src
    if ttl_dec:
        out[IP].ttl -= 1
    l4 = out[TCP] if TCP in out else out[UDP]
    if dport is not None:
        l4.dport = dport
    if sport is not None:
        l4.sport = sport
    del out[IP].chksum
    if not keep_l4_zero:
        l4.chksum = None
    return raw(out)


# --- the table -------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    frame: bytes
    action: int
    expect: bytes | None = None  # None: the frame leaves untouched
    counters: dict[Counter, int] = field(default_factory=dict)
    ingress: str = CLIENT_IF
    before: list[tuple[bytes, str]] = field(default_factory=list)  # frames run first (setting up a flow)
    new_flow: bool | None = None  # VIP stats: did this packet start a flow?
    services: list[L4Service] = field(default_factory=list)  # applied with SERVICES before `before`
    change: list[L4Service] | None = None  # applied with SERVICES after `before`, in place of `services`
    # The flow's conntrack entry after the frame: (VIP address, VIP port, client port) and its
    # TCP state ("syn_sent", "established", "closing", "time_wait", "closed"), or None: no entry.
    entry: tuple[str, int, int] | None = None
    entry_state: str | None = None


FWD = {Counter.CONNTRACK_MISS: 1, Counter.REDIRECTED: 1}
HIT = {Counter.CONNTRACK_HIT: 1, Counter.REDIRECTED: 1}
REV = {Counter.REVERSE_NAT: 1, Counter.REDIRECTED: 1}
PASS_NOT_VIP = {Counter.PASS_NOT_VIP: 1}
PARSE_ERROR = {Counter.PASS_PARSE_ERROR: 1}


def to_t1(pkt: Packet, **kw: Any) -> bytes:
    return rewritten(pkt, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t1"], dst="10.0.1.11", **kw)


def back_to_client(pkt: Packet, vip_address: str = VIP, **kw: Any) -> bytes:
    return rewritten(pkt, out_src_mac=MAC["fxa"], out_dst_mac=MAC["client"], src=vip_address, **kw)


TARGETS = {"10.0.1.11": "t1", "10.0.1.12": "t2", "10.0.1.13": "t3"}


def to_target(pkt: Packet, address: str, **kw: Any) -> bytes:
    return rewritten(pkt, out_src_mac=MAC["fxb"], out_dst_mac=MAC[TARGETS[address]], dst=address, **kw)


def extra(address: str, port: int, members: tuple[str, ...], draining: tuple[str, ...] = (),
          proto: str = "TCP") -> L4Service:
    """A service of a case's own: VIP address:port to targets on the same port. Its
    endpoints' flows end once a later apply leaves them out (so cases do not leak ids)."""
    return L4Service(vip(address, port, proto), members=tuple((ep(a, port), 1) for a in members),
                     draining=tuple(ep(a, port) for a in draining), end_flows_on_removal=True)


def port_to(address: str, port: int, members: tuple[str, ...], target: str, start: int) -> int:
    """The first client port from `start` whose flow to address:port the ring of
    `members` gives to `target` (Maglev over the sorted endpoints, as Dataplane builds it)."""
    endpoints = sorted(ep(a, port) for a in members)
    table = maglev.build_table([(str(e), 1) for e in endpoints], LIMITS.ring_size, seed=ring_seed(vip(address, port)))
    for sport in range(start, start + 1000):
        slot = flow_hash("TCP", ipaddress.IPv4Address(CLIENT), sport, ipaddress.IPv4Address(address), port)
        if endpoints[table[slot % LIMITS.ring_size]] == ep(target, port):
            return sport
    raise AssertionError(f"no port from {start} lands on {target}")


def cases() -> Iterator[Case]:
    syn = from_client(tcp(40001))
    yield Case("tcp SYN to VIP: new flow, DNAT, redirect to the target side", raw(syn), XDP_REDIRECT,
               to_t1(syn), FWD, new_flow=True)

    first, ack = from_client(tcp(40002)), from_client(tcp(40002, flags="A"))
    yield Case("tcp established flow: conntrack hit, same target", raw(ack), XDP_REDIRECT, to_t1(ack), HIT,
               before=handshake(40002), new_flow=False)

    data = from_client(tcp(40003, flags="PA", payload=b"GET / HTTP/1.1\r\n\r\n" * 20))
    yield Case("tcp segment with payload: payload intact, checksum updated", raw(data), XDP_REDIRECT,
               to_t1(data), HIT, before=handshake(40003), new_flow=False)

    synack = from_target("10.0.1.11", MAC["t1"], tcp(9000, 40004, flags="SA"))
    yield Case("reply from target: source back to VIP:port, redirect to the client side", raw(synack),
               XDP_REDIRECT, back_to_client(synack), REV, ingress=TARGET_IF,
               before=[(raw(from_client(tcp(40004))), CLIENT_IF)])

    health = from_target("10.0.1.11", MAC["t1"], tcp(9000, 50000, flags="SA"), dst="10.0.1.1")
    yield Case("a target answering lb's own address (a health check): pass untouched", raw(health), XDP_PASS,
               None, PASS_NOT_VIP, ingress=TARGET_IF)

    dgram = from_client(udp(50001))
    yield Case("udp to UDP VIP: DNAT with UDP checksum update", raw(dgram), XDP_REDIRECT,
               rewritten(dgram, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t2"], dst="10.0.1.12"), FWD,
               new_flow=True)

    nosum = from_client(udp(50002, chksum=0))
    yield Case("udp with zero checksum: stays zero", raw(nosum), XDP_REDIRECT,
               rewritten(nosum, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t2"], dst="10.0.1.12", keep_l4_zero=True),
               FWD, new_flow=True)

    udp_reply = from_target("10.0.1.12", MAC["t2"], udp(9000, 50003, payload=b"backend2 ping"))
    yield Case("udp reply from target: reverse NAT", raw(udp_reply), XDP_REDIRECT, back_to_client(udp_reply),
               REV, ingress=TARGET_IF, before=[(raw(from_client(udp(50003))), CLIENT_IF)])

    xlate = from_client(tcp(40005, dport=8080))
    yield Case("port translation: VIP :8080 to target :9000", raw(xlate), XDP_REDIRECT,
               rewritten(xlate, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t3"], dst="10.0.1.13", dport=9000), FWD,
               new_flow=True)

    xlate_reply = from_target("10.0.1.13", MAC["t3"], tcp(9000, 40006, flags="SA"))
    yield Case("port translation reply: source port back to 8080", raw(xlate_reply), XDP_REDIRECT,
               back_to_client(xlate_reply, sport=8080), REV, ingress=TARGET_IF,
               before=[(raw(from_client(tcp(40006, dport=8080))), CLIENT_IF)])

    yield Case("tcp to the VIP address on a port with no listener: pass", raw(from_client(tcp(40007, dport=22))),
               XDP_PASS, None, PASS_NOT_VIP)
    yield Case("HTTP listener port (served by the L7 proxy): pass", raw(from_client(tcp(40008, dport=80))),
               XDP_PASS, None, PASS_NOT_VIP)
    yield Case("udp to a port that is only a TCP VIP: pass", raw(from_client(udp(50004, dport=8080))),
               XDP_PASS, None, PASS_NOT_VIP)
    yield Case("tcp to an address that is not a VIP: pass", raw(from_client(tcp(40009), dst="10.0.0.1")),
               XDP_PASS, None, PASS_NOT_VIP)

    arp = Ether(src=MAC["client"], dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=CLIENT, pdst=VIP, hwsrc=MAC["client"])
    yield Case("ARP: pass", raw(arp), XDP_PASS, None, {Counter.PASS_NOT_IPV4: 1})
    yield Case("ICMP echo to the VIP: pass", raw(from_client(ICMP())), XDP_PASS, None, PASS_NOT_VIP)
    yield from ipv6_cases()
    vlan = Ether(src=MAC["client"], dst=MAC["fxa"]) / Dot1Q(vlan=5) / IP(src=CLIENT, dst=VIP) / tcp(40010)
    yield Case("802.1Q tagged: pass", raw(vlan), XDP_PASS, None, {Counter.PASS_NOT_IPV4: 1})

    full = raw(from_client(tcp(40011)))
    # The kernel hands XDP nothing shorter than an Ethernet header (a test run
    # refuses one too), so the shortest frames are a bare header.
    yield Case("bare Ethernet header, IPv4 ethertype, no IP header: pass", full[:14], XDP_PASS, None, PARSE_ERROR)
    yield Case("truncated IPv4 header: pass", full[:14 + 12], XDP_PASS, None, PARSE_ERROR)
    yield Case("truncated TCP header: pass", full[:14 + 20 + 10], XDP_PASS, None, PARSE_ERROR)
    full_udp = raw(from_client(udp(50005)))
    yield Case("truncated UDP header: pass", full_udp[:14 + 20 + 6], XDP_PASS, None, PARSE_ERROR)
    liar = from_client(tcp(40012))
    liar[IP].len = 200
    yield Case("IPv4 total length beyond the frame: pass", raw(liar), XDP_PASS, None, PARSE_ERROR)
    bad_ihl = bytearray(full)
    bad_ihl[14] = 0x44  # version 4, IHL 4 (16 bytes): impossible
    yield Case("IHL below 5: pass", bytes(bad_ihl), XDP_PASS, None, PARSE_ERROR)
    options = from_client(tcp(40013), options=[b"\x01\x01\x01\x00"])
    yield Case("IPv4 options: pass", raw(options), XDP_PASS, None, {Counter.PASS_IP_OPTIONS: 1})
    yield Case("first fragment (MF): pass", raw(from_client(tcp(40014), flags="MF")), XDP_PASS, None,
               {Counter.PASS_FRAGMENT: 1})
    yield Case("later fragment (offset): pass", raw(from_client(tcp(40015), frag=100)), XDP_PASS, None,
               {Counter.PASS_FRAGMENT: 1})
    yield Case("TTL 1 to a VIP: drop", raw(from_client(tcp(40016), ttl=1)), XDP_DROP, None, {Counter.DROP_TTL: 1})
    yield Case("VIP whose target group is empty: drop", raw(from_client(tcp(40017), dst="10.0.0.101")), XDP_DROP,
               None, {Counter.CONNTRACK_MISS: 1, Counter.DROP_NO_TARGET: 1})

    near = from_client(tcp(40018), dst="10.0.0.102")
    yield Case("target on the receiving side: XDP_TX", raw(near), XDP_TX,
               rewritten(near, out_src_mac=MAC["fxa"], out_dst_mac=MAC["near"], dst="10.0.0.50"),
               {Counter.CONNTRACK_MISS: 1, Counter.TX: 1}, new_flow=True)

    unresolved = from_client(tcp(40019), dst="10.0.0.103")
    yield Case("target with no neighbour entry: rewritten, passed to the kernel to forward", raw(unresolved),
               XDP_PASS, rewritten(unresolved, out_src_mac=None, out_dst_mac=None, dst="10.0.1.14", ttl_dec=False),
               {Counter.CONNTRACK_MISS: 1, Counter.PASS_FIB: 1, Counter.FIB_NO_NEIGH: 1}, new_flow=True)

    yield from tcp_life_cases()


MISS_NO_ENTRY = {Counter.CONNTRACK_MISS: 1, Counter.MISS_NO_ENTRY: 1, Counter.REDIRECTED: 1}
RESCHEDULED = {Counter.CONNTRACK_MISS: 1, Counter.SYN_RESCHEDULED: 1, Counter.REDIRECTED: 1}
CLOSED_HIT = {**HIT, Counter.FLOW_CLOSED: 1}
CLOSED_REV = {**REV, Counter.FLOW_CLOSED: 1}
ESTABLISHED = {**HIT, Counter.FLOW_ESTABLISHED: 1}
MISMATCH = {**HIT, Counter.HANDSHAKE_MISMATCH: 1}


def tcp_life_cases() -> Iterator[Case]:
    """A flow's entry follows TCP: only a SYN makes one, a SYN does not follow
    a stale one, FIN and RST close it; replies need no entry of their own."""

    def c(sport: int, flags: str = "A", address: str = VIP, port: int = 9000) -> Packet:
        return from_client(tcp(sport, dport=port, flags=flags), dst=address)

    def t(address: str, sport: int, flags: str = "A", port: int = 9000) -> Packet:
        return from_target(address, MAC[TARGETS[address]], tcp(port, sport, flags=flags))

    bad = from_client(tcp(40020), chksum=0x1234)
    yield Case("bad IPv4 header checksum: drop", raw(bad), XDP_DROP, None, {Counter.DROP_BAD_IP_CSUM: 1},
               entry=(VIP, 9000, 40020))
    bad_reply = from_target("10.0.1.11", MAC["t1"], tcp(9000, 40004, flags="A"), chksum=0x1234)
    yield Case("bad IPv4 header checksum on a reply: drop", raw(bad_reply), XDP_DROP, None,
               {Counter.DROP_BAD_IP_CSUM: 1}, ingress=TARGET_IF)

    ack = c(40021)
    yield Case("tcp ACK of no known flow: forwarded by the ring, no entry made", raw(ack), XDP_REDIRECT,
               to_t1(ack), MISS_NO_ENTRY, new_flow=False, entry=(VIP, 9000, 40021))
    for flags, what in (("R", "RST"), ("FA", "FIN+ACK")):
        stray = c(40022, flags)
        yield Case(f"tcp {what} of no known flow: forwarded by the ring, no entry made", raw(stray), XDP_REDIRECT,
                   to_t1(stray), MISS_NO_ENTRY, new_flow=False, entry=(VIP, 9000, 40022))

    half = t("10.0.1.11", 40023, "SA")
    yield Case("reply of a flow with no entry: source back to the VIP, as the ring sends that flow there",
               raw(half), XDP_REDIRECT, back_to_client(half),
               {Counter.REVERSE_NAT: 1, Counter.REPLY_NO_ENTRY: 1, Counter.REDIRECTED: 1}, ingress=TARGET_IF,
               before=[(raw(c(40023)), CLIENT_IF)], entry=(VIP, 9000, 40023))
    pair = ("10.0.1.11", "10.0.1.12")
    other = port_to("10.0.0.115", 9800, pair, "10.0.1.11", 40100)
    wrong = t("10.0.1.12", other, "SA", port=9800)
    yield Case("reply from a target for a flow the ring gives another target: pass untouched", raw(wrong),
               XDP_PASS, None, PASS_NOT_VIP, ingress=TARGET_IF, services=[extra("10.0.0.115", 9800, pair)])

    syn = c(40024, "S")
    yield Case("tcp SYN: entry half-open, syn_sent", raw(syn), XDP_REDIRECT, to_t1(syn), FWD, new_flow=True,
               entry=(VIP, 9000, 40024), entry_state="syn_sent")
    synack = t("10.0.1.11", 40029, "SA")
    yield Case("the target's SYN-ACK: source back to the VIP, half-open entry syn_recv", raw(synack),
               XDP_REDIRECT, back_to_client(synack), REV, ingress=TARGET_IF,
               before=[(raw(c(40029, "S")), CLIENT_IF)], entry=(VIP, 9000, 40029), entry_state="syn_recv")
    ack = c(40025)
    yield Case("the client's ACK of the SYN-ACK: the flow moves to conntrack, established", raw(ack), XDP_REDIRECT,
               to_t1(ack), ESTABLISHED, before=handshake(40025)[:2], new_flow=False, entry=(VIP, 9000, 40025),
               entry_state="established")
    ack = c(40026)
    yield Case("an ACK before the target's SYN-ACK: its target, the flow stays half-open", raw(ack), XDP_REDIRECT,
               to_t1(ack), MISMATCH, before=handshake(40026)[:1], new_flow=False, entry=(VIP, 9000, 40026),
               entry_state="syn_sent")
    spoofed = from_client(TCP(sport=40027, dport=9000, flags="A", seq=1000, ack=TARGET_ISN + 2, window=64240))
    yield Case("an ACK not acknowledging the SYN-ACK (spoofed): its target, the flow stays half-open", raw(spoofed),
               XDP_REDIRECT, to_t1(spoofed), MISMATCH, before=handshake(40027)[:2], new_flow=False,
               entry=(VIP, 9000, 40027), entry_state="syn_recv")
    rst = c(40028, "R")
    yield Case("client RST of a half-open flow: forwarded, entry gone", raw(rst), XDP_REDIRECT, to_t1(rst),
               CLOSED_HIT, before=handshake(40028)[:2], new_flow=False, entry=(VIP, 9000, 40028))

    # Out of service: .110 had t1 alone, then t2 in the ring and t1 draining.
    before = [extra("10.0.0.110", 9500, ("10.0.1.11",))]
    after = [extra("10.0.0.110", 9500, ("10.0.1.12",), draining=("10.0.1.11",))]
    syn = c(45000, "S", "10.0.0.110", 9500)
    yield Case("SYN on an entry whose target is draining (not in service): rescheduled onto the ring", raw(syn),
               XDP_REDIRECT, to_target(syn, "10.0.1.12"), RESCHEDULED, services=before, change=after,
               before=handshake(45000, "10.0.0.110", 9500), new_flow=True,
               entry=("10.0.0.110", 9500, 45000), entry_state="syn_sent")
    ack = c(45001, "A", "10.0.0.110", 9500)
    yield Case("ACK on an entry whose target is draining: still its target (draining flows go on)", raw(ack),
               XDP_REDIRECT, to_target(ack, "10.0.1.11"), HIT, services=before, change=after,
               before=handshake(45001, "10.0.0.110", 9500), new_flow=False,
               entry=("10.0.0.110", 9500, 45001), entry_state="established")
    dgram = from_client(udp(45002, dport=9500), dst="10.0.0.110")
    yield Case("UDP datagram on an entry whose target is draining: still its target", raw(dgram), XDP_REDIRECT,
               to_target(dgram, "10.0.1.11"), HIT, services=[extra("10.0.0.110", 9500, ("10.0.1.11",), proto="UDP")],
               change=[extra("10.0.0.110", 9500, ("10.0.1.12",), draining=("10.0.1.11",), proto="UDP")],
               before=[(raw(dgram), CLIENT_IF)], new_flow=False)

    # Ring changes under a flow: .111 had t1 alone, then t1 and t2; each port below lands on t2.
    alone, both = [extra("10.0.0.111", 9700, ("10.0.1.11",))], [extra("10.0.0.111", 9700, pair)]
    p = port_to("10.0.0.111", 9700, pair, "10.0.1.12", 46000)
    syn = c(p, "S", "10.0.0.111", 9700)
    yield Case("retransmitted SYN of a live flow: its target, though the ring changed", raw(syn), XDP_REDIRECT,
               to_target(syn, "10.0.1.11"), HIT, services=alone, change=both, before=[(raw(syn), CLIENT_IF)],
               new_flow=False, entry=("10.0.0.111", 9700, p), entry_state="syn_sent")
    p = port_to("10.0.0.111", 9700, pair, "10.0.1.12", p + 1)
    synack = t("10.0.1.11", p, "SA", 9700)
    yield Case("SYN-ACK of a half-open flow the ring now gives another target: back to the VIP by its entry",
               raw(synack), XDP_REDIRECT, back_to_client(synack, vip_address="10.0.0.111", sport=9700), REV,
               ingress=TARGET_IF, services=alone, change=both, before=[(raw(c(p, "S", "10.0.0.111", 9700)), CLIENT_IF)],
               entry=("10.0.0.111", 9700, p), entry_state="syn_recv")
    p = port_to("10.0.0.111", 9700, pair, "10.0.1.12", p + 1)
    syn = c(p, "S", "10.0.0.111", 9700)
    yield Case("SYN after a RST (closed entry): rescheduled onto the ring", raw(syn), XDP_REDIRECT,
               to_target(syn, "10.0.1.12"), RESCHEDULED, services=alone, change=both, new_flow=True,
               before=[*handshake(p, "10.0.0.111", 9700), (raw(t("10.0.1.11", p, "R", 9700)), TARGET_IF)],
               entry=("10.0.0.111", 9700, p), entry_state="syn_sent")
    p = port_to("10.0.0.111", 9700, pair, "10.0.1.12", p + 1)
    syn = c(p, "S", "10.0.0.111", 9700)
    yield Case("SYN after FIN both ways (time-wait entry): rescheduled onto the ring", raw(syn), XDP_REDIRECT,
               to_target(syn, "10.0.1.12"), RESCHEDULED, services=alone, change=both, new_flow=True,
               before=[*handshake(p, "10.0.0.111", 9700), (raw(c(p, "FA", "10.0.0.111", 9700)), CLIENT_IF),
                       (raw(t("10.0.1.11", p, "FA", 9700)), TARGET_IF)],
               entry=("10.0.0.111", 9700, p), entry_state="syn_sent")
    p = port_to("10.0.0.111", 9700, pair, "10.0.1.12", p + 1)
    syn = c(p, "S", "10.0.0.111", 9700)
    yield Case("SYN after one FIN (half-closed, target in service): still its target", raw(syn), XDP_REDIRECT,
               to_target(syn, "10.0.1.11"), HIT, services=alone, change=both, new_flow=False,
               before=[*handshake(p, "10.0.0.111", 9700), (raw(c(p, "FA", "10.0.0.111", 9700)), CLIENT_IF)],
               entry=("10.0.0.111", 9700, p), entry_state="closing")

    # FIN and RST, either side (VIP .100:9000 -> t1).
    fin = c(40030, "FA")
    yield Case("client FIN: forwarded, entry half-closed", raw(fin), XDP_REDIRECT, to_t1(fin), HIT,
               before=handshake(40030), entry=(VIP, 9000, 40030), entry_state="closing")
    fin = t("10.0.1.11", 40031, "FA")
    yield Case("target FIN after the client's: source back to the VIP, entry closed (time-wait)", raw(fin),
               XDP_REDIRECT, back_to_client(fin), CLOSED_REV, ingress=TARGET_IF,
               before=[*handshake(40031), (raw(c(40031, "FA")), CLIENT_IF)], entry=(VIP, 9000, 40031), entry_state="time_wait")
    fin = t("10.0.1.11", 40032, "FA")
    yield Case("target FIN first: source back to the VIP, entry half-closed", raw(fin), XDP_REDIRECT,
               back_to_client(fin), REV, ingress=TARGET_IF,
               before=handshake(40032),
               entry=(VIP, 9000, 40032), entry_state="closing")
    fin = c(40033, "FA")
    yield Case("client FIN after the target's: forwarded, entry closed (time-wait)", raw(fin), XDP_REDIRECT,
               to_t1(fin), CLOSED_HIT, before=[*handshake(40033), (raw(t("10.0.1.11", 40033, "FA")), TARGET_IF)],
               entry=(VIP, 9000, 40033), entry_state="time_wait")
    rst = c(40034, "R")
    yield Case("client RST: forwarded, entry closed", raw(rst), XDP_REDIRECT, to_t1(rst), CLOSED_HIT,
               before=handshake(40034),
               entry=(VIP, 9000, 40034), entry_state="closed")
    rst = t("10.0.1.11", 40035, "RA")
    yield Case("target RST (refusing a SYN): source back to the VIP, half-open entry gone", raw(rst),
               XDP_REDIRECT, back_to_client(rst), CLOSED_REV, ingress=TARGET_IF,
               before=[(raw(c(40035, "S")), CLIENT_IF)], entry=(VIP, 9000, 40035))
    ack = c(40036)
    yield Case("ACK after a RST: the closed entry still decides until it times out", raw(ack), XDP_REDIRECT,
               to_t1(ack), HIT, before=[*handshake(40036), (raw(c(40036, "R")), CLIENT_IF)],
               entry=(VIP, 9000, 40036), entry_state="closed")

    # One target endpoint behind two VIPs: the reply's VIP is the one its flow's entry names.
    shared = [extra("10.0.0.113", 9900, ("10.0.1.11",)), extra("10.0.0.114", 9900, ("10.0.1.11",))]
    reply = t("10.0.1.11", 40040, "SA", 9900)
    yield Case("reply from a target endpoint behind two VIPs: the VIP of its flow", raw(reply), XDP_REDIRECT,
               back_to_client(reply, vip_address="10.0.0.114"), REV, ingress=TARGET_IF, services=shared,
               before=[(raw(c(40040, "S", "10.0.0.114", 9900)), CLIENT_IF)])


def ipv6_cases() -> Iterator[Case]:
    """IPv6 is parsed and passed to the kernel untouched (no IPv6 VIPs on the
    XDP path yet), each kind counted: ND and the rest of ICMPv6, extension
    headers, fragments, truncated or lying headers."""

    def v6(*layers: Packet, **ip: Any) -> Packet:
        pkt: Packet = Ether(src=MAC["client"], dst=MAC["fxa"]) / IPv6(src="fd00::2", dst="fd00::100", **ip)
        for layer in layers:
            pkt = pkt / layer
        return pkt

    ipv6 = {Counter.PASS_IPV6: 1}
    yield Case("IPv6 TCP: pass", raw(v6(tcp(40020))), XDP_PASS, None, ipv6)
    yield Case("IPv6 UDP: pass", raw(v6(udp(50020))), XDP_PASS, None, ipv6)
    yield Case("IPv6, neither TCP, UDP nor ICMPv6 (no next header): pass", raw(v6(Raw(b""), nh=59)), XDP_PASS,
               None, ipv6)
    nd = v6(ICMPv6ND_NS(tgt="fd00::100"), hlim=255)
    yield Case("IPv6 neighbour solicitation: pass", raw(nd), XDP_PASS, None, {Counter.PASS_ICMPV6: 1})
    yield Case("ICMPv6 echo request: pass", raw(v6(ICMPv6EchoRequest())), XDP_PASS, None, {Counter.PASS_ICMPV6: 1})
    ext = {Counter.PASS_IPV6_EXT_HDR: 1}
    yield Case("IPv6 hop-by-hop options before TCP: pass", raw(v6(IPv6ExtHdrHopByHop(), tcp(40021))), XDP_PASS,
               None, ext)
    yield Case("IPv6 destination options before UDP: pass", raw(v6(IPv6ExtHdrDestOpt(), udp(50021))), XDP_PASS,
               None, ext)
    yield Case("IPv6 routing header before TCP: pass", raw(v6(IPv6ExtHdrRouting(), tcp(40022))), XDP_PASS, None,
               ext)
    frag = v6(IPv6ExtHdrFragment(id=5, m=1), tcp(40023, payload=b"x" * 64))
    yield Case("IPv6 first fragment: pass", raw(frag), XDP_PASS, None, {Counter.PASS_IPV6_FRAGMENT: 1})
    later = v6(IPv6ExtHdrFragment(id=5, offset=10, nh=6), Raw(b"y" * 16))
    yield Case("IPv6 later fragment: pass", raw(later), XDP_PASS, None, {Counter.PASS_IPV6_FRAGMENT: 1})
    whole = raw(v6(tcp(40024)))
    yield Case("IPv6 header cut short: pass", whole[:14 + 30], XDP_PASS, None, PARSE_ERROR)
    yield Case("IPv6 TCP header cut short: pass", whole[:14 + 40 + 10], XDP_PASS, None, PARSE_ERROR)
    short_udp = raw(v6(udp(50022)))
    yield Case("IPv6 UDP header cut short: pass", short_udp[:14 + 40 + 6], XDP_PASS, None, PARSE_ERROR)
    long_payload = raw(v6(tcp(40025), plen=200))
    yield Case("IPv6 payload length past the frame: pass", long_payload, XDP_PASS, None, PARSE_ERROR)
    short_payload = raw(v6(tcp(40026), plen=8))
    yield Case("IPv6 payload length shorter than the TCP header: pass", short_payload, XDP_PASS, None, PARSE_ERROR)
    version4 = bytearray(whole)
    version4[14] = (4 << 4) | (version4[14] & 0x0F)
    yield Case("IPv6 ethertype, IP version 4: pass", bytes(version4), XDP_PASS, None, PARSE_ERROR)


CASES = list(cases())


@pytest.fixture(scope="module")
def pkt_lab() -> Iterator[PacketLab]:
    with packet_lab() as the_lab:
        the_lab.dataplane.apply(SERVICES)
        yield the_lab


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 50


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_packet(pkt_lab: PacketLab, case: Case) -> None:
    try:
        check_case(pkt_lab, case)
    finally:
        if case.services or case.change:
            pkt_lab.dataplane.apply(SERVICES)


def check_case(pkt_lab: PacketLab, case: Case) -> None:
    if case.services:
        pkt_lab.dataplane.apply([*SERVICES, *case.services])
    for frame, ingress in case.before:
        pkt_lab.run(frame, ingress)
    if case.change is not None:
        pkt_lab.dataplane.apply([*SERVICES, *case.change])
    before = pkt_lab.maps.counters()
    vip_before = {v.vip: pkt_lab.maps.vip_traffic(v.vip_id) for v in pkt_lab.maps.vips()}

    result = pkt_lab.run(case.frame, case.ingress)

    assert ACTION_NAMES[result.retval] == ACTION_NAMES[case.action]
    assert_frame(result.data, case.frame if case.expect is None else case.expect)
    assert counter_deltas(pkt_lab.maps, before) == case.counters
    if case.new_flow is not None:
        changed = [(v, pkt_lab.maps.vip_traffic(v_id)) for v, v_id in
                   ((e.vip, e.vip_id) for e in pkt_lab.maps.vips())]
        moved = [(v, t) for v, t in changed if t.packets != vip_before[v].packets]
        assert len(moved) == 1
        assert moved[0][1].new_flows - vip_before[moved[0][0]].new_flows == (1 if case.new_flow else 0)
    if case.entry is not None:
        address, port, client_port = case.entry
        flow = pkt_lab.maps.flow("TCP", ep(CLIENT, client_port), ep(address, port))
        if case.entry_state is None:
            assert flow is None
        else:
            assert flow is not None and flow.tcp_state == case.entry_state


def test_flow_to_a_removed_target_is_rehashed_when_its_flows_end(pkt_lab: PacketLab) -> None:
    """A target removed with end_flows_on_removal: its flows' entries are gone
    and their next packet takes the ring (no entry made: it is not a SYN)."""
    service = vip("10.0.0.104", 9000)
    t1, t2 = ep("10.0.1.11", 9100), ep("10.0.1.12", 9100)
    pkt_lab.dataplane.apply([*SERVICES, L4Service(service, members=((t1, 1),), end_flows_on_removal=True)])
    syn = raw(from_client(tcp(41000), dst="10.0.0.104"))
    assert Ether(pkt_lab.run(syn).data)[IP].dst == "10.0.1.11"
    pkt_lab.dataplane.apply([*SERVICES, L4Service(service, members=((t2, 1),))])
    assert pkt_lab.maps.flow("TCP", ep(CLIENT, 41000), ep("10.0.0.104", 9000)) is None
    ack = raw(from_client(tcp(41000, flags="A"), dst="10.0.0.104"))
    before = pkt_lab.maps.counters()
    assert Ether(pkt_lab.run(ack).data)[IP].dst == "10.0.1.12"
    assert counter_deltas(pkt_lab.maps, before) == MISS_NO_ENTRY
    pkt_lab.dataplane.apply(SERVICES)


def test_flow_to_a_removed_target_goes_on_by_default(pkt_lab: PacketLab) -> None:
    """NLB's default (no connection termination at the end of the deregistration
    delay): a removed target's flows keep it; new flows do not get it."""
    service = vip("10.0.0.104", 9001)
    t1, t2 = ep("10.0.1.11", 9101), ep("10.0.1.12", 9101)
    pkt_lab.dataplane.apply([*SERVICES, L4Service(service, members=((t1, 1),))])
    for frame, ingress in handshake(41001, "10.0.0.104", 9001, target_port=9101):
        assert pkt_lab.run(frame, ingress).retval == XDP_REDIRECT
    pkt_lab.dataplane.apply([*SERVICES, L4Service(service, members=((t2, 1),))])
    ack = raw(from_client(tcp(41001, dport=9001, flags="A"), dst="10.0.0.104"))
    assert Ether(pkt_lab.run(ack).data)[IP].dst == "10.0.1.11"
    reply = raw(from_target("10.0.1.11", MAC["t1"], tcp(9101, 41001, flags="A")))
    assert Ether(pkt_lab.run(reply, TARGET_IF).data)[IP].src == "10.0.0.104"
    syn = raw(from_client(tcp(41002, dport=9001), dst="10.0.0.104"))
    assert Ether(pkt_lab.run(syn).data)[IP].dst == "10.0.1.12"
    pkt_lab.dataplane.apply([*SERVICES, L4Service(service, end_flows_on_removal=True)])
    pkt_lab.dataplane.apply(SERVICES)


def test_draining_target_keeps_its_flows_but_gets_no_new_ones(pkt_lab: PacketLab) -> None:
    service = vip("10.0.0.105", 9000)
    t1, t2 = ep("10.0.1.11", 9200), ep("10.0.1.12", 9200)
    pkt_lab.dataplane.apply([*SERVICES, L4Service(service, members=((t1, 1),))])
    old = raw(from_client(tcp(42000), dst="10.0.0.105"))
    assert Ether(pkt_lab.run(old).data)[IP].dst == "10.0.1.11"
    pkt_lab.dataplane.apply([*SERVICES, L4Service(service, members=((t2, 1),), draining=(t1,))])
    assert Ether(pkt_lab.run(raw(from_client(tcp(42000, flags="A"), dst="10.0.0.105"))).data)[IP].dst == "10.0.1.11"
    for sport in range(42001, 42021):
        assert Ether(pkt_lab.run(raw(from_client(tcp(sport), dst="10.0.0.105"))).data)[IP].dst == "10.0.1.12"
    pkt_lab.dataplane.apply(SERVICES)


def test_flows_of_a_deleted_vip_pass_to_the_kernel(pkt_lab: PacketLab) -> None:
    """Conntrack is consulted before the VIP table, so a deleted VIP must make
    its flows stale (vip_gens): both directions then pass untouched."""
    service = vip("10.0.0.106", 9000)
    pkt_lab.dataplane.apply([*SERVICES, L4Service(service, members=((ep("10.0.1.11", 9300), 1),))])
    syn = raw(from_client(tcp(43000), dst="10.0.0.106"))
    assert pkt_lab.run(syn).retval == XDP_REDIRECT
    pkt_lab.dataplane.apply(SERVICES)

    before = pkt_lab.maps.counters()
    ack = raw(from_client(tcp(43000, flags="A"), dst="10.0.0.106"))
    result = pkt_lab.run(ack)
    assert (result.retval, result.data) == (XDP_PASS, ack)
    reply = raw(from_target("10.0.1.11", MAC["t1"], tcp(9300, 43000, flags="A")))
    result = pkt_lab.run(reply, TARGET_IF)
    assert (result.retval, result.data) == (XDP_PASS, reply)
    assert counter_deltas(pkt_lab.maps, before) == {Counter.PASS_NOT_VIP: 2}


def test_a_recreated_vip_does_not_inherit_the_old_flows(pkt_lab: PacketLab) -> None:
    """Deleting a VIP ends its flows even when it comes back at once with
    other targets: the old entry is stale, the flow is hashed again."""
    recreated, keeper = vip("10.0.0.107", 9000), vip("10.0.0.108", 9000)
    t1, t2 = ep("10.0.1.11", 9400), ep("10.0.1.12", 9400)
    keep_t1 = L4Service(keeper, members=((t1, 1),))  # t1 stays active throughout
    pkt_lab.dataplane.apply([*SERVICES, keep_t1, L4Service(recreated, members=((t1, 1),))])
    assert Ether(pkt_lab.run(raw(from_client(tcp(44000), dst="10.0.0.107"))).data)[IP].dst == "10.0.1.11"
    pkt_lab.dataplane.apply([*SERVICES, keep_t1])
    pkt_lab.dataplane.apply([*SERVICES, keep_t1, L4Service(recreated, members=((t2, 1),))])
    before = pkt_lab.maps.counters()
    frame = raw(from_client(tcp(44000, flags="A"), dst="10.0.0.107"))
    assert Ether(pkt_lab.run(frame).data)[IP].dst == "10.0.1.12"
    assert pkt_lab.maps.counters()[Counter.CONNTRACK_MISS] == before[Counter.CONNTRACK_MISS] + 1
    pkt_lab.dataplane.apply(SERVICES)


def age_entry(pkt_lab: PacketLab, client_port: int, address: str, port: int, seconds: float) -> None:
    """Move an entry's last packet `seconds` into the past (as if it had been idle that long)."""
    table = pkt_lab.maps.raw(MapName.CONNTRACK)
    key = FlowKey(ip_to_net(CLIENT), ip_to_net(address), port_to_net(client_port), port_to_net(port), IPPROTO_TCP)
    state = table.lookup(key)
    assert state is not None
    state.last_seen_ns = (state.last_seen_ns - int(seconds * 1e9)) % 2**64
    table.update(key, state)


def test_an_idle_entry_is_rearmed_by_the_next_segment(pkt_lab: PacketLab) -> None:
    """An entry idle past the TCP idle timeout no longer decides; the next
    segment takes the ring and the entry starts again from it (no new entry)."""
    for frame, ingress in handshake(40050):
        pkt_lab.run(frame, ingress)
    # The program's clock arithmetic is modulo 2^64, so this ages the entry
    # even on a host up for less than the timeout (the guest of make test-kernels).
    age_entry(pkt_lab, 40050, VIP, 9000, LIMITS.tcp_idle_timeout + 1)
    before = pkt_lab.maps.counters()
    ack = from_client(tcp(40050, flags="A"))
    result = pkt_lab.run(raw(ack))
    assert (result.retval, result.data) == (XDP_REDIRECT, to_t1(ack))
    assert counter_deltas(pkt_lab.maps, before) == FWD
    flow = pkt_lab.maps.flow("TCP", ep(CLIENT, 40050), ep(VIP, 9000))
    assert flow is not None and flow.idle_s < 5 and flow.tcp_state == "established"


def test_a_closed_entry_times_out_and_is_not_rearmed(pkt_lab: PacketLab) -> None:
    """After tcp_closed_timeout a RST's entry no longer decides, and a late
    segment does not bring it back (only a SYN makes an entry)."""
    for frame, ingress in handshake(40051):
        pkt_lab.run(frame, ingress)
    pkt_lab.run(raw(from_client(tcp(40051, flags="R"))))
    age_entry(pkt_lab, 40051, VIP, 9000, LIMITS.tcp_closed_timeout - 1)
    before = pkt_lab.maps.counters()
    late = from_client(tcp(40051, flags="A"))
    assert pkt_lab.run(raw(late)).data == to_t1(late)
    assert counter_deltas(pkt_lab.maps, before) == HIT  # within the closed timeout: still decides
    age_entry(pkt_lab, 40051, VIP, 9000, LIMITS.tcp_closed_timeout + 1)
    before = pkt_lab.maps.counters()
    assert pkt_lab.run(raw(late)).data == to_t1(late)
    assert counter_deltas(pkt_lab.maps, before) == MISS_NO_ENTRY
    flow = pkt_lab.maps.flow("TCP", ep(CLIENT, 40051), ep(VIP, 9000))
    assert flow is not None and flow.tcp_state == "closed" and flow.idle_s > LIMITS.tcp_closed_timeout


def test_a_time_wait_entry_lasts_tcp_time_wait_timeout(pkt_lab: PacketLab) -> None:
    for frame, ingress in handshake(40052):
        pkt_lab.run(frame, ingress)
    pkt_lab.run(raw(from_client(tcp(40052, flags="FA"))))
    pkt_lab.run(raw(from_target("10.0.1.11", MAC["t1"], tcp(9000, 40052, flags="FA"))), TARGET_IF)
    late = from_client(tcp(40052, flags="A"))
    age_entry(pkt_lab, 40052, VIP, 9000, LIMITS.tcp_time_wait_timeout - 1)
    before = pkt_lab.maps.counters()
    pkt_lab.run(raw(late))
    assert counter_deltas(pkt_lab.maps, before) == HIT
    age_entry(pkt_lab, 40052, VIP, 9000, LIMITS.tcp_time_wait_timeout + 1)
    before = pkt_lab.maps.counters()
    pkt_lab.run(raw(late))
    assert counter_deltas(pkt_lab.maps, before) == MISS_NO_ENTRY


def test_a_syn_does_not_refresh_an_entry_it_does_not_use(pkt_lab: PacketLab) -> None:
    """The bug this replaces: a SYN to a dead target refreshed its entry, so
    the entry never expired. Now the SYN takes the ring and the entry is new."""
    old = [extra("10.0.0.116", 9510, ("10.0.1.11",))]
    new = [extra("10.0.0.116", 9510, ("10.0.1.12",), draining=("10.0.1.11",))]
    try:
        pkt_lab.dataplane.apply([*SERVICES, *old])
        syn = from_client(tcp(40053, dport=9510), dst="10.0.0.116")
        pkt_lab.run(raw(syn))
        pkt_lab.run(raw(from_client(tcp(40053, dport=9510, flags="A"), dst="10.0.0.116")))
        pkt_lab.dataplane.apply([*SERVICES, *new])
        for _ in range(3):
            assert Ether(pkt_lab.run(raw(syn)).data)[IP].dst == "10.0.1.12"
            flow = pkt_lab.maps.flow("TCP", ep(CLIENT, 40053), ep("10.0.0.116", 9510))
            assert flow is not None and flow.tcp_state == "syn_sent"
            assert next(t.endpoint for t in pkt_lab.maps.targets() if t.target_id == flow.target_id) == ep("10.0.1.12", 9510)
    finally:
        pkt_lab.dataplane.apply(SERVICES)


def test_terminated_target_flows_are_removed_and_rehashed(pkt_lab: PacketLab) -> None:
    """Connection termination (an unhealthy target): its entries are deleted,
    the next segment goes to the ring's target, and that target's answer (a
    RST to a segment it never saw a SYN for) reaches the client from the VIP."""
    svc = "10.0.0.117"
    first = [extra(svc, 9520, ("10.0.1.11",))]
    try:
        pkt_lab.dataplane.apply([*SERVICES, *first])
        for sport in (40054, 40055):
            pkt_lab.run(raw(from_client(tcp(sport, dport=9520), dst=svc)))
            pkt_lab.run(raw(from_client(tcp(sport, dport=9520, flags="A"), dst=svc)))
        t1, t2 = ep("10.0.1.11", 9520), ep("10.0.1.12", 9520)
        pkt_lab.dataplane.apply([*SERVICES, L4Service(vip(svc, 9520), members=((t2, 1),), terminated=(t1,),
                                                      end_flows_on_removal=True)])
        entry = next(t for t in pkt_lab.maps.targets() if t.endpoint == t1)
        assert (entry.active, entry.in_service) == (False, False)
        assert pkt_lab.maps.flow("TCP", ep(CLIENT, 40054), ep(svc, 9520)) is None
        assert pkt_lab.maps.flow("TCP", ep(CLIENT, 40055), ep(svc, 9520)) is None
        before = pkt_lab.maps.counters()
        ack = from_client(tcp(40054, dport=9520, flags="A"), dst=svc)
        assert pkt_lab.run(raw(ack)).data == to_target(ack, "10.0.1.12")
        rst = from_target("10.0.1.12", MAC["t2"], tcp(9520, 40054, flags="R"))
        assert pkt_lab.run(raw(rst), TARGET_IF).data == back_to_client(rst, vip_address=svc)
        assert counter_deltas(pkt_lab.maps, before) == {
            Counter.CONNTRACK_MISS: 1, Counter.MISS_NO_ENTRY: 1, Counter.REDIRECTED: 2, Counter.REVERSE_NAT: 1,
            Counter.REPLY_NO_ENTRY: 1}
    finally:
        pkt_lab.dataplane.apply(SERVICES)


def test_in_service_and_active_flags(pkt_lab: PacketLab) -> None:
    svc = vip("10.0.0.118", 9530)
    a, b, c = ep("10.0.1.11", 9530), ep("10.0.1.12", 9530), ep("10.0.1.13", 9530)
    try:
        pkt_lab.dataplane.apply([*SERVICES, L4Service(svc, members=((a, 1),), draining=(b,), terminated=(c,))])
        flags = {t.endpoint: (t.active, t.in_service) for t in pkt_lab.maps.targets()}
        assert flags[a] == (True, True) and flags[b] == (True, False) and flags[c] == (False, False)
        pkt_lab.dataplane.apply([*SERVICES, L4Service(svc, members=((b, 1), (c, 1)), draining=(a,))])
        flags = {t.endpoint: (t.active, t.in_service) for t in pkt_lab.maps.targets()}
        assert flags[a] == (True, False) and flags[b] == (True, True) and flags[c] == (True, True)
    finally:
        pkt_lab.dataplane.apply([*SERVICES, L4Service(svc, end_flows_on_removal=True)])
        pkt_lab.dataplane.apply(SERVICES)


def flows_of(maps: Maps) -> int:
    """Entries in conntrack and in half_open."""
    return sum(1 for _ in maps.flows()) + sum(1 for _ in maps.half_open_flows())


def run_on_one_cpu(fn: Callable[[], T]) -> T:
    """fn in a thread of the packet namespace pinned to CPU 0 (per-CPU LRU lists are per CPU)."""

    def pinned() -> T:
        os.sched_setaffinity(0, {0})
        return fn()

    return nl.run_in_netns(NETNS, pinned)


@pytest.fixture()
def small_program() -> Iterator[Callable[..., tuple[Program, Maps]]]:
    """Another program (own pins, own limits) in the packet namespace, with SERVICES applied."""
    loaded: list[tuple[Program, Maps]] = []

    def load(limits: Limits, services: list[L4Service] | None = None) -> tuple[Program, Maps]:
        purge_pins(SMALL)
        program = Program.load(SMALL, limits)
        maps = Maps(program.pin_dir, limits)
        loaded.append((program, maps))
        Dataplane(maps).apply(SERVICES if services is None else services)
        return program, maps

    try:
        yield load
    finally:
        for program, maps in loaded:
            maps.close()
            program.close()
        purge_pins(SMALL)


def test_flood_guard_stops_inserting_above_the_rate(pkt_lab: PacketLab,
                                                    small_program: Callable[..., tuple[Program, Maps]]) -> None:
    program, maps = small_program(replace(LIMITS, new_flow_rate_limit=3))
    frames = [from_client(tcp(41100 + i)) for i in range(5)]

    def send() -> list[tuple[libbpf.RunResult, dict[Counter, int]]]:
        out = []
        for frame in frames:
            before = maps.counters()
            result = libbpf.prog_test_run(program.fd, raw(frame), ingress_ifindex=pkt_lab.ifindex[CLIENT_IF])
            out.append((result, counter_deltas(maps, before)))
        return out

    results = run_on_one_cpu(send)  # one CPU's window (the limit is per CPU per second)
    for frame, (result, deltas) in zip(frames[:3], results[:3]):
        assert (result.retval, result.data, deltas) == (XDP_REDIRECT, to_t1(frame), FWD)
    for frame, (result, deltas) in zip(frames[3:], results[3:]):
        assert (result.retval, result.data) == (XDP_REDIRECT, to_t1(frame))  # forwarded all the same
        assert deltas == {**FWD, Counter.FLOOD_NO_ENTRY: 1}
    assert flows_of(maps) == 3


def test_the_table_holds_its_size_in_flows_from_one_cpu(
        small_program: Callable[..., tuple[Program, Maps]]) -> None:
    """conntrack_size is flows, whichever CPUs they arrive on: one entry per
    flow, and no per-CPU share of the table (each CPU's LRU list would hold
    conntrack_size / possible CPUs). UDP datagrams: each makes its conntrack
    entry at once (a TCP SYN's is half-open)."""
    size = 512
    program, maps = small_program(replace(LIMITS, conntrack_size=size))
    frames = [raw(from_client(udp(20000 + i))) for i in range(size)]

    def send() -> None:
        for frame in frames:
            libbpf.prog_test_run(program.fd, frame)  # no ingress: the entry is made before the next hop

    run_on_one_cpu(send)
    assert flows_of(maps) == size


def test_explain_flow_agrees_with_the_program(pkt_lab: PacketLab) -> None:
    """`lb explain flow` (on the maps) predicts what the program then does, for
    a segment and for a SYN: with no entry, a live one, one whose target
    drains, a closed one; and whether the replies go back by an entry or by
    the ring alone (a half flow)."""
    svc, port = "10.0.0.119", 9540
    one = [extra(svc, port, ("10.0.1.11",))]
    moved = [extra(svc, port, ("10.0.1.12",), draining=("10.0.1.11",))]

    def explain(sport: int) -> dict[str, Any]:
        return explain_flow_in(pkt_lab.maps, "TCP", ep(CLIENT, sport), ep(svc, port))

    def goes_to(sport: int, flags: str) -> str:
        result = pkt_lab.run(raw(from_client(tcp(sport, dport=port, flags=flags), dst=svc)))
        return str(Ether(result.data)[IP].dst) + f":{port}"

    try:
        pkt_lab.dataplane.apply([*SERVICES, *one])
        info = explain(40060)
        assert (info["decision"], info["conntrack"], info["makes_entry"]) == ("ring", None, False)
        assert info["syn"]["decision"] == "ring" and info["reply"]["by"] == "ring" and info["reply"]["half_flow"]
        assert goes_to(40060, "A") == info["target"] == "10.0.1.11:9540"
        assert pkt_lab.maps.flow("TCP", ep(CLIENT, 40060), ep(svc, port)) is None

        goes_to(40061, "S")  # half-open
        for frame, ingress in handshake(40062, svc, port):
            pkt_lab.run(frame, ingress)
        goes_to(40062, "R")
        pkt_lab.dataplane.apply([*SERVICES, *moved])
        live = explain(40061)
        assert live["decision"] == "conntrack" and live["target"] == "10.0.1.11:9540"
        assert live["conntrack"]["tcp_state"] == "syn_sent" and not live["conntrack"]["syn_decides"]
        assert live["conntrack"]["half_open"] and live["conntrack"]["timeout_s"] == LIMITS.tcp_syn_timeout
        assert not live["makes_entry"]
        assert "out of service" in live["conntrack"]["why"]
        assert live["syn"]["decision"] == "ring" and live["syn"]["target"] == "10.0.1.12:9540"
        assert live["reply"] == {"target": "10.0.1.11:9540", "vips": [f"{svc}:{port}"], "by": "entry",
                                 "half_flow": False}
        closed = explain(40062)
        assert closed["conntrack"]["tcp_state"] == "closed" and closed["decision"] == "conntrack"
        assert not closed["conntrack"]["half_open"]
        assert closed["conntrack"]["timeout_s"] == LIMITS.tcp_closed_timeout
        assert goes_to(40061, "A") == live["target"]
        assert goes_to(40062, "A") == closed["target"]
        assert goes_to(40061, "S") == live["syn"]["target"]
        assert goes_to(40062, "S") == closed["syn"]["target"] == "10.0.1.12:9540"
        again = explain(40061)
        assert again["conntrack"]["syn_decides"] and again["syn"]["decision"] == "conntrack"
    finally:
        pkt_lab.dataplane.apply(SERVICES)


def test_a_reused_target_id_starts_from_zero_and_ends_no_flow_it_never_had(
        pkt_lab: PacketLab, small_program: Callable[..., tuple[Program, Maps]]) -> None:
    """Two target ids: the third endpoint takes the first one's id back with
    counters at zero (not the former endpoint's), so ending its flows, which
    it never had, walks no table; the first endpoint's flows did end."""
    program, maps = small_program(replace(LIMITS, max_targets=2), [])
    dataplane = Dataplane(maps)
    service = vip("10.0.0.120", 9550)

    def only(address: str) -> list[L4Service]:
        return [L4Service(service, members=((ep(address, 9550), 1),), end_flows_on_removal=True)]

    dataplane.apply(only("10.0.1.11"))
    first = dataplane.target_id(ep("10.0.1.11", 9550))
    assert first is not None
    frame = raw(from_client(tcp(41310, dport=9550), dst="10.0.0.120"))
    run_on_one_cpu(lambda: libbpf.prog_test_run(program.fd, frame, ingress_ifindex=pkt_lab.ifindex[CLIENT_IF]))
    assert maps.target_traffic(first).packets == 1 and flows_of(maps) == 1
    assert dataplane.apply(only("10.0.1.12")).flows_ended == 1
    assert dataplane.apply(only("10.0.1.13")).flows_ended == 0
    assert dataplane.target_id(ep("10.0.1.13", 9550)) == first
    assert maps.target_traffic(first) == Traffic()


def test_a_targets_next_hop_is_asked_again_after_next_hop_cache_ms(
        pkt_lab: PacketLab, small_program: Callable[..., tuple[Program, Maps]]) -> None:
    """The forward path keeps a target's next hop for next_hop_cache_ms: a
    neighbour that changed its MAC gets the packets after that, not before."""
    ttl = 3.0  # long enough for the steps between two packets even under emulation (make test-kernels)
    program, maps = small_program(replace(LIMITS, next_hop_cache_ms=int(ttl * 1000)))
    frames = [raw(from_client(tcp(41300))), raw(from_client(tcp(41300, flags="A")))]

    def dst_mac(frame: bytes) -> str:
        result = libbpf.prog_test_run(program.fd, frame, ingress_ifindex=pkt_lab.ifindex[CLIENT_IF])
        return str(Ether(result.data).dst)

    try:
        started = time.monotonic()  # the next hop is remembered between these two instants
        assert run_on_one_cpu(lambda: dst_mac(frames[0])) == MAC["t1"]
        remembered = time.monotonic()
        with nl.iproute(NETNS) as ipr:
            nl.add_neighbor(ipr, TARGET_IF, "10.0.1.11", "02:00:00:00:01:99")
        assert run_on_one_cpu(lambda: dst_mac(frames[1])) == MAC["t1"]  # remembered
        assert time.monotonic() - started < ttl, "too slow a host for this test's TTL"
        time.sleep(max(0.0, remembered + ttl + 0.1 - time.monotonic()))
        assert run_on_one_cpu(lambda: dst_mac(frames[1])) == "02:00:00:00:01:99"  # asked again
    finally:
        with nl.iproute(NETNS) as ipr:
            nl.add_neighbor(ipr, TARGET_IF, "10.0.1.11", MAC["t1"])


def test_a_bigger_packet_than_any_let_through_is_asked_for_again(
        pkt_lab: PacketLab, small_program: Callable[..., tuple[Program, Maps]]) -> None:
    """The next hop is kept with the largest packet the lookup let through:
    a bigger one is looked up again, so the egress MTU still holds."""
    program, maps = small_program(LIMITS)
    small = raw(from_client(tcp(41301)))
    big = from_client(tcp(41301, flags="PA", payload=b"x" * 900))

    def send(frame: bytes) -> libbpf.RunResult:
        return libbpf.prog_test_run(program.fd, frame, ingress_ifindex=pkt_lab.ifindex[CLIENT_IF])

    with nl.iproute(NETNS) as ipr:
        ipr.link("set", index=nl.ifindex(ipr, TARGET_IF), mtu=576)
    try:
        assert run_on_one_cpu(lambda: send(small)).retval == XDP_REDIRECT
        before = maps.counters()
        result = run_on_one_cpu(lambda: send(raw(big)))
        assert (result.retval, result.data) == (XDP_PASS, rewritten(big, out_src_mac=None, out_dst_mac=None,
                                                                    dst="10.0.1.11", ttl_dec=False))
        assert counter_deltas(maps, before) == {
            Counter.CONNTRACK_HIT: 1, Counter.PASS_FIB: 1, Counter.FIB_FRAG_NEEDED: 1,  # the kernel fragments or says so
            Counter.HANDSHAKE_MISMATCH: 1}  # the flow is half-open: this program saw no SYN-ACK
    finally:
        with nl.iproute(NETNS) as ipr:
            ipr.link("set", index=nl.ifindex(ipr, TARGET_IF), mtu=1500)


def test_a_reused_target_id_forgets_its_former_next_hop(
        pkt_lab: PacketLab, small_program: Callable[..., tuple[Program, Maps]]) -> None:
    """Two target ids: the third endpoint takes the first one's id back, and
    its packets go to its own MAC at once, not the one remembered for the id."""
    program, maps = small_program(replace(LIMITS, max_targets=2), [])
    dataplane = Dataplane(maps)
    service = vip("10.0.0.120", 9550)

    def to(address: str, sport: int) -> tuple[str, str]:
        frame = raw(from_client(tcp(sport, dport=9550), dst="10.0.0.120"))
        out = Ether(run_on_one_cpu(lambda: libbpf.prog_test_run(
            program.fd, frame, ingress_ifindex=pkt_lab.ifindex[CLIENT_IF])).data)
        return str(out[IP].dst), str(out.dst)

    def only(address: str) -> list[L4Service]:
        return [L4Service(service, members=((ep(address, 9550), 1),), end_flows_on_removal=True)]

    dataplane.apply(only("10.0.1.11"))
    first = dataplane.target_id(ep("10.0.1.11", 9550))
    assert to("10.0.1.11", 41310) == ("10.0.1.11", MAC["t1"])
    dataplane.apply(only("10.0.1.12"))
    dataplane.apply(only("10.0.1.13"))
    assert dataplane.target_id(ep("10.0.1.13", 9550)) == first
    assert to("10.0.1.13", 41311) == ("10.0.1.13", MAC["t3"])


def test_a_spoofed_flood_of_acks_rsts_and_fins_leaves_the_table_as_it_was(pkt_lab: PacketLab) -> None:
    """3000 segments of no flow, from 3000 ports: all forwarded by the ring,
    none makes an entry, and a live flow keeps its own."""
    for frame, ingress in handshake(40070):
        pkt_lab.run(frame, ingress)
    flows = {(f.client, f.vip) for f in pkt_lab.maps.flows()}
    frames = [raw(from_client(tcp(10000 + i, flags=("A", "R", "FA")[i % 3]))) for i in range(3000)]
    before = pkt_lab.maps.counters()

    def flood() -> None:
        for frame in frames:
            libbpf.prog_test_run(pkt_lab.program.fd, frame, ingress_ifindex=pkt_lab.ifindex[CLIENT_IF])

    nl.run_in_netns(NETNS, flood)
    assert counter_deltas(pkt_lab.maps, before) == {Counter.CONNTRACK_MISS: 3000, Counter.MISS_NO_ENTRY: 3000,
                                               Counter.REDIRECTED: 3000}
    assert {(f.client, f.vip) for f in pkt_lab.maps.flows()} == flows
    flow = pkt_lab.maps.flow("TCP", ep(CLIENT, 40070), ep(VIP, 9000))
    assert flow is not None and flow.tcp_state == "established"


def test_a_syn_flood_fills_half_open_and_never_evicts_an_established_flow(
        pkt_lab: PacketLab, small_program: Callable[..., tuple[Program, Maps]]) -> None:
    """Spoofed SYNs, 8 times the size of both tables, each followed by an ACK
    of the same 5-tuple (a spoofer cannot see the SYN-ACK, so none
    acknowledges it): the SYNs turn half_open over, no ACK moves a flow to
    conntrack, and the established flow keeps its entry."""
    size = 64
    program, maps = small_program(replace(LIMITS, conntrack_size=size, half_open_size=size,
                                            new_flow_rate_limit=0))  # 0: no flood guard

    def send(frames: list[tuple[bytes, str]]) -> None:
        for frame, ingress in frames:
            libbpf.prog_test_run(program.fd, frame, ingress_ifindex=pkt_lab.ifindex[ingress])

    run_on_one_cpu(lambda: send(handshake(40080)))
    established = {(f.client, f.vip) for f in maps.flows()}
    assert established == {(ep(CLIENT, 40080), vip(VIP, 9000))}
    flood = []
    for i in range(8 * size):
        flood += [(raw(from_client(tcp(10000 + i))), CLIENT_IF), (raw(from_client(tcp(10000 + i, flags="A"))), CLIENT_IF)]
    before = maps.counters()
    run_on_one_cpu(lambda: send(flood))
    assert counter_deltas(maps, before) == {
        Counter.CONNTRACK_MISS: 8 * size, Counter.CONNTRACK_HIT: 8 * size, Counter.HANDSHAKE_MISMATCH: 8 * size,
        Counter.REDIRECTED: 16 * size}
    assert {(f.client, f.vip) for f in maps.flows()} == established
    assert 0 < sum(1 for _ in maps.half_open_flows()) <= size
    flow = maps.flow("TCP", ep(CLIENT, 40080), ep(VIP, 9000))
    assert flow is not None and flow.tcp_state == "established" and not flow.half_open


def test_table_stats_count_what_goes_in_and_out_and_give_evictions_without_a_walk(
        pkt_lab: PacketLab, small_program: Callable[..., tuple[Program, Maps]]) -> None:
    """table_stats: exact inserts and removals, from the program (a SYN, the
    handshake moving a flow to conntrack, a RST) and from lb (termination);
    past the capacity, the estimated entries and evictions agree with a walk
    of the table within the LRU's free-list slack."""
    size = 256
    program, maps = small_program(replace(LIMITS, conntrack_size=size, half_open_size=size, new_flow_rate_limit=0))

    def send(frames: list[tuple[bytes, str]]) -> None:
        for frame, ingress in frames:
            libbpf.prog_test_run(program.fd, frame, ingress_ifindex=pkt_lab.ifindex[ingress])

    def usage() -> dict[str, tuple[int, int, int, int, int]]:
        return {u.table: (u.capacity, u.inserts, u.removed, u.entries, u.evictions) for u in maps.table_usage()}

    v6 = {"conntrack6": (size, 0, 0, 0, 0), "half_open6": (size, 0, 0, 0, 0)}  # no IPv6 flows here
    assert usage() == {"conntrack": (size, 0, 0, 0, 0), "half_open": (size, 0, 0, 0, 0), **v6}
    run_on_one_cpu(lambda: send([*handshake(41400), (raw(from_client(tcp(41401))), CLIENT_IF),
                                 (raw(from_client(tcp(41401, flags="R"))), CLIENT_IF)]))
    assert usage() == {"conntrack": (size, 1, 0, 1, 0), "half_open": (size, 2, 2, 0, 0), **v6}

    slack = 128 * (libbpf.possible_cpus() + 1)  # free entries the LRU keeps per CPU, and globally

    def conntrack() -> TableUsage:
        usage = next(u for u in maps.table_usage() if u.table == "conntrack")
        held = sum(1 for _ in maps.flows())
        assert 0 <= usage.entries - held <= slack  # the model evicts at full, the kernel a little before
        assert 0 <= (usage.inserts - usage.removed - held) - usage.evictions <= slack
        return usage

    datagrams = [(raw(from_client(udp(10000 + i))), CLIENT_IF) for i in range(4 * size)]
    run_on_one_cpu(lambda: send(datagrams))
    after = conntrack()
    assert (after.inserts, after.removed, after.entries, after.evictions) == (1 + 4 * size, 0, size, 1 + 3 * size)

    udp_target = Dataplane(maps).target_id(ep("10.0.1.12", 9000))
    assert udp_target is not None
    udp_flows = sum(1 for f in maps.flows() if f.vip.protocol == "UDP")  # the TCP flow may have been evicted
    ended = maps.delete_flows({udp_target})
    assert ended == udp_flows > 0
    after = conntrack()  # still within the slack of a walk, though lb deleted entries of a full table
    assert (after.inserts, after.removed, after.entries) == (1 + 4 * size, ended, size - ended)
    run_on_one_cpu(lambda: send(datagrams[:size]))  # the table fills again: evictions resume only when full
    after = conntrack()
    assert after.entries == size and after.evictions == 1 + 3 * size + (size - ended)  # the room lb made, then full


def test_each_fib_lookup_failure_is_counted_by_its_cause(pkt_lab: PacketLab) -> None:
    """pass_fib says a rewritten packet went to the kernel; fib_* say why:
    forwarding off on the receiving interface, a blackhole route, no route.
    (No neighbour and the MTU have their cases above.) Each target is new,
    so no next hop was remembered for it."""
    svc, port = "10.0.0.121", 9560
    cases = [("10.0.1.13", Counter.FIB_FWD_DISABLED), ("10.0.3.5", Counter.FIB_BLACKHOLE),
             ("10.0.9.5", Counter.FIB_NO_ROUTE)]
    with nl.iproute(NETNS) as ipr:
        ipr.route("add", dst="10.0.3.0/24", type="blackhole")
    try:
        for n, (target, cause) in enumerate(cases):
            pkt_lab.dataplane.apply([*SERVICES, extra(svc, port + n, (target,))])
            syn = from_client(tcp(41500 + n, dport=port + n), dst=svc)
            if cause is Counter.FIB_FWD_DISABLED:
                nl.set_sysctl(NETNS, "net.ipv4.conf.fxa.forwarding", "0")
            try:
                before = pkt_lab.maps.counters()
                result = pkt_lab.run(raw(syn))
            finally:
                nl.set_sysctl(NETNS, "net.ipv4.conf.fxa.forwarding", "1")
            assert (result.retval, result.data) == (
                XDP_PASS, rewritten(syn, out_src_mac=None, out_dst_mac=None, dst=target, ttl_dec=False)), cause
            assert counter_deltas(pkt_lab.maps, before) == {Counter.CONNTRACK_MISS: 1, Counter.PASS_FIB: 1, cause: 1}
            pkt_lab.dataplane.apply([*SERVICES, L4Service(vip(svc, port + n), end_flows_on_removal=True)])
    finally:
        pkt_lab.dataplane.apply(SERVICES)
        with nl.iproute(NETNS) as ipr:
            ipr.route("del", dst="10.0.3.0/24", type="blackhole")


def test_lb_conntrack_lists_half_open_flows_with_their_state(pkt_lab: PacketLab) -> None:
    """`lb conntrack` (inspect.conntrack, on the packet lab's pins): a flow
    with only its SYN is syn_sent, with the SYN-ACK syn_recv, both half-open;
    the handshake's ACK moves it to established."""
    from lb.inspect.kernel import conntrack  # here: the module reads pins, the fixture's by the config's name
    from lb.model import LoadBalancer

    config = LoadBalancer(name=pkt_lab.program.name, ring_size=LIMITS.ring_size, max_vips=LIMITS.max_vips,
                          max_targets=LIMITS.max_targets, conntrack_size=LIMITS.conntrack_size)
    frames = handshake(41600)

    def row() -> tuple[str, bool, str] | None:
        rows = [f for f in conntrack(config, vip=f"{VIP}:9000")["flows"] if f["client_port"] == 41600]
        return (rows[0]["tcp_state"], rows[0]["half_open"], rows[0]["target"]) if rows else None

    assert row() is None
    for (frame, ingress), state in zip(frames, ("syn_sent", "syn_recv", "established")):
        pkt_lab.run(frame, ingress)
        assert row() == (state, state != "established", "10.0.1.11:9000")

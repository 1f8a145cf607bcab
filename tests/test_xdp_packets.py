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
from typing import Any

import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet, Raw

from lb.dataplane.dataplane import L4Service
from lb.dataplane.maps import Endpoint, VipAddr
from lb.dataplane.structs import Counter
from tests.xdp_fixture import CLIENT_IF, MAC, TARGET_IF, PacketLab, packet_lab

pytestmark = pytest.mark.root

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
ACTION_NAMES = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}

CLIENT = "10.0.0.2"
VIP = "10.0.0.100"


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


def tcp(sport: int, dport: int = 9000, flags: str = "S", payload: bytes = b"") -> Packet:
    segment = TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=0 if flags == "S" else 5000, window=64240)
    return segment / Raw(payload) if payload else segment


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


FWD = {Counter.CONNTRACK_MISS: 1, Counter.REDIRECTED: 1}
HIT = {Counter.CONNTRACK_HIT: 1, Counter.REDIRECTED: 1}
REV = {Counter.REVERSE_NAT: 1, Counter.REDIRECTED: 1}
PASS_NOT_VIP = {Counter.PASS_NOT_VIP: 1}
PARSE_ERROR = {Counter.PASS_PARSE_ERROR: 1}


def to_t1(pkt: Packet, **kw: Any) -> bytes:
    return rewritten(pkt, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t1"], dst="10.0.1.11", **kw)


def back_to_client(pkt: Packet, **kw: Any) -> bytes:
    return rewritten(pkt, out_src_mac=MAC["fxa"], out_dst_mac=MAC["client"], src=VIP, **kw)


def cases() -> Iterator[Case]:
    syn = from_client(tcp(40001))
    yield Case("tcp SYN to VIP: new flow, DNAT, redirect to the target side", raw(syn), XDP_REDIRECT,
               to_t1(syn), FWD, new_flow=True)

    first, ack = from_client(tcp(40002)), from_client(tcp(40002, flags="A"))
    yield Case("tcp established flow: conntrack hit, same target", raw(ack), XDP_REDIRECT, to_t1(ack), HIT,
               before=[(raw(first), CLIENT_IF)], new_flow=False)

    data = from_client(tcp(40003, flags="PA", payload=b"GET / HTTP/1.1\r\n\r\n" * 20))
    yield Case("tcp segment with payload: payload intact, checksum updated", raw(data), XDP_REDIRECT,
               to_t1(data), FWD, new_flow=True)

    synack = from_target("10.0.1.11", MAC["t1"], tcp(9000, 40004, flags="SA"))
    yield Case("reply from target: source back to VIP:port, redirect to the client side", raw(synack),
               XDP_REDIRECT, back_to_client(synack), REV, ingress=TARGET_IF,
               before=[(raw(from_client(tcp(40004))), CLIENT_IF)])

    stray = from_target("10.0.1.11", MAC["t1"], tcp(9000, 40999, flags="SA"))
    yield Case("packet from a target for no known flow: pass untouched", raw(stray), XDP_PASS, None,
               PASS_NOT_VIP, ingress=TARGET_IF)

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
    v6 = Ether(src=MAC["client"], dst=MAC["fxa"]) / IPv6(src="fd00::2", dst="fd00::100") / TCP(sport=1, dport=9000)
    yield Case("IPv6: pass", raw(v6), XDP_PASS, None, {Counter.PASS_NOT_IPV4: 1})
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
               {Counter.CONNTRACK_MISS: 1, Counter.PASS_FIB: 1}, new_flow=True)

    bad = from_client(tcp(40020), chksum=0x1234)
    yield Case("bad IPv4 header checksum: drop", raw(bad), XDP_DROP, None, {Counter.DROP_BAD_IP_CSUM: 1})
    bad_reply = from_target("10.0.1.11", MAC["t1"], tcp(9000, 40004, flags="A"), chksum=0x1234)
    yield Case("bad IPv4 header checksum on a reply: drop", raw(bad_reply), XDP_DROP, None,
               {Counter.DROP_BAD_IP_CSUM: 1}, ingress=TARGET_IF, before=[(raw(from_client(tcp(40004))), CLIENT_IF)])


CASES = list(cases())


@pytest.fixture(scope="module")
def pkt_lab() -> Iterator[PacketLab]:
    with packet_lab() as the_lab:
        the_lab.dataplane.apply(SERVICES)
        yield the_lab


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_packet(pkt_lab: PacketLab, case: Case) -> None:
    for frame, ingress in case.before:
        pkt_lab.run(frame, ingress)
    before = pkt_lab.maps.counters()
    vip_before = {v.vip: pkt_lab.maps.vip_traffic(v.vip_id) for v in pkt_lab.maps.vips()}

    result = pkt_lab.run(case.frame, case.ingress)

    assert ACTION_NAMES[result.retval] == ACTION_NAMES[case.action]
    expected = case.frame if case.expect is None else case.expect
    if result.data != expected:  # show the difference as packets, not bytes
        assert Ether(result.data).show(dump=True) == Ether(expected).show(dump=True)
    assert result.data == expected
    after = pkt_lab.maps.counters()
    deltas = {reason: after[reason] - before[reason] for reason in Counter if after[reason] != before[reason]}
    assert deltas == case.counters
    if case.new_flow is not None:
        changed = [(v, pkt_lab.maps.vip_traffic(v_id)) for v, v_id in
                   ((e.vip, e.vip_id) for e in pkt_lab.maps.vips())]
        moved = [(v, t) for v, t in changed if t.packets != vip_before[v].packets]
        assert len(moved) == 1
        assert moved[0][1].new_flows - vip_before[moved[0][0]].new_flows == (1 if case.new_flow else 0)


def test_flow_to_a_retired_target_is_rehashed(pkt_lab: PacketLab) -> None:
    """A flow whose target was removed (inactive) gets a new one from the ring."""
    service = vip("10.0.0.104", 9000)
    t1, t2 = ep("10.0.1.11", 9100), ep("10.0.1.12", 9100)
    pkt_lab.dataplane.apply([*SERVICES, L4Service(service, members=((t1, 1),))])
    syn = raw(from_client(tcp(41000), dst="10.0.0.104"))
    assert Ether(pkt_lab.run(syn).data)[IP].dst == "10.0.1.11"
    pkt_lab.dataplane.apply([*SERVICES, L4Service(service, members=((t2, 1),))])
    ack = raw(from_client(tcp(41000, flags="A"), dst="10.0.0.104"))
    before = pkt_lab.maps.counters()
    assert Ether(pkt_lab.run(ack).data)[IP].dst == "10.0.1.12"
    assert pkt_lab.maps.counters()[Counter.CONNTRACK_MISS] == before[Counter.CONNTRACK_MISS] + 1
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
    after = pkt_lab.maps.counters()
    assert {r: after[r] - before[r] for r in Counter if after[r] != before[r]} == {Counter.PASS_NOT_VIP: 2}


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

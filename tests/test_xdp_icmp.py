"""ICMP errors of tracked flows, and "fragmentation needed" made by the XDP
program, on packet fixtures (BPF_PROG_TEST_RUN).

An error quoting a packet lb rewrote is rewritten back (quote, quoted
checksums, outer addresses; the ICMP checksum follows) and sent to the
party that sent the original: the client for errors about packets toward
a target, the target for errors about replies lb sent from a VIP. A packet
with DF too big for the path to its target is answered with
"fragmentation needed" quoting it as the client sent it, so the client's
stack finds the connection and lowers its path MTU. Expected frames are
built by scapy with every checksum computed from scratch.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lb import netlink as nl
from lb.dataplane.dataplane import L4Service
from lb.dataplane.structs import Counter
from tests.test_xdp_fullnat import FN_VIP, FULLNAT, LB_ADDR, from_fn, port_for
from tests.test_xdp_packets import (
    CLIENT,
    SERVICES,
    VIP,
    ep,
    from_client,
    from_target,
    handshake,
    tcp,
    udp,
    vip,
)
from tests.xdp_fixture import (
    CLIENT_IF,
    MAC,
    NETNS,
    TARGET_IF,
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

SMALL_MTU_TARGET = "10.0.1.15"  # a host route with MTU 1280 leads there
SMALL_MTU_VIP = "10.0.0.140"
SMALL_MTU_MAC = "02:00:00:00:01:15"
SMALL = [L4Service(vip(SMALL_MTU_VIP, 9000), members=((ep(SMALL_MTU_TARGET, 9000), 1),))]
ROUTER = "10.0.0.50"  # on the client's side ("near" in the fixture)
TARGET_SIDE_ROUTER = "10.0.1.99"


def quote(pkt: Packet, length: int = 28) -> bytes:
    """What an ICMP error quotes of `pkt` (from its IP header)."""
    return raw(pkt[IP])[:length]


def small_handshake(sport: int) -> list[tuple[bytes, str]]:
    """SYN, SYN-ACK, ACK of a flow to SMALL_MTU_VIP: established in conntrack."""
    synack = from_target(SMALL_MTU_TARGET, SMALL_MTU_MAC, tcp(9000, sport, flags="SA"))
    return [(raw(from_client(tcp(sport), dst=SMALL_MTU_VIP)), CLIENT_IF), (raw(synack), TARGET_IF),
            (raw(from_client(tcp(sport, flags="A"), dst=SMALL_MTU_VIP)), CLIENT_IF)]


def icmp(src: str, dst: str, src_mac: str, dst_mac: str, type_: int, code: int, quoted: bytes,
         mtu: int = 0, ttl: int = 64) -> Packet:
    return (Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=dst, ttl=ttl, id=11) /
            ICMP(type=type_, code=code, nexthopmtu=mtu) / Raw(quoted))


TO_CLIENT = {Counter.ICMP_TO_CLIENT: 1, Counter.REDIRECTED: 1}
TO_TARGET = {Counter.ICMP_TO_TARGET: 1, Counter.REDIRECTED: 1}


def cases() -> Iterator[Case]:
    # --- too big for the path to the target ---------------------------------------------
    big = from_client(tcp(51001, flags="PA", payload=b"z" * 1400), dst=SMALL_MTU_VIP, flags="DF")
    reply = (Ether(src=MAC["fxa"], dst=MAC["client"]) /
             IP(src=SMALL_MTU_VIP, dst=CLIENT, tos=0xC0, ttl=64, id=0, flags=0) /
             ICMP(type=3, code=4, nexthopmtu=1280) / Raw(quote(big)))
    yield Case("a segment with DF too big for the target's path: fragmentation needed back to the client",
               raw(big), XDP_TX, raw(reply), {Counter.CONNTRACK_HIT: 1, Counter.ICMP_TOO_BIG: 1, Counter.TX: 1},
               before=small_handshake(51001))
    may_split = from_client(tcp(51002, flags="PA", payload=b"z" * 1400), dst=SMALL_MTU_VIP)
    yield Case("too big without DF: rewritten and passed (the kernel fragments it)", raw(may_split), XDP_PASS,
               None, {Counter.CONNTRACK_HIT: 1, Counter.PASS_FIB: 1, Counter.FIB_FRAG_NEEDED: 1},
               before=small_handshake(51002))
    fits = from_client(tcp(51003, flags="PA", payload=b"z" * 1200), dst=SMALL_MTU_VIP, flags="DF")
    yield Case("a segment that fits the path: forwarded", raw(fits), XDP_REDIRECT, None,
               {Counter.CONNTRACK_HIT: 1, Counter.REDIRECTED: 1},
               before=small_handshake(51003))

    # --- NAT: from the target toward the client ----------------------------------------------
    dgram = from_client(udp(51010))  # to VIP:9000/UDP, whose target is 10.0.1.12:9000
    seen = IP(src=CLIENT, dst="10.0.1.12", ttl=63, id=7) / UDP(sport=51010, dport=9000) / Raw(b"ping")
    unreachable = icmp("10.0.1.12", CLIENT, MAC["t2"], MAC["fxb"], 3, 3, raw(seen))
    sent = IP(src=CLIENT, dst=VIP, ttl=63, id=7) / UDP(sport=51010, dport=9000) / Raw(b"ping")
    yield Case("port unreachable from a UDP target: quote back to client -> VIP, from the VIP",
               raw(unreachable), XDP_REDIRECT,
               raw(icmp(VIP, CLIENT, MAC["fxa"], MAC["client"], 3, 3, raw(sent), ttl=63)), TO_CLIENT,
               ingress=TARGET_IF, before=[(raw(dgram), CLIENT_IF)])

    segment = IP(src=CLIENT, dst="10.0.1.11", ttl=63, id=7) / TCP(sport=51011, dport=9000, flags="S", seq=1000)
    expired = icmp(TARGET_SIDE_ROUTER, CLIENT, MAC["t1"], MAC["fxb"], 11, 0, quote(segment))
    original = IP(src=CLIENT, dst=VIP, ttl=63, id=7) / TCP(sport=51011, dport=9000, flags="S", seq=1000)
    yield Case("time exceeded from a router beyond lb: quote back to the VIP, the router stays the source",
               raw(expired), XDP_REDIRECT,
               raw(icmp(TARGET_SIDE_ROUTER, CLIENT, MAC["fxa"], MAC["client"], 11, 0, quote(original), ttl=63)),
               TO_CLIENT, ingress=TARGET_IF, before=handshake(51011))

    syn_seen = IP(src=CLIENT, dst="10.0.1.11", ttl=63, id=7) / TCP(sport=51013, dport=9000, flags="S", seq=1000)
    filtered = icmp(TARGET_SIDE_ROUTER, CLIENT, MAC["t1"], MAC["fxb"], 3, 13, quote(syn_seen))
    syn_sent = IP(src=CLIENT, dst=VIP, ttl=63, id=7) / TCP(sport=51013, dport=9000, flags="S", seq=1000)
    yield Case("an error about a SYN (the flow half-open): quote back to the VIP",
               raw(filtered), XDP_REDIRECT,
               raw(icmp(TARGET_SIDE_ROUTER, CLIENT, MAC["fxa"], MAC["client"], 3, 13, quote(syn_sent), ttl=63)),
               TO_CLIENT, ingress=TARGET_IF, before=[(raw(from_client(tcp(51013))), CLIENT_IF)])

    # --- NAT: from the path toward the target -------------------------------------------------
    answer = IP(src=VIP, dst=CLIENT, ttl=63, id=9) / TCP(sport=9000, dport=51012, flags="PA") / Raw(b"x" * 1300)
    too_big = icmp(ROUTER, VIP, MAC["near"], MAC["fxa"], 3, 4, quote(answer), mtu=1200)
    as_sent = IP(src="10.0.1.11", dst=CLIENT, ttl=63, id=9) / TCP(sport=9000, dport=51012, flags="PA") / \
        Raw(b"x" * 1300)
    yield Case("fragmentation needed about a reply from the VIP: to the target, quoting what it sent",
               raw(too_big), XDP_REDIRECT,
               raw(icmp(ROUTER, "10.0.1.11", MAC["fxb"], MAC["t1"], 3, 4, quote(as_sent), mtu=1200, ttl=63)),
               TO_TARGET, before=handshake(51012))

    # --- full NAT, both ways -----------------------------------------------------------------
    lb_port = port_for(51020)
    at_target = IP(src=LB_ADDR, dst="10.0.1.11", ttl=63, id=7) / TCP(sport=lb_port, dport=9100, flags="S", seq=1)
    refused = icmp("10.0.1.11", LB_ADDR, MAC["t1"], MAC["fxb"], 3, 1, quote(at_target))
    at_client = IP(src=CLIENT, dst=FN_VIP, ttl=63, id=7) / TCP(sport=51020, dport=9100, flags="S", seq=1)
    yield Case("full NAT: an error from the target to lb's address goes to the client, quote client -> VIP",
               raw(refused), XDP_REDIRECT,
               raw(icmp(FN_VIP, CLIENT, MAC["fxa"], MAC["client"], 3, 1, quote(at_client), ttl=63)), TO_CLIENT,
               ingress=TARGET_IF, before=[(raw(from_fn(tcp(51020, 9100))), CLIENT_IF)])

    lb_port = port_for(51021, proto="UDP")
    from_vip = IP(src=FN_VIP, dst=CLIENT, ttl=63, id=9) / UDP(sport=9100, dport=51021) / Raw(b"pong" * 300)
    path = icmp(ROUTER, FN_VIP, MAC["near"], MAC["fxa"], 3, 4, raw(from_vip), mtu=1000)
    from_target = IP(src="10.0.1.12", dst=LB_ADDR, ttl=63, id=9) / UDP(sport=9100, dport=lb_port) / \
        Raw(b"pong" * 300)
    yield Case("full NAT: an error about a reply goes to the target from lb's address, quote target -> lb",
               raw(path), XDP_REDIRECT,
               raw(icmp(LB_ADDR, "10.0.1.12", MAC["fxb"], MAC["t2"], 3, 4, raw(from_target), mtu=1000, ttl=63)),
               TO_TARGET, before=[(raw(from_fn(udp(51021, 9100))), CLIENT_IF)])

    # --- not ours --------------------------------------------------------------------------
    stranger = IP(src=CLIENT, dst="10.0.1.11", ttl=63) / TCP(sport=51030, dport=9000)
    lost = icmp("10.0.1.11", CLIENT, MAC["t1"], MAC["fxb"], 3, 3, quote(stranger))
    yield Case("an error about no tracked flow: passed untouched", raw(lost), XDP_PASS, None,
               {Counter.PASS_NOT_VIP: 1}, ingress=TARGET_IF)
    ping = Ether(src=MAC["client"], dst=MAC["fxa"]) / IP(src=CLIENT, dst=VIP) / ICMP(type=8) / Raw(b"hi")
    yield Case("an echo request to the VIP: passed untouched", raw(ping), XDP_PASS, None, {Counter.PASS_NOT_VIP: 1})
    short = icmp("10.0.1.11", CLIENT, MAC["t1"], MAC["fxb"], 3, 3, quote(stranger, 24))
    yield Case("an error quoting fewer than 8 bytes of ports: passed untouched", raw(short), XDP_PASS, None,
               {Counter.PASS_NOT_VIP: 1}, ingress=TARGET_IF)


CASES = list(cases())


@pytest.fixture(scope="module")
def pkt_lab() -> Iterator[PacketLab]:
    with packet_lab() as the_lab:
        with nl.iproute(NETNS) as ipr:
            oif = nl.ifindex(ipr, TARGET_IF)
            ipr.route("add", dst=f"{SMALL_MTU_TARGET}/32", oif=oif, metrics={"mtu": 1280, "lock": 1 << 2})  # locked (RTAX_MTU): forwarding uses it
            nl.add_neighbor(ipr, TARGET_IF, SMALL_MTU_TARGET, SMALL_MTU_MAC)
        the_lab.dataplane.apply([*SERVICES, *FULLNAT, *SMALL])
        yield the_lab


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_packet(pkt_lab: PacketLab, case: Case) -> None:
    result = run_case(pkt_lab, case)
    if case.expect is None:  # here: not checked, but a frame passed without a FIB answer is untouched
        if case.action == XDP_PASS and Counter.PASS_FIB not in case.counters:
            assert result.data == case.frame
        return
    assert_frame(result.data, case.expect)

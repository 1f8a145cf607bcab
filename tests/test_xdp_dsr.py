"""DSR in the XDP program, on packet fixtures (BPF_PROG_TEST_RUN).

A DSR VIP's packets keep their addresses and ports: only the MACs change
(to the target's, from the egress interface's) and the TTL goes down by
one, as a router's would. The target holds the VIP and answers the client
directly, so no reply crosses lb.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scapy.compat import raw

from lb.dataplane.dataplane import DataplaneError, L4Service
from lb.dataplane.structs import Counter
from tests.test_xdp_packets import (
    CLIENT,
    SERVICES,
    ep,
    from_client,
    rewritten,
    tcp,
    udp,
    vip,
)
from tests.xdp_fixture import (
    CLIENT_IF,
    MAC,
    XDP_DROP,
    XDP_REDIRECT,
    XDP_TX,
    Case,
    PacketLab,
    assert_frame,
    packet_lab,
    run_case,
)

pytestmark = pytest.mark.root

DSR = [
    L4Service(vip("10.0.0.130", 9000), members=((ep("10.0.1.11", 9000), 1),), mode="dsr"),
    L4Service(vip("10.0.0.130", 9000, "UDP"), members=((ep("10.0.1.12", 9000), 1),), mode="dsr"),
    L4Service(vip("10.0.0.131", 9000), members=((ep("10.0.0.50", 9000), 1),), mode="dsr"),  # the client's side
    L4Service(vip("10.0.0.132", 9000), members=((ep("10.0.1.14", 9000), 1),), mode="dsr"),  # no neighbour
]


def cases() -> Iterator[Case]:
    syn = from_client(tcp(49001), dst="10.0.0.130")
    yield Case("tcp SYN: only the MACs (and the TTL) change, out of the target side", raw(syn), XDP_REDIRECT,
               rewritten(syn, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t1"]),
               {Counter.CONNTRACK_MISS: 1, Counter.DSR: 1, Counter.REDIRECTED: 1})

    first_ack = from_client(tcp(49007, flags="A"), dst="10.0.0.130")
    yield Case("the client's ACK after its SYN establishes the flow (the target's SYN-ACK never crosses lb)",
               raw(first_ack), XDP_REDIRECT, rewritten(first_ack, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t1"]),
               {Counter.CONNTRACK_HIT: 1, Counter.FLOW_ESTABLISHED: 1, Counter.DSR: 1, Counter.REDIRECTED: 1},
               before=[(raw(from_client(tcp(49007), dst="10.0.0.130")), CLIENT_IF)])

    ack = from_client(tcp(49002, flags="A", payload=b"y" * 200), dst="10.0.0.130")
    yield Case("tcp established: the entry decides, MACs only", raw(ack), XDP_REDIRECT,
               rewritten(ack, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t1"]),
               {Counter.CONNTRACK_HIT: 1, Counter.DSR: 1, Counter.REDIRECTED: 1},
               before=[(raw(from_client(tcp(49002), dst="10.0.0.130")), CLIENT_IF),
                       (raw(from_client(tcp(49002, flags="A"), dst="10.0.0.130")), CLIENT_IF)])

    stray = from_client(tcp(49003, flags="A"), dst="10.0.0.130")
    yield Case("tcp segment of no entry: by the ring, no entry made, MACs only", raw(stray), XDP_REDIRECT,
               rewritten(stray, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t1"]),
               {Counter.CONNTRACK_MISS: 1, Counter.MISS_NO_ENTRY: 1, Counter.DSR: 1, Counter.REDIRECTED: 1})

    dgram = from_client(udp(49004), dst="10.0.0.130")
    yield Case("udp: MACs only, the checksum untouched", raw(dgram), XDP_REDIRECT,
               rewritten(dgram, out_src_mac=MAC["fxb"], out_dst_mac=MAC["t2"]),
               {Counter.CONNTRACK_MISS: 1, Counter.DSR: 1, Counter.REDIRECTED: 1})

    near = from_client(tcp(49005), dst="10.0.0.131")
    yield Case("a target on the receiving segment: back out of it (XDP_TX)", raw(near), XDP_TX,
               rewritten(near, out_src_mac=MAC["fxa"], out_dst_mac=MAC["near"]),
               {Counter.CONNTRACK_MISS: 1, Counter.DSR: 1, Counter.TX: 1})

    lonely = from_client(tcp(49006), dst="10.0.0.132")
    yield Case("a target with no neighbour entry: dropped, not passed (the kernel would deliver it to lb)",
               raw(lonely), XDP_DROP, raw(lonely), {Counter.CONNTRACK_MISS: 1, Counter.DSR: 1,
                                                     Counter.DROP_NO_NEIGH: 1})


CASES = list(cases())


@pytest.fixture(scope="module")
def pkt_lab() -> Iterator[PacketLab]:
    with packet_lab() as the_lab:
        the_lab.dataplane.apply([*SERVICES, *DSR])
        yield the_lab


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_packet(pkt_lab: PacketLab, case: Case) -> None:
    result = run_case(pkt_lab, case)
    assert_frame(result.data, case.frame if case.expect is None else case.expect)


def test_a_dsr_flow_is_tracked_with_its_mode(pkt_lab: PacketLab) -> None:
    pkt_lab.run(raw(from_client(tcp(49100), dst="10.0.0.130")))
    flow = pkt_lab.maps.flow("TCP", ep(CLIENT, 49100), ep("10.0.0.130", 9000))
    assert flow is not None and flow.mode == "dsr" and flow.source is None
    assert {str(e.vip): e.mode for e in pkt_lab.maps.vips()}["TCP 10.0.0.130:9000"] == "dsr"


def test_dsr_vips_need_no_reply_route(pkt_lab: PacketLab) -> None:
    route = pkt_lab.maps.route(ep("10.0.1.12", 9000), "UDP")  # behind a NAT VIP and a DSR one
    assert route is not None and [str(v.vip) for v in route.vips] == ["UDP 10.0.0.100:9000"]


def test_dsr_refuses_port_translation(pkt_lab: PacketLab) -> None:
    moved = L4Service(vip("10.0.0.133", 9000), members=((ep("10.0.1.11", 9001), 1),), mode="dsr")
    with pytest.raises(DataplaneError, match="DSR cannot translate ports; targets on another port: 10.0.1.11:9001"):
        pkt_lab.dataplane.apply([*SERVICES, *DSR, moved])
    assert "TCP 10.0.0.133:9000" not in {str(e.vip) for e in pkt_lab.maps.vips()}  # nothing half-applied

"""Full NAT in the XDP program, on packet fixtures (BPF_PROG_TEST_RUN).

A full-NAT VIP's packets leave with lb's address toward the target
(10.0.1.1 on fxb) and a source port lb allocates as their source; the
target's replies, addressed to that address and port, go back as VIP ->
client. Expected frames are built by scapy with checksums from scratch;
the allocated port is the one bpf/fullnat.h's hash gives (mirrored by
lb.inspect.explain.fullnat_port), so the frames are known byte for byte.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest
from scapy.compat import raw
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from lb import metrics
from lb import netlink as nl
from lb.dataplane import libbpf
from lb.dataplane.dataplane import Dataplane, L4Service
from lb.dataplane.loader import Program, purge_pins
from lb.dataplane.maps import Maps
from lb.dataplane.structs import IPPROTO_TCP, Counter, FlowKey, Limits, MapName, ip_to_net, port_to_net
from lb.inspect.explain import explain_flow_in, flow_hash, fullnat_port
from lb.model import LoadBalancer
from tests.names import name
from tests.test_xdp_packets import (
    CLIENT,
    SERVICES,
    ep,
    from_client,
    from_target,
    rewritten,
    tcp,
    udp,
    vip,
)
from tests.xdp_fixture import (
    CLIENT_IF,
    LIMITS,
    MAC,
    NETNS,
    TARGET_IF,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    Case,
    PacketLab,
    assert_frame,
    counter_deltas,
    packet_lab,
    run_case,
    source_of,
)

pytestmark = pytest.mark.root

LB_ADDR = "10.0.1.1"  # lb's address toward the targets (fxb)
FN_VIP = "10.0.0.120"
PRESSURE = name("pkt-fullnat")  # pins of the port-pressure program

FULLNAT = [
    L4Service(vip(FN_VIP, 9100), members=((ep("10.0.1.11", 9100), 1),), mode="full-nat"),
    L4Service(vip(FN_VIP, 9100, "UDP"), members=((ep("10.0.1.12", 9100), 1),), mode="full-nat"),
    L4Service(vip(FN_VIP, 8081), members=((ep("10.0.1.13", 9101), 1),), mode="full-nat"),  # port translation
    L4Service(vip("10.0.0.121", 9100), members=((ep("192.0.2.1", 9100), 1),), mode="full-nat"),  # no route
    L4Service(vip("10.0.0.124", 9100), members=((ep("10.0.1.14", 9100), 1),), mode="full-nat"),  # no neighbour
    # The endpoint of SERVICES' NAT VIP 10.0.0.100:9000 (10.0.1.11:9000) behind a full-NAT VIP too.
    L4Service(vip("10.0.0.122", 9000), members=((ep("10.0.1.11", 9000), 1),), mode="full-nat"),
]
TARGET_MAC = {"10.0.1.11": MAC["t1"], "10.0.1.12": MAC["t2"], "10.0.1.13": MAC["t3"]}


def port_for(client_port: int, vip_address: str = FN_VIP, vip_port: int = 9100, proto: str = "TCP",
             attempt: int = 0, limits: Limits = LIMITS) -> int:
    """The source port lb tries `attempt`-th for this client's flow (bpf/fullnat.h)."""
    h = flow_hash(proto, ipaddress.IPv4Address(CLIENT), client_port, ipaddress.IPv4Address(vip_address), vip_port)
    return fullnat_port(h, attempt, limits.fullnat_port_min, limits.fullnat_port_max)


def to_target(pkt: Packet, target: str, lb_port: int, target_port: int | None = None, **kw: object) -> bytes:
    """The client's packet as full NAT sends it: lb's address and port -> target."""
    return rewritten(pkt, out_src_mac=MAC["fxb"], out_dst_mac=TARGET_MAC[target], dst=target, src=LB_ADDR,
                     sport=lb_port, dport=target_port, **kw)  # type: ignore[arg-type]


def from_fn(l4: Packet, dst: str = FN_VIP) -> Packet:
    """A client's packet to a full-NAT VIP (FN_VIP unless said)."""
    return from_client(l4, dst=dst)


def reply(target: str, l4: Packet) -> Packet:
    """A target's answer to lb's address, as it arrives on fxb."""
    return from_target(target, TARGET_MAC[target], l4, dst=LB_ADDR)


def fn_handshake(sport: int, vip_address: str = FN_VIP, vip_port: int = 9100, target: str = "10.0.1.11",
                 target_port: int = 9100) -> list[tuple[bytes, str]]:
    """SYN, the target's SYN-ACK to lb's address and port, the client's ACK of it:
    the flow established in conntrack (a SYN alone leaves it half-open)."""
    lb_port = port_for(sport, vip_address, vip_port)
    return [(raw(from_fn(tcp(sport, vip_port), vip_address)), CLIENT_IF),
            (raw(reply(target, tcp(target_port, lb_port, "SA"))), TARGET_IF),
            (raw(from_fn(tcp(sport, vip_port, "A"), vip_address)), CLIENT_IF)]


def to_client(pkt: Packet, client_port: int, vip_address: str = FN_VIP, vip_port: int = 9100,
              **kw: object) -> bytes:
    return rewritten(pkt, out_src_mac=MAC["fxa"], out_dst_mac=MAC["client"], src=vip_address, dst=CLIENT,
                     sport=vip_port, dport=client_port, **kw)  # type: ignore[arg-type]


NEW = {Counter.CONNTRACK_MISS: 1, Counter.REDIRECTED: 1}
HIT = {Counter.CONNTRACK_HIT: 1, Counter.REDIRECTED: 1}
BACK = {Counter.FULLNAT_REVERSE: 1, Counter.REDIRECTED: 1}


def cases() -> Iterator[Case]:
    syn = from_fn(tcp(46001, 9100))
    yield Case("tcp SYN: new flow, source lb's address and a port of its own, destination the target",
               raw(syn), XDP_REDIRECT, to_target(syn, "10.0.1.11", port_for(46001)), NEW)

    ack = from_fn(tcp(46002, 9100, "A", b"x" * 300))
    yield Case("tcp established: conntrack hit, the same port", raw(ack), XDP_REDIRECT,
               to_target(ack, "10.0.1.11", port_for(46002)), HIT, before=fn_handshake(46002))
    synack = reply("10.0.1.11", tcp(9100, port_for(46016), "SA"))
    ack = from_fn(tcp(46016, 9100, "A"))
    yield Case("tcp: the client's ACK of the target's SYN-ACK (seen through full NAT) establishes the flow",
               raw(ack), XDP_REDIRECT, to_target(ack, "10.0.1.11", port_for(46016)),
               {**HIT, Counter.FLOW_ESTABLISHED: 1},
               before=[(raw(from_fn(tcp(46016, 9100))), CLIENT_IF), (raw(synack), TARGET_IF)])

    synack = reply("10.0.1.11", tcp(9100, port_for(46003), "SA"))
    yield Case("reply to lb's address and port: back as VIP -> client", raw(synack), XDP_REDIRECT,
               to_client(synack, 46003), BACK, ingress=TARGET_IF,
               before=[(raw(from_fn(tcp(46003, 9100))), CLIENT_IF)])

    translated = from_fn(tcp(46004, 8081))
    yield Case("port translation: the target's port as the destination", raw(translated), XDP_REDIRECT,
               to_target(translated, "10.0.1.13", port_for(46004, vip_port=8081), 9101), NEW)

    answer = reply("10.0.1.13", tcp(9101, port_for(46005, vip_port=8081), "SA"))
    yield Case("reply of a translated flow: the VIP's port back as the source", raw(answer), XDP_REDIRECT,
               to_client(answer, 46005, vip_port=8081), BACK, ingress=TARGET_IF,
               before=[(raw(from_fn(tcp(46005, 8081))), CLIENT_IF)])

    dgram = from_fn(udp(46006, 9100))
    yield Case("udp datagram: full NAT with the UDP checksum", raw(dgram), XDP_REDIRECT,
               to_target(dgram, "10.0.1.12", port_for(46006, proto="UDP")), NEW)

    echo = reply("10.0.1.12", udp(9100, port_for(46007, proto="UDP"), b"pong"))
    yield Case("udp reply: back as VIP -> client", raw(echo), XDP_REDIRECT, to_client(echo, 46007), BACK,
               ingress=TARGET_IF, before=[(raw(from_fn(udp(46007, 9100))), CLIENT_IF)])

    zero = from_fn(udp(46008, 9100, chksum=0))
    yield Case("udp without checksum: stays without one", raw(zero), XDP_REDIRECT,
               to_target(zero, "10.0.1.12", port_for(46008, proto="UDP"), keep_l4_zero=True), NEW)

    mid = from_fn(tcp(46009, 9100, "A"))
    yield Case("tcp segment of no entry: an entry and a port (the target can answer it with a RST)",
               raw(mid), XDP_REDIRECT, to_target(mid, "10.0.1.11", port_for(46009)), NEW)

    stray = reply("10.0.1.11", tcp(9100, port_for(46010), "A"))
    yield Case("a packet to lb's address and a port no flow holds: passed untouched", raw(stray), XDP_PASS, None,
               {Counter.PASS_NOT_VIP: 1}, ingress=TARGET_IF)

    unroutable = from_client(tcp(46011, 9100), dst="10.0.0.121")
    yield Case("a target lb has no address toward (no route): dropped", raw(unroutable), XDP_DROP, None,
               {Counter.CONNTRACK_MISS: 1, Counter.DROP_NO_SOURCE: 1})

    lonely = from_client(tcp(46015, 9100), dst="10.0.0.124")
    yield Case("a target with no neighbour entry: dropped, not passed (its source is lb's own address)",
               raw(lonely), XDP_DROP,  # rewritten before the next hop was asked for, then dropped
               rewritten(lonely, out_src_mac=None, out_dst_mac=None, dst="10.0.1.14", src=LB_ADDR,
                         sport=port_for(46015, "10.0.0.124"), ttl_dec=False),
               {Counter.CONNTRACK_MISS: 1, Counter.DROP_NO_NEIGH: 1})

    # One target endpoint behind a NAT VIP and a full-NAT VIP, one client port toward both.
    nat_syn, fn_syn = from_client(tcp(46012, 9000)), from_client(tcp(46012, 9000), dst="10.0.0.122")
    nat_reply = from_target("10.0.1.11", MAC["t1"], tcp(9000, 46012, "SA"))
    yield Case("shared endpoint: the NAT VIP's reply still goes back from its VIP", raw(nat_reply), XDP_REDIRECT,
               rewritten(nat_reply, out_src_mac=MAC["fxa"], out_dst_mac=MAC["client"], src="10.0.0.100"),
               {Counter.REVERSE_NAT: 1, Counter.REDIRECTED: 1}, ingress=TARGET_IF,
               before=[(raw(nat_syn), CLIENT_IF), (raw(fn_syn), CLIENT_IF)])
    fn_reply = reply("10.0.1.11", tcp(9000, port_for(46013, "10.0.0.122", 9000), "SA"))
    yield Case("shared endpoint: the full-NAT VIP's reply goes back from its own VIP", raw(fn_reply), XDP_REDIRECT,
               to_client(fn_reply, 46013, "10.0.0.122", 9000), BACK, ingress=TARGET_IF,
               before=[(raw(from_client(tcp(46013, 9000))), CLIENT_IF),
                       (raw(from_client(tcp(46013, 9000), dst="10.0.0.122")), CLIENT_IF)])

    ttl = reply("10.0.1.11", tcp(9100, port_for(46014), "A"))
    ttl[IP].ttl = 1
    yield Case("reply with TTL 1: dropped", raw(ttl), XDP_DROP, None, {Counter.DROP_TTL: 1}, ingress=TARGET_IF,
               before=[(raw(from_fn(tcp(46014, 9100))), CLIENT_IF)])


CASES = list(cases())


@pytest.fixture(scope="module")
def pkt_lab() -> Iterator[PacketLab]:
    with packet_lab() as the_lab:
        the_lab.dataplane.apply([*SERVICES, *FULLNAT])
        yield the_lab


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_packet(pkt_lab: PacketLab, case: Case) -> None:
    result = run_case(pkt_lab, case)
    assert_frame(result.data, case.frame if case.expect is None else case.expect)


def test_vips_carry_their_mode(pkt_lab: PacketLab) -> None:
    modes = {str(e.vip): e.mode for e in pkt_lab.maps.vips()}
    assert modes["TCP 10.0.0.120:9100"] == "full-nat" and modes["TCP 10.0.0.100:9000"] == "nat"
    assert pkt_lab.maps.fullnat_source(pkt_lab.dataplane.target_id(ep("10.0.1.11", 9100)) or 0) == \
        ipaddress.IPv4Address(LB_ADDR)


def test_the_entry_names_the_source_and_its_owner(pkt_lab: PacketLab) -> None:
    pkt_lab.run(raw(from_fn(tcp(46100, 9100))))
    flow = pkt_lab.maps.flow("TCP", ep(CLIENT, 46100), ep(FN_VIP, 9100))
    assert flow is not None and flow.mode == "full-nat"
    assert flow.source == ep(LB_ADDR, port_for(46100))
    owner = pkt_lab.maps.fullnat_owner("TCP", ep("10.0.1.11", 9100), flow.source)
    assert owner is not None and str(owner[0]) == f"{CLIENT}:46100" and str(owner[1]) == f"TCP {FN_VIP}:9100"


def colliding_client_ports(start: int) -> tuple[int, int]:
    """Two client ports whose flows to FN_VIP:9100 hash to the same first source port."""
    seen: dict[int, int] = {}
    for client_port in range(start, start + 5000):
        port = port_for(client_port)
        if port in seen:
            return seen[port], client_port
        seen[port] = client_port
    raise AssertionError("no collision in 5000 ports")


def test_a_port_held_by_a_live_flow_is_not_taken(pkt_lab: PacketLab) -> None:
    first, second = colliding_client_ports(47000)
    pkt_lab.run(raw(from_fn(tcp(first, 9100))))
    before = pkt_lab.maps.counters()
    syn = from_fn(tcp(second, 9100))
    result = pkt_lab.run(raw(syn))
    assert result.data == to_target(syn, "10.0.1.11", port_for(second, attempt=1))
    assert counter_deltas(pkt_lab.maps, before) == \
        {**NEW, Counter.FULLNAT_PORT_BUSY: 1}


def test_a_port_whose_flow_is_gone_is_taken_over(pkt_lab: PacketLab) -> None:
    first, second = colliding_client_ports(48000)
    pkt_lab.run(raw(from_fn(tcp(first, 9100))))
    key = FlowKey(ip_to_net(CLIENT), ip_to_net(FN_VIP), port_to_net(first), port_to_net(9100), IPPROTO_TCP)
    assert pkt_lab.maps.raw(MapName.HALF_OPEN).delete(key)  # the first flow (half-open: a SYN) is gone
    before = pkt_lab.maps.counters()
    syn = from_fn(tcp(second, 9100))
    assert pkt_lab.run(raw(syn)).data == to_target(syn, "10.0.1.11", port_for(second))
    assert counter_deltas(pkt_lab.maps, before) == NEW


def test_a_mode_change_makes_the_vips_flows_stale(pkt_lab: PacketLab) -> None:
    service = vip("10.0.0.123", 9100)
    members = ((ep("10.0.1.11", 9100), 1),)
    pkt_lab.dataplane.apply([*SERVICES, *FULLNAT, L4Service(service, members=members)])
    pkt_lab.run(raw(from_client(tcp(46200, 9100), dst="10.0.0.123")))
    pkt_lab.dataplane.apply([*SERVICES, *FULLNAT, L4Service(service, members=members, mode="full-nat")])
    ack = from_client(tcp(46200, 9100, "A"), dst="10.0.0.123")
    result = pkt_lab.run(raw(ack))
    assert result.data == to_target(ack, "10.0.1.11", port_for(46200, "10.0.0.123"))  # taken afresh, by full NAT
    pkt_lab.dataplane.apply([*SERVICES, *FULLNAT])


# --- ports under pressure ------------------------------------------------------------------


PRESSURE_FLOWS = 20_000


@pytest.fixture()
def pressure(pkt_lab: PacketLab) -> Iterator[tuple[Program, Maps]]:
    """A program of its own (room for the flows, no flood guard) in the packet namespace."""
    limits = Limits(ring_size=251, max_vips=8, max_targets=32, conntrack_size=65536, new_flow_rate_limit=0)
    purge_pins(PRESSURE)
    try:
        with Program.load(PRESSURE, limits) as program, Maps(program.pin_dir, limits) as maps:
            Dataplane(maps, source_of=source_of).apply(FULLNAT[:1])
            yield program, maps
    finally:
        purge_pins(PRESSURE)


def run_many(program: Program, ifindex: int, frames: list[bytes]) -> list[libbpf.RunResult]:
    def body() -> list[libbpf.RunResult]:
        return [libbpf.prog_test_run(program.fd, f, ingress_ifindex=ifindex) for f in frames]

    return nl.run_in_netns(NETNS, body)


def test_20000_flows_from_one_client_to_one_target_get_distinct_ports(
        pkt_lab: PacketLab, pressure: tuple[Program, Maps]) -> None:
    """Full NAT's ports per (lb address, target endpoint): 20,000 concurrent flows
    from one client address toward one target fill 63 % of the default range.
    No two flows share a port; a flow that finds none is dropped and counted."""
    program, maps = pressure
    frames = [raw(from_client(tcp(1024 + i, 9100), dst=FN_VIP)) for i in range(PRESSURE_FLOWS)]
    results = run_many(program, pkt_lab.ifindex[CLIENT_IF], frames)
    sent = [Ether(r.data) for r in results if r.retval == XDP_REDIRECT]
    dropped = [r for r in results if r.retval == XDP_DROP]
    assert len(sent) + len(dropped) == PRESSURE_FLOWS
    ports = [p[TCP].sport for p in sent]
    assert len(set(ports)) == len(ports)  # no collision
    assert all(p[IP].src == LB_ADDR and p[IP].dst == "10.0.1.11" for p in sent)
    assert all(LIMITS.fullnat_port_min <= port <= LIMITS.fullnat_port_max for port in ports)
    counters = maps.counters()
    assert counters[Counter.DROP_NO_PORT] == len(dropped)  # failures counted, not silent
    assert len(dropped) <= PRESSURE_FLOWS // 1000  # 16 tries at 63 % full: about one in 50,000 fails
    assert sum(1 for _ in maps.raw(MapName.FULLNAT_FLOWS).keys()) == len(sent)
    assert sum(1 for _ in maps.half_open_flows()) == len(sent)  # SYNs: each flow half-open, holding its port


def test_a_full_range_drops_and_counts(pkt_lab: PacketLab) -> None:
    """A range of 64 ports and 100 flows to one target: 64 at most get through,
    every other one is dropped with DROP_NO_PORT."""
    limits = Limits(ring_size=251, max_vips=8, max_targets=32, conntrack_size=4096, new_flow_rate_limit=0,
                    fullnat_port_min=20000, fullnat_port_max=20063)
    purge_pins(PRESSURE)
    try:
        with Program.load(PRESSURE, limits) as program, Maps(program.pin_dir, limits) as maps:
            Dataplane(maps, source_of=source_of).apply(FULLNAT[:1])
            frames = [raw(from_fn(tcp(30000 + i, 9100))) for i in range(100)]
            results = run_many(program, pkt_lab.ifindex[CLIENT_IF], frames)
            ports = [Ether(r.data)[TCP].sport for r in results if r.retval == XDP_REDIRECT]
            dropped = sum(1 for r in results if r.retval == XDP_DROP)
            assert len(set(ports)) == len(ports) <= 64 and len(ports) + dropped == 100
            assert maps.counters()[Counter.DROP_NO_PORT] == dropped >= 36
    finally:
        purge_pins(PRESSURE)



def test_explain_flow_names_the_mode_and_the_source(pkt_lab: PacketLab) -> None:
    client, vip_ep = ep(CLIENT, 46300), ep(FN_VIP, 9100)
    before = explain_flow_in(pkt_lab.maps, "TCP", client, vip_ep)
    assert before["mode"] == "full-nat"
    assert before["full_nat"] == {"source": f"{LB_ADDR}:{port_for(46300)}", "from_entry": False}
    pkt_lab.run(raw(from_fn(tcp(46300, 9100))))
    after = explain_flow_in(pkt_lab.maps, "TCP", client, vip_ep)
    assert after["full_nat"] == {"source": f"{LB_ADDR}:{port_for(46300)}", "from_entry": True}
    assert after["conntrack"]["mode"] == "full-nat" and after["conntrack"]["source"] == f"{LB_ADDR}:{port_for(46300)}"
    nat = explain_flow_in(pkt_lab.maps, "TCP", client, ep("10.0.0.100", 9000))
    assert nat["mode"] == "nat" and nat["full_nat"] is None


def test_metrics_show_the_mode_and_the_ports_each_source_holds(pkt_lab: PacketLab) -> None:
    # The collector's map sections on the fixture's maps (its limits are not a config's).
    collector = metrics.Collector(lambda: LoadBalancer(name="unused"))
    pkt_lab.run(raw(from_fn(tcp(46400, 9100))))
    vips = pkt_lab.maps.vips()
    found = {m.name: m for m in [*collector._traffic(LoadBalancer(name="unused"), pkt_lab.maps, vips),
                                 *collector._conntrack(pkt_lab.maps, vips)]}
    info = {(s.labels["vip"], s.labels["protocol"]): s.labels["mode"] for s in found["lb_vip_info"].samples}
    assert info[(f"{FN_VIP}:9100", "TCP")] == "full-nat" and info[("10.0.0.100:9000", "TCP")] == "nat"
    held = {(s.labels["source"], s.labels["target"], s.labels["protocol"]): s.value
            for s in found["lb_full_nat_ports"].samples}
    assert held[(LB_ADDR, "10.0.1.11:9100", "TCP")] >= 1

"""DSR end to end: real TCP and UDP from a client behind a router, through lb's
XDP program (MAC rewrite, XDP_TX back onto the segment), to targets that hold
the VIP and answer the client directly (lb.lab_dsr)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import pytest

from lb import lab_dsr
from lb import netlink as nl
from lb.dataplane.dataplane import Dataplane, L4Service
from lb.dataplane.loader import Program, purge_pins
from lb.dataplane.maps import Endpoint, Maps, VipAddr
from lb.dataplane.structs import Counter
from lb.lab_dsr import DsrLab
from tests.l4_lab import (
    LIMITS,
    answer_with_peer,
    assert_even,
    assert_open_connection_outlives_its_target,
    named_echo,
    spread,
    tcp_connect,
    tcp_server,
    udp_echoes,
    udp_server,
)
from tests.labclient import read_line
from tests.names import name

pytestmark = pytest.mark.root

ECHO_PORT = 9000
PEER_PORT = 9300  # the test's own servers on target1: what the target sees of its peer
UDP_PORT = 9400


class Dsr:
    def __init__(self, lab: DsrLab, maps: Maps, dataplane: Dataplane) -> None:
        self.lab, self.maps, self.dataplane = lab, maps, dataplane

    def vip(self, port: int, proto: str = "TCP") -> VipAddr:
        return VipAddr(ipaddress.IPv4Address(lab_dsr.VIP), port, proto)

    def endpoints(self, port: int) -> list[Endpoint]:
        return [Endpoint(ipaddress.IPv4Address(t.address), port) for t in self.lab.targets]

    def services(self, drained: Endpoint | None = None) -> list[L4Service]:
        echo = [e for e in self.endpoints(ECHO_PORT) if e != drained]
        first = self.endpoints(PEER_PORT)[0], self.endpoints(UDP_PORT)[0]
        return [L4Service(self.vip(ECHO_PORT), members=tuple((e, 1) for e in echo),
                          draining=(drained,) if drained else (), mode="dsr"),
                L4Service(self.vip(ECHO_PORT, "UDP"), members=tuple((e, 1) for e in self.endpoints(ECHO_PORT)),
                          mode="dsr"),
                L4Service(self.vip(PEER_PORT), members=((first[0], 1),), mode="dsr"),
                L4Service(self.vip(UDP_PORT, "UDP"), members=((first[1], 1),), mode="dsr")]


@pytest.fixture(scope="module")
def dsr() -> Iterator[Dsr]:
    lab = DsrLab(name("dsr"))
    pins = name("dsr-l4")
    purge_pins(pins)
    try:
        lab.up()
        with Program.load(pins, LIMITS) as program, Maps(program.pin_dir, LIMITS) as maps, \
                program.attached([lab_dsr.LB_IF], lab_dsr.XDP_MODE, lab.lb_ns):
            the = Dsr(lab, maps, Dataplane(maps, source_of=lambda a: nl.source_toward(a, lab.lb_ns)))
            the.dataplane.apply(the.services())
            yield the
    finally:
        lab.down()
        purge_pins(pins)


def connect(dsr: Dsr, port: int = ECHO_PORT) -> socket.socket:
    return tcp_connect(dsr.lab.client_ns, lab_dsr.VIP, port)


def test_300_connections_reach_all_targets_evenly_and_no_reply_crosses_lb(dsr: Dsr) -> None:
    before = dsr.maps.counters()
    assert_even(spread(lambda: connect(dsr), 300), (t.name for t in dsr.lab.targets), 300)
    after = dsr.maps.counters()
    assert after[Counter.TX] - before[Counter.TX] >= 300 * 2  # SYN and ACK at least, back onto the segment
    assert after[Counter.DSR] - before[Counter.DSR] == after[Counter.TX] - before[Counter.TX]
    for unseen in (Counter.REVERSE_NAT, Counter.FULLNAT_REVERSE, Counter.DROP_NO_NEIGH):
        assert after[unseen] == before[unseen]


@pytest.fixture()
def target1_servers(dsr: Dsr) -> Iterator[None]:
    """On target1: TCP PEER_PORT answers with the peer address it sees; UDP
    UDP_PORT, bound to the VIP (so answers leave from it), echoes."""
    target = dsr.lab.targets[0]
    with tcp_server(target.netns, lab_dsr.VIP, PEER_PORT, answer_with_peer), \
            udp_server(target.netns, lab_dsr.VIP, UDP_PORT, named_echo("target1")):
        yield


def test_the_target_sees_the_clients_address(dsr: Dsr, target1_servers: None) -> None:
    with connect(dsr, PEER_PORT) as sock:
        assert read_line(sock) == f"{lab_dsr.CLIENT_ADDR}:{sock.getsockname()[1]}"


def test_udp_through_a_dsr_vip(dsr: Dsr, target1_servers: None) -> None:
    # Each answer comes from the VIP and carries its own ping (udp_echoes checks).
    assert udp_echoes(dsr.lab.client_ns, lab_dsr.VIP, UDP_PORT, 10) == {"target1": 10}


def test_removing_a_target_keeps_its_open_connection(dsr: Dsr) -> None:
    def drain(owner: str) -> None:
        drained = next(e for e, t in zip(dsr.endpoints(ECHO_PORT), dsr.lab.targets) if t.name == owner)
        dsr.dataplane.apply(dsr.services(drained))

    try:
        assert_open_connection_outlives_its_target(lambda: connect(dsr), drain)
    finally:
        dsr.dataplane.apply(dsr.services())

"""Full NAT end to end: real TCP and UDP from the client namespace through a
full-NAT VIP to backends that have no route back through lb.

The module takes every backend's default route away for its duration: a
backend can then answer only lb's own address on its link (10.0.1.1), which
is exactly what full NAT gives it as the source.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb import netlink as nl
from lb.dataplane.dataplane import L4Service
from lb.dataplane.structs import Counter
from lb.lab import Lab
from lb.model import XdpMode
from tests.l4_lab import (
    L4Lab,
    answer_with_peer,
    assert_even,
    assert_open_connection_outlives_its_target,
    backend_endpoints,
    l4_lab,
    spread,
    tcp_connect,
    tcp_server,
    tcp_vip,
    udp_echoes,
    udp_vip,
)
from tests.labclient import read_line

pytestmark = pytest.mark.root

PEER_PORT = 9300  # a server of the test's own on backend1: answers with the peer address it sees


def full_nat(vip_port: int, lab: Lab, target_port: int | None = None, proto: str = "TCP") -> L4Service:
    vip = tcp_vip(vip_port) if proto == "TCP" else udp_vip(vip_port)
    return L4Service(vip, members=tuple((e, 1) for e in backend_endpoints(lab, target_port or vip_port)),
                     mode="full-nat")


def services(lab: Lab) -> list[L4Service]:
    peer = tcp_vip(PEER_PORT)
    backend1 = backend_endpoints(lab, PEER_PORT)[0]
    return [full_nat(labmod.ECHO_PORT, lab), full_nat(labmod.ECHO_PORT, lab, proto="UDP"),
            L4Service(peer, members=((backend1, 1),), mode="full-nat")]


@pytest.fixture(scope="module")
def l4(lab: Lab) -> Iterator[L4Lab]:
    for backend in lab.backends:
        with nl.iproute(backend.netns) as ipr:
            nl.remove_route(ipr, "default")
    try:
        with l4_lab(lab, XdpMode.NATIVE) as attached:
            attached.dataplane.apply(services(lab))
            yield attached
    finally:
        for backend in lab.backends:
            with nl.iproute(backend.netns) as ipr:
                nl.add_route(ipr, "default", gateway=labmod.BACKEND_GATEWAY)


def connect(l4: L4Lab, port: int = labmod.ECHO_PORT) -> socket.socket:
    return tcp_connect(l4.lab.client_ns, labmod.VIP, port)


def test_300_connections_reach_all_backends_evenly(l4: L4Lab) -> None:
    before = l4.maps.counters()
    assert_even(spread(lambda: connect(l4), 300), (b.name for b in l4.lab.backends), 300)
    after = l4.maps.counters()
    assert after[Counter.FULLNAT_REVERSE] - before[Counter.FULLNAT_REVERSE] >= 300 * 2  # SYN-ACK, banner
    assert after[Counter.DROP_NO_PORT] == before[Counter.DROP_NO_PORT]


@pytest.fixture()
def peer_server(l4: L4Lab) -> Iterator[None]:
    """On backend1, port PEER_PORT: each connection gets the address:port it came from."""
    backend = l4.lab.backends[0]
    with tcp_server(backend.netns, backend.address, PEER_PORT, answer_with_peer):
        yield


def test_the_target_sees_lbs_address_and_the_allocated_port(l4: L4Lab, peer_server: None) -> None:
    sock = connect(l4, PEER_PORT)
    with sock:
        seen = read_line(sock)
        client_port = sock.getsockname()[1]
        flow = next(f for f in l4.maps.flows() if f.client.port == client_port and f.vip.port == PEER_PORT)
    assert seen == str(flow.source)
    assert seen.startswith(f"{labmod.BACKEND_GATEWAY}:")  # lb's address on the backend's link


def test_udp_echo_through_a_full_nat_vip(l4: L4Lab) -> None:
    names = set(udp_echoes(l4.lab.client_ns, labmod.VIP, labmod.ECHO_PORT, 30))
    assert names <= {b.name for b in l4.lab.backends} and len(names) >= 2


def test_removing_a_target_keeps_its_open_connection(l4: L4Lab) -> None:
    lab = l4.lab

    def drain(owner: str) -> None:
        drained = next(e for e in backend_endpoints(lab) if l4.backend_of(e) == owner)
        others = tuple((e, 1) for e in backend_endpoints(lab) if e != drained)
        l4.dataplane.apply([L4Service(tcp_vip(), members=others, draining=(drained,), mode="full-nat"),
                            *services(lab)[1:]])

    try:
        assert_open_connection_outlives_its_target(lambda: connect(l4), drain)
    finally:
        l4.dataplane.apply(services(lab))

"""The XDP fast path end to end: real TCP and UDP from the client namespace
through a VIP on the lb namespace to the three backends."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb import netlink as nl
from lb.dataplane.dataplane import L4Service
from lb.dataplane.structs import Counter, MapName
from lb.lab import Lab
from lb.model import XdpMode
from tests.l4_lab import (
    L4Lab,
    all_backends,
    assert_even,
    assert_open_connection_outlives_its_target,
    backend_endpoints,
    l4_lab,
    spread,
    tcp_connect,
    tcp_vip,
    udp_echoes,
    udp_vip,
)
from tests.labclient import read_line

pytestmark = pytest.mark.root


@pytest.fixture(scope="module", params=[XdpMode.NATIVE, XdpMode.GENERIC], ids=["native", "generic"])
def l4(request: pytest.FixtureRequest, lab: Lab) -> Iterator[L4Lab]:
    with l4_lab(lab, request.param) as attached:
        attached.dataplane.apply([all_backends(tcp_vip(), lab), all_backends(udp_vip(), lab)])
        yield attached


# Fixed source ports sit below the ephemeral range (32768-60999), so no
# connection of another test can hold one of them in TIME_WAIT.
FIXED_PORTS = (25001, 25002, 25003)
FORGOTTEN_PORT = 25100


def connect(l4: L4Lab, source_port: int = 0) -> socket.socket:
    """A TCP connection from the client to the TCP VIP (from a fixed source port if given)."""
    source = (labmod.CLIENT_ADDR, source_port) if source_port else None
    return tcp_connect(l4.lab.client_ns, labmod.VIP, labmod.ECHO_PORT, source)


def test_300_connections_reach_all_backends_evenly(l4: L4Lab) -> None:
    before = l4.maps.counters()
    assert_even(spread(lambda: connect(l4), 300), (b.name for b in l4.lab.backends), 300)
    after = l4.maps.counters()
    assert after[Counter.CONNTRACK_MISS] - before[Counter.CONNTRACK_MISS] >= 300
    redirected = after[Counter.REDIRECTED] - before[Counter.REDIRECTED]
    forwarded = redirected + (after[Counter.PASS_FIB] - before[Counter.PASS_FIB])
    assert forwarded >= 300 * 3  # at least SYN, ACK, RST each way per connection


def test_same_five_tuple_reaches_the_same_backend(l4: L4Lab) -> None:
    for source_port in FIXED_PORTS:
        names = set()
        for _ in range(5):
            with connect(l4, source_port) as sock:
                names.add(read_line(sock))
        assert len(names) == 1


def test_same_five_tuple_is_hashed_the_same_after_conntrack_forgets(l4: L4Lab) -> None:
    with connect(l4, FORGOTTEN_PORT) as sock:
        first = read_line(sock)
    conntrack = l4.maps.raw(MapName.CONNTRACK)
    for key in list(conntrack.keys()):
        conntrack.delete(key)
    with connect(l4, FORGOTTEN_PORT) as sock:
        assert read_line(sock) == first  # Maglev: the ring, not the table, decided


def test_removing_a_target_keeps_its_open_connections(l4: L4Lab) -> None:
    lab = l4.lab

    def drain(owner: str) -> None:
        drained = next(e for e in backend_endpoints(lab) if l4.backend_of(e) == owner)
        others = tuple((e, 1) for e in backend_endpoints(lab) if e != drained)
        l4.dataplane.apply([L4Service(tcp_vip(), members=others, draining=(drained,)), all_backends(udp_vip(), lab)])

    try:
        assert_open_connection_outlives_its_target(lambda: connect(l4), drain)
    finally:
        l4.dataplane.apply([all_backends(tcp_vip(), lab), all_backends(udp_vip(), lab)])


def test_udp_echo_through_the_vip(l4: L4Lab) -> None:
    names = set(udp_echoes(l4.lab.client_ns, labmod.VIP, labmod.ECHO_PORT, 30))
    assert names <= {b.name for b in l4.lab.backends}
    assert len(names) >= 2  # 30 flows spread over the ring


def test_attached_in_the_requested_mode(l4: L4Lab) -> None:
    with nl.iproute(l4.lab.lb_ns) as ipr:
        for attachment in l4.attachments:
            assert nl.xdp_info(ipr, attachment.ifname) == (attachment.mode, l4.program.prog_id)

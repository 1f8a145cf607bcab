"""The lab's IPv6 side through lb's XDP program: IPv6 reaches the kernel,
which routes it (no IPv6 VIPs on the XDP path yet), and the program counts it
by kind (neighbour discovery as ICMPv6, the TCP segments as pass_ipv6)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from lb import lab as labmod
from lb import netlink as nl
from lb.dataplane.structs import Counter
from lb.lab import Lab
from lb.netlink import run_in_netns
from tests.l4_lab import L4Lab, all_backends, l4_lab, tcp_vip

pytestmark = pytest.mark.root

PORT = 9600  # a listener of this test's own in backend1, bound to its IPv6 address


@pytest.fixture(scope="module")
def l4(lab: Lab) -> Iterator[L4Lab]:
    with l4_lab(lab) as attached:
        attached.dataplane.apply([all_backends(tcp_vip(), lab)])
        yield attached


def forget_neighbour(ns: str, address: str) -> None:
    """Drop `ns`'s neighbour entry for `address` on its eth0: the next packet solicits it again."""
    with nl.iproute(ns) as ipr:
        try:
            ipr.neigh("del", dst=address, ifindex=nl.ifindex(ipr, labmod.HOST_IF))
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise


def test_the_lab_has_ipv6_alongside_ipv4(lab: Lab) -> None:
    with nl.iproute(lab.client_ns) as ipr:
        assert {labmod.CLIENT_ADDR, labmod.CLIENT_ADDR6} <= set(nl.addresses(ipr, labmod.HOST_IF))
    for b in lab.backends:
        with nl.iproute(b.netns) as ipr:
            assert {b.address, b.address6} <= set(nl.addresses(ipr, labmod.HOST_IF))
    assert nl.get_sysctl(lab.lb_ns, "net.ipv6.conf.all.forwarding") == "1"


def test_ipv6_tcp_crosses_lb_through_the_kernel_and_is_counted(l4: L4Lab) -> None:
    backend = l4.lab.backends[0]
    listener = run_in_netns(backend.netns, socket.create_server, (backend.address6, PORT),
                            family=socket.AF_INET6)
    try:
        listener.settimeout(5)
        forget_neighbour(l4.lab.client_ns, labmod.LB_CLIENT_ADDR6)
        before = l4.maps.counters()

        def dial() -> socket.socket:
            return socket.create_connection((backend.address6, PORT), timeout=5)

        client = run_in_netns(l4.lab.client_ns, dial)
        with client:
            conn, peer = listener.accept()
            with conn:
                client.sendall(b"over ipv6")
                assert conn.recv(64) == b"over ipv6"
                conn.sendall(b"back")
                assert client.recv(64) == b"back"
        after = l4.maps.counters()
    finally:
        listener.close()

    assert peer[0] == labmod.CLIENT_ADDR6  # routed, not translated
    grew = {c: after[c] - before[c] for c in Counter if after[c] != before[c]}
    # SYN, ACK, data, ACK each way at least; the client's neighbour solicitation for lb.
    assert grew.get(Counter.PASS_IPV6, 0) >= 4, grew
    assert grew.get(Counter.PASS_ICMPV6, 0) >= 1, grew
    for verdict in (Counter.REDIRECTED, Counter.TX, Counter.CONNTRACK_MISS, Counter.PASS_PARSE_ERROR):
        assert verdict not in grew, grew

"""IPv6 through the XDP program on the namespace lab, with real sockets.

The program is attached to the lab's lb host and its IPv6 maps written
directly (as tests/test_xdp_ipv6.py does; the control plane's writers are
another branch's), so this checks what packet fixtures cannot: the kernel's
own stacks on both ends accept what the program emits (checksums, hop
limit, neighbour discovery, redirect between veths), for a NAT VIP over TCP
and UDP and a full-NAT VIP over TCP.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb import netlink as nl
from lb.dataplane.maps import Maps
from lb.dataplane.structs import (
    FWD_FULLNAT,
    FWD_NAT,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TARGET_F_ACTIVE,
    TARGET_F_IN_SERVICE,
    Counter,
    EndpointKey6,
    MapName,
    ReplyRoute6,
    ReplyVip6,
    Target6,
    VipKey6,
    VipMeta,
    ip6_to_net,
    port_to_net,
)
from lb.lab import Lab
from lb.netlink import run_in_netns
from tests.l4_lab import LIMITS, L4Lab, l4_lab

pytestmark = pytest.mark.root

VIP6 = "fd00::100"
LB_BACKEND_ADDR6 = labmod.BACKEND_GATEWAY6  # lb's address on every backend link: full NAT's source


def write_vip6(maps: Maps, vip_id: int, target_id: int, target: str, port: int, proto: int, mode: int) -> None:
    """An IPv6 VIP [VIP6]:port with one target, as the control plane writes it."""
    maps.raw(MapName.TARGETS6).update(ctypes.c_uint32(target_id),
                                      Target6(ip6_to_net(target), port_to_net(port),
                                              TARGET_F_ACTIVE | TARGET_F_IN_SERVICE))
    m = LIMITS.ring_size
    slots = (ctypes.c_uint32 * m)(*range(vip_id * 2 * m, vip_id * 2 * m + m))
    maps.raw(MapName.RINGS).update_batch(slots, (ctypes.c_uint32 * m)(*([target_id] * m)), m)
    maps.raw(MapName.VIPS6).update(VipKey6(ip6_to_net(VIP6), port_to_net(port), proto), VipMeta(vip_id, 0, 0, mode))
    if mode == FWD_NAT:
        route = ReplyRoute6(target_id, 1)
        route.vips[0] = ReplyVip6(ip6_to_net(VIP6), port_to_net(port), 0, vip_id, 0)
        maps.raw(MapName.REPLIES6).update(EndpointKey6(ip6_to_net(target), port_to_net(port), proto), route)
        bits = maps.raw(MapName.REPLY_PORTS)
        word = bits.lookup(ctypes.c_uint32(port >> 6))
        bits.update(ctypes.c_uint32(port >> 6),
                    ctypes.c_uint64((0 if word is None else int(word.value)) | (1 << (port & 63))))
    else:
        maps.raw(MapName.FULLNAT_SOURCES6).update(ctypes.c_uint32(target_id), ip6_to_net(LB_BACKEND_ADDR6))


@pytest.fixture(scope="module")
def l4(lab: Lab) -> Iterator[L4Lab]:
    with l4_lab(lab) as attached:
        with nl.iproute(lab.lb_ns) as ipr:
            nl.add_address(ipr, labmod.LB_CLIENT_IF, VIP6, 128, nodad=True)
        try:
            yield attached
        finally:
            with nl.iproute(lab.lb_ns) as ipr:
                nl.remove_address(ipr, labmod.LB_CLIENT_IF, VIP6, 128)


def grew(l4: L4Lab, before: dict[Counter, int]) -> dict[Counter, int]:
    after = l4.maps.counters()
    return {c: after[c] - before[c] for c in Counter if after[c] != before[c]}


def tcp_exchange(l4: L4Lab, port: int) -> tuple[str, int]:
    """A connection from the client to [VIP6]:port, served by backend 1 on
    its own IPv6 listener; returns the peer the backend saw."""
    backend = l4.lab.backends[0]
    listener = run_in_netns(backend.netns, socket.create_server, (backend.address6, port), family=socket.AF_INET6)
    try:
        listener.settimeout(5)
        client = run_in_netns(l4.lab.client_ns, socket.create_connection, (VIP6, port), 5)
        with client:
            conn, peer = listener.accept()
            with conn:
                client.sendall(b"x" * 3000)  # more than one segment
                got = b""
                while len(got) < 3000:
                    got += conn.recv(4096)
                conn.sendall(b"back over ipv6")
                assert client.recv(64) == b"back over ipv6"
                assert client.getpeername()[0] == VIP6
    finally:
        listener.close()
    return peer[0], peer[1]


def test_nat_tcp_over_ipv6(l4: L4Lab) -> None:
    backend = l4.lab.backends[0]
    write_vip6(l4.maps, 5, 61, backend.address6, 9611, IPPROTO_TCP, FWD_NAT)
    before = l4.maps.counters()
    peer, _ = tcp_exchange(l4, 9611)
    assert peer == labmod.CLIENT_ADDR6  # NAT keeps the client's address
    counted = grew(l4, before)
    assert counted.get(Counter.FLOW_ESTABLISHED, 0) == 1, counted
    assert counted.get(Counter.REVERSE_NAT, 0) >= 3, counted  # SYN-ACK, data, FIN at least
    assert counted.get(Counter.IPV6_FORWARDED, 0) >= 8, counted


def test_fullnat_tcp_over_ipv6(l4: L4Lab) -> None:
    backend = l4.lab.backends[0]
    with nl.iproute(l4.lab.lb_ns) as ipr:  # as Dataplane does for full-NAT targets
        nl.resolve_neighbor(ipr, backend.address6)
    write_vip6(l4.maps, 6, 62, backend.address6, 9612, IPPROTO_TCP, FWD_FULLNAT)
    before = l4.maps.counters()
    peer, peer_port = tcp_exchange(l4, 9612)
    assert peer == LB_BACKEND_ADDR6 and LIMITS.fullnat_port_min <= peer_port <= LIMITS.fullnat_port_max
    counted = grew(l4, before)
    assert counted.get(Counter.FLOW_ESTABLISHED, 0) == 1, counted
    assert counted.get(Counter.FULLNAT_REVERSE, 0) >= 3, counted


def test_nat_udp_over_ipv6(l4: L4Lab) -> None:
    backend = l4.lab.backends[0]
    write_vip6(l4.maps, 7, 63, backend.address6, 9613, IPPROTO_UDP, FWD_NAT)

    def serve() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.bind((backend.address6, 9613))
        sock.settimeout(5)
        return sock

    def open_client() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.settimeout(5)
        return sock

    server = run_in_netns(backend.netns, serve)
    client = run_in_netns(l4.lab.client_ns, open_client)
    with server, client:
        client.sendto(b"ping6", (VIP6, 9613))
        data, peer = server.recvfrom(64)
        assert (data, peer[0]) == (b"ping6", labmod.CLIENT_ADDR6)
        server.sendto(b"pong6", peer)
        data, source = client.recvfrom(64)
        assert (data, source[0], source[1]) == (b"pong6", VIP6, 9613)

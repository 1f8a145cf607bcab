"""The XDP fast path end to end: real TCP and UDP from the client namespace
through a VIP on the lb namespace to the three backends."""

from __future__ import annotations

import socket
import time
from collections import Counter as Tally
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb.dataplane.dataplane import L4Service
from lb.dataplane.structs import Counter
from lb.lab import Lab
from lb.model import XdpMode
from lb.netlink import run_in_netns
from tests.l4_lab import L4Lab, all_backends, backend_endpoints, l4_lab, tcp_vip, udp_vip

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
    """A TCP connection from the client to the TCP VIP; RST on close (no
    TIME_WAIT), so the same source port can be used again at once."""

    def open_() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.settimeout(5)
            if source_port:
                sock.bind((labmod.CLIENT_ADDR, source_port))
            sock.connect((labmod.VIP, labmod.ECHO_PORT))
        except BaseException:
            sock.close()
            raise
        return sock

    return run_in_netns(l4.lab.client_ns, open_)


def banner(sock: socket.socket) -> str:
    """The echo server greets with its name."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(64)
        assert chunk, "connection closed before the banner"
        data += chunk
    return data.decode().strip()


def test_300_connections_reach_all_backends_evenly(l4: L4Lab) -> None:
    before = l4.maps.counters()
    seen: Tally[str] = Tally()
    for _ in range(300):
        with connect(l4) as sock:
            seen[banner(sock)] += 1
    assert sum(seen.values()) == 300
    assert set(seen) == {b.name for b in l4.lab.backends}
    for count in seen.values():
        assert 75 <= count <= 125, seen  # within ±25 % of 100
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
                names.add(banner(sock))
        assert len(names) == 1


def test_same_five_tuple_is_hashed_the_same_after_conntrack_forgets(l4: L4Lab) -> None:
    from lb.dataplane.structs import MapName

    with connect(l4, FORGOTTEN_PORT) as sock:
        first = banner(sock)
    conntrack = l4.maps.raw(MapName.CONNTRACK)
    for key in list(conntrack.keys()):
        conntrack.delete(key)
    with connect(l4, FORGOTTEN_PORT) as sock:
        assert banner(sock) == first  # Maglev: the ring, not the table, decided


def test_removing_a_target_keeps_its_open_connections(l4: L4Lab) -> None:
    lab = l4.lab
    long_lived = connect(l4)
    try:
        owner = banner(long_lived)
        drained = next(e for e in backend_endpoints(lab) if l4.backend_of(e) == owner)
        others = tuple((e, 1) for e in backend_endpoints(lab) if e != drained)
        l4.dataplane.apply([L4Service(tcp_vip(), members=others, draining=(drained,)), all_backends(udp_vip(), lab)])

        for i in range(20):  # the open connection keeps exchanging data
            payload = f"still here {i}\n".encode()
            long_lived.sendall(payload)
            received = b""
            while len(received) < len(payload):
                received += long_lived.recv(64)
            assert received == payload
            time.sleep(0.01)

        new = Tally()
        for _ in range(60):
            with connect(l4) as sock:
                new[banner(sock)] += 1
        assert owner not in new and sum(new.values()) == 60
    finally:
        long_lived.close()
        l4.dataplane.apply([all_backends(tcp_vip(), lab), all_backends(udp_vip(), lab)])


def test_udp_echo_through_the_vip(l4: L4Lab) -> None:
    def exchange() -> set[str]:
        names = set()
        for i in range(30):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)
                sock.sendto(f"ping {i}".encode(), (labmod.VIP, labmod.ECHO_PORT))
                data, sender = sock.recvfrom(128)
                assert sender == (labmod.VIP, labmod.ECHO_PORT)  # the reply comes from the VIP
                name, _, echoed = data.decode().partition(" ")
                assert echoed == f"ping {i}"
                names.add(name)
        return names

    names = run_in_netns(l4.lab.client_ns, exchange)
    assert names <= {b.name for b in l4.lab.backends}
    assert len(names) >= 2  # 30 flows spread over the ring


def test_attached_in_the_requested_mode(l4: L4Lab) -> None:
    from lb import netlink as nl

    with nl.iproute(l4.lab.lb_ns) as ipr:
        for attachment in l4.attachments:
            assert nl.xdp_info(ipr, attachment.ifname) == (attachment.mode, l4.program.prog_id)

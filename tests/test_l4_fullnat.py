"""Full NAT end to end: real TCP and UDP from the client namespace through a
full-NAT VIP to backends that have no route back through lb.

The module takes every backend's default route away for its duration: a
backend can then answer only lb's own address on its link (10.0.1.1), which
is exactly what full NAT gives it as the source.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb import netlink as nl
from lb.dataplane.dataplane import L4Service
from lb.dataplane.structs import Counter
from lb.lab import Lab
from lb.model import XdpMode
from lb.netlink import run_in_netns
from tests.l4_lab import L4Lab, backend_endpoints, l4_lab, tcp_vip, udp_vip

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
    """A TCP connection from the client to the VIP; RST on close (no TIME_WAIT)."""

    def open_() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.settimeout(5)
            sock.connect((labmod.VIP, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return run_in_netns(l4.lab.client_ns, open_)


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(64)
        assert chunk, "connection closed before a line"
        data += chunk
    return data.decode().strip()


def test_300_connections_reach_all_backends_evenly(l4: L4Lab) -> None:
    before = l4.maps.counters()
    seen: Tally[str] = Tally()
    for _ in range(300):
        with connect(l4) as sock:
            seen[read_line(sock)] += 1
    assert set(seen) == {b.name for b in l4.lab.backends} and sum(seen.values()) == 300
    for count in seen.values():
        assert 75 <= count <= 125, seen  # within ±25 % of 100
    after = l4.maps.counters()
    assert after[Counter.FULLNAT_REVERSE] - before[Counter.FULLNAT_REVERSE] >= 300 * 2  # SYN-ACK, banner
    assert after[Counter.DROP_NO_PORT] == before[Counter.DROP_NO_PORT]


@pytest.fixture()
def peer_server(l4: L4Lab) -> Iterator[None]:
    """On backend1, port PEER_PORT: each connection gets the address:port it came from."""
    backend = l4.lab.backends[0]

    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((backend.address, PEER_PORT))
        sock.listen(16)
        sock.settimeout(0.2)
        return sock

    server = run_in_netns(backend.netns, listen)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(f"{peer[0]}:{peer[1]}\n".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_the_target_sees_lbs_address_and_the_allocated_port(l4: L4Lab, peer_server: None) -> None:
    sock = connect(l4, PEER_PORT)
    with sock:
        seen = read_line(sock)
        client_port = sock.getsockname()[1]
        flow = next(f for f in l4.maps.flows() if f.client.port == client_port and f.vip.port == PEER_PORT)
    assert seen == str(flow.source)
    assert seen.startswith(f"{labmod.BACKEND_GATEWAY}:")  # lb's address on the backend's link


def test_udp_echo_through_a_full_nat_vip(l4: L4Lab) -> None:
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
    assert names <= {b.name for b in l4.lab.backends} and len(names) >= 2


def test_removing_a_target_keeps_its_open_connection(l4: L4Lab) -> None:
    lab = l4.lab
    long_lived = connect(l4)
    try:
        owner = read_line(long_lived)
        drained = next(e for e in backend_endpoints(lab) if l4.backend_of(e) == owner)
        others = tuple((e, 1) for e in backend_endpoints(lab) if e != drained)
        l4.dataplane.apply([L4Service(tcp_vip(), members=others, draining=(drained,), mode="full-nat"),
                            *services(lab)[1:]])
        for i in range(20):
            payload = f"still here {i}\n".encode()
            long_lived.sendall(payload)
            received = b""
            while len(received) < len(payload):
                received += long_lived.recv(64)
            assert received == payload
            time.sleep(0.01)
        new: Tally[str] = Tally()
        for _ in range(60):
            with connect(l4) as sock:
                new[read_line(sock)] += 1
        assert owner not in new and sum(new.values()) == 60
    finally:
        long_lived.close()
        l4.dataplane.apply(services(lab))

"""DSR end to end: real TCP and UDP from a client behind a router, through lb's
XDP program (MAC rewrite, XDP_TX back onto the segment), to targets that hold
the VIP and answer the client directly (lb.lab_dsr)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator

import pytest

from lb import lab_dsr
from lb import netlink as nl
from lb.dataplane.dataplane import Dataplane, L4Service
from lb.dataplane.loader import Program, purge_pins
from lb.dataplane.maps import Endpoint, Maps, VipAddr
from lb.dataplane.structs import Counter
from lb.lab_dsr import DsrLab
from tests.l4_lab import LIMITS
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

    def in_client(self, fn: Callable[[], object]) -> object:
        return nl.run_in_netns(self.lab.client_ns, fn)


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
    def open_() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.settimeout(5)
            sock.connect((lab_dsr.VIP, port))
        except BaseException:
            sock.close()
            raise
        return sock

    sock = dsr.in_client(open_)
    assert isinstance(sock, socket.socket)
    return sock


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(64)
        assert chunk, "connection closed before a line"
        data += chunk
    return data.decode().strip()


def test_300_connections_reach_all_targets_evenly_and_no_reply_crosses_lb(dsr: Dsr) -> None:
    before = dsr.maps.counters()
    seen: Tally[str] = Tally()
    for _ in range(300):
        with connect(dsr) as sock:
            seen[read_line(sock)] += 1
    assert set(seen) == {t.name for t in dsr.lab.targets} and sum(seen.values()) == 300
    for count in seen.values():
        assert 75 <= count <= 125, seen  # within ±25 % of 100
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

    def sockets() -> tuple[socket.socket, socket.socket]:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((lab_dsr.VIP, PEER_PORT))
        tcp.listen(8)
        tcp.settimeout(0.2)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((lab_dsr.VIP, UDP_PORT))
        udp.settimeout(0.2)
        return tcp, udp

    tcp, udp = nl.run_in_netns(target.netns, sockets)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = tcp.accept()
                with conn:
                    conn.sendall(f"{peer[0]}:{peer[1]}\n".encode())
            except TimeoutError:
                pass
            try:
                data, sender = udp.recvfrom(256)
                udp.sendto(b"target1 " + data, sender)
            except TimeoutError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        tcp.close()
        udp.close()


def test_the_target_sees_the_clients_address(dsr: Dsr, target1_servers: None) -> None:
    with connect(dsr, PEER_PORT) as sock:
        assert read_line(sock) == f"{lab_dsr.CLIENT_ADDR}:{sock.getsockname()[1]}"


def test_udp_through_a_dsr_vip(dsr: Dsr, target1_servers: None) -> None:
    def exchange() -> list[tuple[str, int]]:
        senders = []
        for i in range(10):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)
                sock.sendto(f"ping {i}".encode(), (lab_dsr.VIP, UDP_PORT))
                data, sender = sock.recvfrom(128)
                assert data == f"target1 ping {i}".encode()
                senders.append(sender)
        return senders

    assert set(dsr.in_client(exchange)) == {(lab_dsr.VIP, UDP_PORT)}  # type: ignore[arg-type]


def test_removing_a_target_keeps_its_open_connection(dsr: Dsr) -> None:
    long_lived = connect(dsr)
    try:
        owner = read_line(long_lived)
        drained = next(e for e, t in zip(dsr.endpoints(ECHO_PORT), dsr.lab.targets) if t.name == owner)
        dsr.dataplane.apply(dsr.services(drained))
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
            with connect(dsr) as sock:
                new[read_line(sock)] += 1
        assert owner not in new and sum(new.values()) == 60
    finally:
        long_lived.close()
        dsr.dataplane.apply(dsr.services())

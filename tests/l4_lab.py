"""The XDP program attached to the namespace lab's lb host, for L4 tests,
and the traffic they send through it: connections opened in a namespace,
how new connections spread over the targets, a long-lived connection that
outlives its target's removal, servers of the test's own on a target.

The traffic helpers take a namespace and addresses, IPv4 or IPv6 alike, so
that every lab (the NAT lab, the DSR lab) and address family can use them.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lb import lab as labmod
from lb import netlink as nl
from lb.dataplane.dataplane import Dataplane, L4Service
from lb.dataplane.loader import Attachment, Program, purge_pins
from lb.dataplane.maps import Endpoint, Maps, VipAddr
from lb.dataplane.structs import Limits
from lb.lab import Lab
from lb.model import XdpMode
from lb.netlink import run_in_netns
from tests.labclient import read_line

LIMITS = Limits(ring_size=65537, max_vips=8, max_targets=64, conntrack_size=65536)


def tcp_vip(port: int = labmod.ECHO_PORT) -> VipAddr:
    return VipAddr(ipaddress.IPv4Address(labmod.VIP), port, "TCP")


def udp_vip(port: int = labmod.ECHO_PORT) -> VipAddr:
    return VipAddr(ipaddress.IPv4Address(labmod.VIP), port, "UDP")


def backend_endpoints(lab: Lab, port: int = labmod.ECHO_PORT) -> list[Endpoint]:
    return [Endpoint(ipaddress.IPv4Address(b.address), port) for b in lab.backends]


def all_backends(vip: VipAddr, lab: Lab) -> L4Service:
    return L4Service(vip, members=tuple((e, 1) for e in backend_endpoints(lab)))


@dataclass
class L4Lab:
    lab: Lab
    program: Program
    maps: Maps
    dataplane: Dataplane
    attachments: list[Attachment]

    def backend_of(self, endpoint: Endpoint) -> str:
        return next(b.name for b in self.lab.backends if b.address == str(endpoint.address))


@contextmanager
def l4_lab(lab: Lab, mode: XdpMode = XdpMode.NATIVE) -> Iterator[L4Lab]:
    name = f"{lab.prefix}-l4"
    purge_pins(name)
    with nl.iproute(lab.lb_ns) as ipr:
        nl.add_address(ipr, labmod.LB_CLIENT_IF, labmod.VIP, 32)
    try:
        with Program.load(name, LIMITS) as program, Maps(program.pin_dir, LIMITS) as maps, \
                program.attached(lab.lb_interfaces, mode, lab.lb_ns) as attachments:
            dataplane = Dataplane(maps, source_of=lambda address: nl.source_toward(address, lab.lb_ns))
            yield L4Lab(lab, program, maps, dataplane, attachments)
    finally:
        with nl.iproute(lab.lb_ns) as ipr:
            nl.remove_address(ipr, labmod.LB_CLIENT_IF, labmod.VIP, 32)
        purge_pins(name)


# --- traffic ---------------------------------------------------------------------------


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def tcp_connect(netns: str, address: str, port: int, source: tuple[str, int] | None = None,
                timeout: float = 5.0) -> socket.socket:
    """A TCP connection opened in `netns` to address:port, from `source`
    (address, port) if given. RST on close (no TIME_WAIT), so the same
    source port can be used again at once."""

    def open_() -> socket.socket:
        sock = socket.socket(family_of(address), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.settimeout(timeout)
            if source is not None:
                sock.bind(source)
            sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return run_in_netns(netns, open_)


def spread(connect: Callable[[], socket.socket], n: int) -> Tally[str]:
    """Who answered each of `n` new connections (a target greets with its name)."""
    seen: Tally[str] = Tally()
    for _ in range(n):
        with connect() as sock:
            seen[read_line(sock)] += 1
    return seen


def udp_echoes(netns: str, address: str, port: int, n: int) -> Tally[str]:
    """Who echoed each of `n` datagrams sent from `netns` to address:port,
    each from a new socket (a new flow). Every reply must come from
    address:port itself and carry the datagram after the target's name."""

    def exchange() -> Tally[str]:
        names: Tally[str] = Tally()
        for i in range(n):
            with socket.socket(family_of(address), socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)
                sock.sendto(f"ping {i}".encode(), (address, port))
                data, sender = sock.recvfrom(128)
                assert sender[:2] == (address, port)  # the reply comes from the VIP
                name, _, echoed = data.decode().partition(" ")
                assert echoed == f"ping {i}"
                names[name] += 1
        return names

    return run_in_netns(netns, exchange)


def assert_even(seen: Tally[str], names: Iterable[str], n: int, tolerance: float = 0.25) -> None:
    """All `n` connections answered, by every one of `names`, each within
    ±tolerance of an even share."""
    names = set(names)
    assert set(seen) == names and sum(seen.values()) == n, seen
    share = n / len(names)
    for count in seen.values():
        assert (1 - tolerance) * share <= count <= (1 + tolerance) * share, seen


def assert_open_connection_outlives_its_target(connect: Callable[[], socket.socket], drain: Callable[[str], None],
                                               new_connections: int = 60) -> None:
    """A long-lived connection through the VIP goes on after its target is
    taken out: `drain(owner)` removes the target that greeted it (by name)
    from the ring, the connection still echoes, and no new connection goes
    to that target. Putting the target back is the caller's (in its finally)."""
    long_lived = connect()
    try:
        owner = read_line(long_lived)
        drain(owner)
        for i in range(20):
            payload = f"still here {i}\n".encode()
            long_lived.sendall(payload)
            received = b""
            while len(received) < len(payload):
                chunk = long_lived.recv(64)
                assert chunk, f"the connection to {owner} closed"
                received += chunk
            assert received == payload
            time.sleep(0.01)
        new = spread(connect, new_connections)
        assert owner not in new and sum(new.values()) == new_connections, new
    finally:
        long_lived.close()


@contextmanager
def tcp_server(netns: str, address: str, port: int,
               answer: Callable[[socket.socket, tuple[str, int]], None]) -> Iterator[None]:
    """A TCP server of the test's own in `netns` on address:port, in a
    thread: `answer(connection, peer)` for each connection, which is then closed."""

    def listen() -> socket.socket:
        sock = socket.socket(family_of(address), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(16)
        sock.settimeout(0.2)
        return sock

    server = run_in_netns(netns, listen)

    def serve() -> None:
        conn, peer = server.accept()
        with conn:
            answer(conn, peer[:2])

    with _serving(server, serve):
        yield


def answer_with_peer(conn: socket.socket, peer: tuple[str, int]) -> None:
    """A `tcp_server` answer: the address and port the connection came from,
    a line ("ADDR:PORT", IPv6 as "[ADDR]:PORT"): what a target sees of its
    client (NAT, DSR) or of lb (full NAT)."""
    address, port = peer
    shown = f"[{address}]:{port}" if family_of(address) == socket.AF_INET6 else f"{address}:{port}"
    conn.sendall(f"{shown}\n".encode())


def answer_with_byte_count(conn: socket.socket, peer: tuple[str, int]) -> None:
    """A `tcp_server` answer: reads the connection to its EOF, then answers
    with the byte count, a line (a sink for uploads)."""
    conn.settimeout(20)
    total = 0
    while chunk := conn.recv(65536):
        total += len(chunk)
    conn.sendall(f"{total}\n".encode())


def named_echo(name: str) -> Callable[[bytes], bytes]:
    """A `udp_server` answer: the datagram after `name` and a space (a
    target's name, as lb.labserver's UDP echo answers)."""
    return lambda data: name.encode() + b" " + data


def upload(netns: str, address: str, port: int, size: int) -> str:
    """`size` bytes sent from `netns` to address:port over one TCP
    connection, then its write side shut: the line the server answers
    (a server answering with `answer_with_byte_count` says how many arrived)."""

    def send() -> str:
        with socket.socket(family_of(address), socket.SOCK_STREAM) as sock:
            sock.settimeout(15)
            sock.connect((address, port))
            sock.sendall(b"u" * size)
            sock.shutdown(socket.SHUT_WR)
            return sock.recv(64).decode().strip()

    return run_in_netns(netns, send)


@contextmanager
def link_mtu(netns: str, ifname: str, mtu: int) -> Iterator[None]:
    """`ifname` in `netns` with MTU `mtu` for the block, 1500 again after it."""
    with nl.iproute(netns) as ipr:
        ipr.link("set", index=nl.ifindex(ipr, ifname), mtu=mtu)
    try:
        yield
    finally:
        with nl.iproute(netns) as ipr:
            ipr.link("set", index=nl.ifindex(ipr, ifname), mtu=1500)


@contextmanager
def udp_server(netns: str, address: str, port: int, answer: Callable[[bytes], bytes]) -> Iterator[None]:
    """A UDP server of the test's own in `netns`, bound to address:port (so
    its replies leave from that address), in a thread: each datagram is
    answered with `answer(data)`."""

    def bind() -> socket.socket:
        sock = socket.socket(family_of(address), socket.SOCK_DGRAM)
        sock.bind((address, port))
        sock.settimeout(0.2)
        return sock

    server = run_in_netns(netns, bind)

    def serve() -> None:
        data, sender = server.recvfrom(65536)
        server.sendto(answer(data), sender)

    with _serving(server, serve):
        yield


@contextmanager
def _serving(server: socket.socket, serve_one: Callable[[], None]) -> Iterator[None]:
    """Run `serve_one` in a thread until the block ends (its timeouts are
    the thread's chance to stop), then close `server`."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                serve_one()
            except TimeoutError:
                continue

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()

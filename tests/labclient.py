"""Traffic from inside a lab namespace, for tests: sockets created there."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from lb.lab import Lab
from lb.netlink import run_in_netns


def tcp_connect(ns: str, address: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP socket opened from namespace `ns` (it stays in that namespace)."""

    def connect() -> socket.socket:
        return socket.create_connection((address, port), timeout=timeout)

    return run_in_netns(ns, connect)


def udp_socket(ns: str, timeout: float = 5.0, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        return sock

    return run_in_netns(ns, make)


def read_line(sock: socket.socket) -> str:
    """One line (a backend's banner or echo), without its newline."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(64)
        if not chunk:
            raise ConnectionError("closed before a full line")
        data += chunk
    return data.decode().strip()


def backend_address(lab: Lab, name: str) -> str:
    """The address of the lab backend called `name` (as its banner says)."""
    return next(b.address for b in lab.backends if b.name == name)


def http_get(ns: str, address: str, port: int = 80, path: str = "/", host: str = "lab",
             timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with Connection: close; returns status, headers, body."""
    with tcp_connect(ns, address, port, timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


@contextmanager
def peer_server(ns: str, address: str, port: int) -> Iterator[None]:
    """A TCP server on address:port in namespace `ns` that answers each
    connection with the peer it sees ("ADDR:PORT", IPv6 as "[ADDR]:PORT") and
    closes it: what a target sees of its client (NAT, DSR) or of lb (full NAT)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET

    def listen() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(64)
        sock.settimeout(0.2)
        return sock

    server = run_in_netns(ns, listen)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            with conn:
                shown = f"[{peer[0]}]:{peer[1]}" if family == socket.AF_INET6 else f"{peer[0]}:{peer[1]}"
                conn.sendall(f"{shown}\n".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()


@contextmanager
def udp_echo_server(ns: str, address: str, port: int, name: str) -> Iterator[None]:
    """A UDP server bound to address:port in namespace `ns` answering each
    datagram with "<name> " + payload, from that address (a DSR target binds
    the VIP, so its answers leave from it)."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET

    def bind() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((address, port))
        sock.settimeout(0.2)
        return sock

    server = run_in_netns(ns, bind)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, sender = server.recvfrom(2048)
            except TimeoutError:
                continue
            server.sendto(name.encode() + b" " + data, sender)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()


@contextmanager
def sink_server(ns: str, address: str, port: int) -> Iterator[None]:
    """A TCP server on address:port in namespace `ns` that reads each
    connection to its EOF and answers with the byte count, a line."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET

    def listen() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(4)
        sock.settimeout(0.2)
        return sock

    server = run_in_netns(ns, listen)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(20)
                total = 0
                while chunk := conn.recv(65536):
                    total += len(chunk)
                conn.sendall(f"{total}\n".encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()

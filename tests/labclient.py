"""Traffic from inside a lab namespace, for tests: sockets created there."""

from __future__ import annotations

import socket

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

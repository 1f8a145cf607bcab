"""The small server every lab backend runs.

    python -m lb.labserver --name backend1 [--netns lab-backend1] [--http-port 80] [--echo-port 9000]
                           [--https-port 443]

- HTTP on --http-port (keep-alive, HTTP/1.1 and 1.0). Every answer names the
  backend: the body is "<name>\\n" and the header `X-Backend: <name>`.
  Test hooks: `/status/<code>` answers with that status (`/status/<code>/<name>`:
  only backend <name> does, the others answer 200), `/sleep/<seconds>`
  answers after a delay (slow in-flight requests), `/echo` returns the request
  body, `/headers` returns the request headers as received.
- HTTPS on --https-port (if given): the same server behind TLS, with a
  self-signed certificate made at start (an HTTPS target group's target;
  lb does not verify it unless the group has a ca_bundle, as ALB).
- TCP echo on --echo-port: sends the banner "<name>\\n" on connect, then
  echoes every byte back.
- UDP echo on --echo-port: answers each datagram with "<name> " + payload.
- HTTP and HTTPS on IPv4; both echo servers on IPv4 and IPv6 (IPv6 VIPs' targets).

It prints "ready" on stdout once every socket is bound, so the lab can wait
for it without polling.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import signal
import socket
import ssl
import sys
import tempfile
from typing import cast

import httptools
from pyroute2 import netns

REASONS = {200: "OK", 204: "No Content", 404: "Not Found", 500: "Internal Server Error"}


class HttpHandler(asyncio.Protocol):
    """One client connection: parse with httptools, answer each request in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # per request
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self.respond(400, b"bad request\n", keep_alive=False)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path = httptools.parse_url(self.url).path.decode("latin-1")
        keep_alive = self.parser.should_keep_alive()
        if path.startswith("/sleep/"):
            delay = float(path.split("/")[2] or 0)
            asyncio.get_running_loop().call_later(
                delay, self.respond, 200, self.name.encode() + b"\n", keep_alive
            )
            return
        if path.startswith("/status/"):
            parts = path.split("/")  # /status/<code>[/<backend>]: only that backend answers <code>
            code = int(parts[2]) if len(parts) < 4 or parts[3] == self.name else 200
            self.respond(code, self.name.encode() + b"\n", keep_alive)
        elif path == "/echo":
            self.respond(200, b"".join(self.body), keep_alive)
        elif path == "/peer":  # who connected, as this server sees it (the client, or lb in full NAT)
            peer = self.transport.get_extra_info("peername") if self.transport else None
            self.respond(200, f"{self.name} {peer[0] if peer else '?'}\n".encode(), keep_alive)
        elif path == "/headers":
            lines = b"".join(n + b": " + v + b"\n" for n, v in self.headers)
            self.respond(200, lines, keep_alive)
        else:
            self.respond(200, self.name.encode() + b"\n", keep_alive)

    def respond(self, status: int, body: bytes, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            f"X-Backend: {self.name}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        if not keep_alive:
            self.transport.close()


class TcpEcho(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.name.encode() + b"\n")

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class UdpEcho(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.prefix = name.encode() + b" "

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(self.prefix + data, addr)


def self_signed_pem(common_name: str, dns_names: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """(certificate, private key), PEM: a new self-signed ECDSA P-256
    certificate for ``common_name``, valid for a year, with ``dns_names`` as
    its subject alternative names if any (the demo's HTTPS listener)."""
    from cryptography import x509  # why here: only the HTTPS port and the demo need it
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=365)))
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]),
                                        critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def self_signed(name: str) -> ssl.SSLContext:
    """A server context with a new self-signed ECDSA certificate for ``name``."""
    cert, key = self_signed_pem(name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        os.write(fd, cert + key)
        os.close(fd)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
    return ctx


def ipv6_only_udp(port: int) -> socket.socket:
    """A UDP socket on [::]:port that leaves IPv4 to the 0.0.0.0 one (IPV6_V6ONLY)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def serve(name: str, http_port: int, echo_port: int, https_port: int = 0) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    http = await loop.create_server(lambda: HttpHandler(name), "0.0.0.0", http_port, reuse_address=True)
    https = None
    if https_port:
        https = await loop.create_server(lambda: HttpHandler(name), "0.0.0.0", https_port, reuse_address=True,
                                         ssl=self_signed(name))
    # The echo servers on IPv4 and IPv6 (host None: 0.0.0.0 and ::, the latter IPv6 only), for IPv6 VIPs.
    echo = await loop.create_server(lambda: TcpEcho(name), None, echo_port, reuse_address=True)
    udp, _ = await loop.create_datagram_endpoint(lambda: UdpEcho(name), local_addr=("0.0.0.0", echo_port))
    udp6, _ = await loop.create_datagram_endpoint(lambda: UdpEcho(name), sock=ipv6_only_udp(echo_port))
    print("ready", flush=True)
    try:
        await stop
    finally:
        udp.close()
        udp6.close()
        echo.close()
        http.close()
        if https is not None:
            https.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lb.labserver", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--netns")
    parser.add_argument("--http-port", type=int, default=80)
    parser.add_argument("--echo-port", type=int, default=9000)
    parser.add_argument("--https-port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.netns:
        netns.setns(args.netns, flags=0)  # the main thread, before any socket exists
    asyncio.run(serve(args.name, args.http_port, args.echo_port, args.https_port))


if __name__ == "__main__":
    main(sys.argv[1:])

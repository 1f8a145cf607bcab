"""HTTPS listeners' TLS on the socket (lb.l7.tls_transport) under attack and
under load: a client that stalls mid-handshake, sends something that is not a
ClientHello, closes mid-handshake, or floods the worker with handshakes it
never finishes; large bodies both ways through the transport's write queue.
Real TLS handshakes on 127.0.0.1, the worker in the test's loop; the
descriptor mark is lowered on the worker itself (tests/test_l7_fds.py's way)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path
from typing import cast

import pytest

from lb import model as m
from lb import tls
from lb.l7.config import L7Config
from lb.l7.tls_transport import TlsServer, TlsTransport
from tests.l7_backends import backend, forward_to, http_listener, proxy, routing_table, run, target_group
from tests.tls_certs import Certs, tls_request


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def fixed_listener(certs: Certs) -> m.Listener:
    return http_listener(m.FixedResponseAction(200, "text/plain", "ok"), tls=certs.listener_tls("www.example.com"))


def client_hello() -> bytes:
    """A real ClientHello's bytes (TLS 1.3 and 1.2, SNI www.example.com)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="www.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def raw_connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    if data:
        await asyncio.get_running_loop().sock_sendall(sock, data)
    return sock


async def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closed (EOF or reset) within ``timeout``; what it sent first is dropped."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    if not await loop.sock_recv(sock, 65536):
                        return True
                except ConnectionResetError:
                    return True
    except TimeoutError:
        return False


async def served(port: int, certs: Certs) -> bool:
    shake = await asyncio.to_thread(tls_request, port, certs.client())
    return shake.response.startswith(b"HTTP/1.1 200")


def test_a_stalled_handshake_is_closed_at_the_header_timeout(certs: Certs) -> None:
    async def body() -> None:
        config = L7Config(header_timeout=0.6)
        async with proxy(routing_table(fixed_listener(certs)), config) as (worker, port):
            silent = await raw_connect(port)  # connects, never says a word
            hello = client_hello()
            trickle = await raw_connect(port, hello[:20])  # a ClientHello that never ends
            half = await raw_connect(port, hello)  # a whole ClientHello, then never the Finished
            try:
                await asyncio.sleep(0.2)
                # The silent one is not even accepted (TCP_DEFER_ACCEPT): no descriptor, no handshake.
                assert len(worker.handshakes) == 2 and worker.open_fds() == worker.base_fds + 2
                assert await served(port, certs)  # others are served meanwhile
                assert not await closed_by_peer(trickle, 0.1)
                assert all([await closed_by_peer(s, 1.0) for s in (trickle, half)])
                assert not worker.handshakes and not worker.connections
                assert worker.open_fds() == worker.base_fds
            finally:
                for s in (silent, trickle, half):
                    s.close()

    run(body())


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"\x16\x03\x01\x00\x05hello", b"\x00" * 600])
def test_what_is_not_a_client_hello_is_closed_at_once(certs: Certs, garbage: bytes) -> None:
    async def body() -> None:
        async with proxy(routing_table(fixed_listener(certs))) as (worker, port):  # header_timeout: 20 s
            sock = await raw_connect(port, garbage)
            try:
                assert await closed_by_peer(sock, 2.0)
                assert not worker.handshakes and worker.open_fds() == worker.base_fds
                assert await served(port, certs)
            finally:
                sock.close()

    run(body())


@pytest.mark.parametrize("reset", [False, True])
def test_a_client_gone_mid_handshake_leaves_nothing_behind(certs: Certs, reset: bool) -> None:
    async def body() -> None:
        async with proxy(routing_table(fixed_listener(certs))) as (worker, port):
            socks = [await raw_connect(port, client_hello()) for _ in range(20)]
            await asyncio.sleep(0.2)  # the server's flight sent: each waits for the client's Finished
            assert len(worker.handshakes) == 20
            for sock in socks:
                if reset:  # RST rather than FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.close()
            for _ in range(50):
                if not worker.handshakes:
                    break
                await asyncio.sleep(0.02)
            assert not worker.handshakes and worker.open_fds() == worker.base_fds
            assert await served(port, certs)

    run(body())


def test_a_flood_of_unfinished_handshakes_makes_room_oldest_first(certs: Certs) -> None:
    async def body() -> None:
        async with proxy(routing_table(fixed_listener(certs))) as (worker, port):
            worker.fd_high = worker.open_fds() + 8  # the 8th descriptor from now is one too many
            flood = []
            try:
                for _ in range(20):
                    flood.append(await raw_connect(port, client_hello()))
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                assert len(worker.handshakes) <= 7 and worker.open_fds() < worker.fd_high
                gone = [await closed_by_peer(s, 0.3) if i < 13 else False for i, s in enumerate(flood)]
                assert gone == [True] * 13 + [False] * 7  # the oldest ones, in order
                assert worker.shed == 13 and worker.refused == 0
                assert await served(port, certs)  # a real client gets in: the oldest flooder made room
                assert worker.shed == 14
            finally:
                for s in flood:
                    s.close()

    run(body())


def test_large_bodies_both_ways_through_the_write_queue(certs: Certs) -> None:
    size = 8 * 1024 * 1024

    async def body() -> None:
        async with backend("http", "b1") as b:
            listener = http_listener(forward_to("g"), tls=certs.listener_tls("www.example.com"))
            async with proxy(routing_table(listener, (target_group("g", b),))) as (worker, port):

                def client() -> tuple[bytes, int]:
                    ctx = certs.client(alpn=("http/1.1",))
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                            ctx.wrap_socket(raw, server_hostname="www.example.com") as conn:
                        conn.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
                        conn.sendall(b"u" * size)
                        head = b""
                        while b"\r\n\r\n" not in head:
                            head += conn.recv(65536)
                        conn.sendall(b"GET /download?size=%d&random=1 HTTP/1.1\r\nHost: a\r\n"
                                     b"Connection: close\r\n\r\n" % size)
                        got = 0
                        chunks = []
                        while True:
                            try:
                                data = conn.recv(65536)
                            except ssl.SSLZeroReturnError:
                                break
                            if not data:
                                break
                            chunks.append(data)
                            got += len(data)
                            if got < 1024 * 1024:  # a slow reader first: the proxy's write queue fills
                                time.sleep(0.001)
                        return head, len(b"".join(chunks))

                head, received = await asyncio.to_thread(client)
                assert head.startswith(b"HTTP/1.1 200")
                assert b.stats.upload_bytes == size
                assert received > size  # the body and its head
                await asyncio.sleep(0.1)
                assert not worker.connections

    run(body(), timeout=60)


class _Counted:
    """The worker's side of handshakes, for a TlsServer on its own."""

    def __init__(self) -> None:
        self.open: set[TlsTransport] = set()

    def handshake_started(self, transport: TlsTransport) -> None:
        self.open.add(transport)

    def handshake_ended(self, transport: TlsTransport) -> None:
        self.open.discard(transport)


class _Answer(asyncio.Protocol):
    """Answers "ok" and closes; raises on "boom" (a bug in a protocol)."""

    lost: list[Exception | None] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if b"boom" in data:
            raise RuntimeError("boom")
        self.transport.write(b"ok")
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


def test_close_sends_close_notify_and_a_failing_protocol_ends_only_its_connection(certs: Certs) -> None:
    def exchange(port: int, data: bytes) -> bytes | str:
        ctx = certs.client()
        ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF  # Python's default: an EOF without close_notify reads as one
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="www.example.com", suppress_ragged_eofs=False) as conn:
            conn.sendall(data)
            got = b""
            try:
                while chunk := conn.recv(100):  # b"" only after the server's close_notify
                    got += chunk
            except ssl.SSLError as exc:  # OpenSSL 3: UNEXPECTED_EOF_WHILE_READING
                if exc.reason != "UNEXPECTED_EOF_WHILE_READING":
                    raise
                return "closed without close_notify"
            return got

    async def body() -> None:
        counted = _Counted()
        context = tls.listening_context(tls.SniContexts(certs.listener_tls("www.example.com")))
        server = TlsServer.listen(asyncio.get_running_loop(), "127.0.0.1", 0, 16, context, _Answer, 5.0, counted)
        port = server.sockets[0].getsockname()[1]
        try:
            assert await asyncio.to_thread(exchange, port, b"hello") == b"ok"
            assert await asyncio.to_thread(exchange, port, b"boom") == "closed without close_notify"
            assert await asyncio.to_thread(exchange, port, b"again") == b"ok"  # the server goes on
            await asyncio.sleep(0.05)
            assert [type(exc) for exc in _Answer.lost] == [type(None), RuntimeError, type(None)]
            assert not counted.open
        finally:
            server.close()

    run(body())

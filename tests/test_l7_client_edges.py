"""Client-connection edges: a peer gone before it was seen, WebSocket half-closes.

Real sockets; targets from tests/l7_backends.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest

from tests.l7_backends import (
    HOST,
    Client,
    backend,
    build_request,
    forward_to,
    http_listener,
    proxy,
    routing_table,
    run,
    target_group,
)

UPGRADE = build_request(
    "GET",
    "/chat",
    {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    },
)


def test_a_connection_reset_before_it_is_seen_is_not_forwarded_nor_logged_as_0000(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"

    async def body() -> None:
        async with backend("record") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), access_log=str(log_file))
            async with proxy(table) as (worker, port):
                # All before lb's loop runs again: it accepts a connection already reset,
                # whose request is still in its receive queue.
                sock = socket.socket()
                try:
                    sock.connect((HOST, port))
                    sock.sendall(build_request("POST", "/side-effect", body=b"abc"))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                finally:
                    sock.close()
                await asyncio.sleep(0.3)
                assert b.stats.requests == 0 and not any(b.stats.raw), bytes(b"".join(b.stats.raw))[:200]
                assert worker.stats.connections == 0

    run(body())
    assert "0.0.0.0" not in log_file.read_text()


async def upgraded(port: int) -> Client:
    client = await Client.open(port)
    client.send(UPGRADE)
    head = await client.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    return client


def test_websocket_client_half_close_reaches_the_target_and_its_last_bytes_come_back() -> None:
    async def body() -> None:
        async with backend("halfclose") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await upgraded(port) as client:
                    client.send(b"hello")
                    client.writer.write_eof()
                    rest = await client.read_raw(timeout=3)
                assert rest == b"bye after your FIN"
                assert bytes(b.stats.raw[0]) == b"hello" and b.stats.eofs == 1

    run(body())


def test_websocket_target_half_close_reaches_the_client_and_its_last_bytes_go_through() -> None:
    async def body() -> None:
        async with backend("halfclose") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await upgraded(port) as client:
                    client.send(b"FIN-PLEASE")
                    assert await client.read_raw(timeout=3) == b"last words"  # then the target's FIN
                    client.send(b"still here")
                    await asyncio.sleep(0.1)
                    client.writer.write_eof()
                    await asyncio.sleep(0.1)
                assert bytes(b.stats.raw[0]) == b"FIN-PLEASEstill here"

    run(body())

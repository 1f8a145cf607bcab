"""Resource limits of the L7 proxy: request deadlines, response-head size, caches.

Real sockets, a recording target (tests/l7_backends.py), short settings.
"""

from __future__ import annotations

import asyncio
import time

from lb.l7.config import L7Config
from tests.l7_backends import (
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
from tests.l7_strict import parse_stream

# Idle timeout 5 s: only the deadlines under test can end these exchanges in time.
FAST = L7Config(connect_timeout=2.0, header_timeout=0.5, body_timeout=0.5, min_body_rate=100)


async def trickle(client: Client, pieces: list[bytes], every: float) -> None:
    for piece in pieces:
        if client.writer.is_closing():
            return
        client.send(piece)
        await asyncio.sleep(every)


def test_a_head_that_trickles_in_is_408_at_the_header_timeout() -> None:
    async def body() -> None:
        async with backend("record") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), idle_timeout=5.0)
            async with proxy(table, FAST) as (_, port):
                async with await Client.open(port) as client:
                    # A good request first: the deadline runs from the next head's first byte.
                    assert (await client.request("GET", "/first")).status == 200
                    await asyncio.sleep(0.7)  # idle between requests is the idle timeout's business
                    started = time.monotonic()
                    head = b"GET /slow HTTP/1.1\r\nHost: a\r\n" + b"X-Byte: y\r\n" * 40
                    sender = asyncio.ensure_future(
                        trickle(client, [head[i : i + 4] for i in range(0, len(head), 4)], 0.05)
                    )
                    try:
                        raw = await client.read_raw(timeout=3)
                    finally:
                        sender.cancel()
                    assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), raw[:80]
                    assert time.monotonic() - started < 2.0
                assert [r.target for r in parse_stream(bytes(b.stats.raw[0])).requests] == [b"/first"]

    run(body())


def test_a_body_slower_than_the_minimum_rate_is_408_and_its_target_connection_cut() -> None:
    async def body() -> None:
        async with backend("record") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), idle_timeout=5.0)
            async with proxy(table, FAST) as (_, port):
                async with await Client.open(port) as client:
                    client.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
                    started = time.monotonic()
                    sender = asyncio.ensure_future(trickle(client, [b"x"] * 1000, 0.1))  # 10 B/s < 100 B/s
                    try:
                        raw = await client.read_raw(timeout=4)
                    finally:
                        sender.cancel()
                    assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), raw[:80]
                    assert time.monotonic() - started < 2.0
                await asyncio.sleep(0.05)
                stream = parse_stream(bytes(b.stats.raw[0]))
                assert stream.requests == [] and stream.rest.startswith(b"POST /upload ")
                assert b.protocols[0].transport.is_closing()  # lb let go of the target connection

    run(body())


def test_a_body_at_the_minimum_rate_is_not_cut() -> None:
    async def body() -> None:
        async with backend("record") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), idle_timeout=5.0)
            async with proxy(table, FAST) as (_, port):
                async with await Client.open(port) as client:
                    client.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 300\r\n\r\n")
                    await trickle(client, [b"y" * 15] * 20, 0.1)  # 150 B/s for 2 s: 4x the body timeout
                    response = await client.response(timeout=3)
                    assert (response.status, response.body) == (200, b"POST /upload")
                assert parse_stream(bytes(b.stats.raw[0])).requests[0].body == b"y" * 300

    run(body())


# --- what a target sends back ------------------------------------------------------------


def big_head_script(method: bytes, target: bytes, headers: object, body: bytes) -> list[tuple[float, bytes]] | None:
    if target.startswith(b"/head/"):
        size = int(target.rsplit(b"/", 1)[1])
        piece = b"v" * min(size, 1 << 20)
        writes = [(0.0, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-big: ")]
        writes += [(0.0, piece[: min(len(piece), size - i)]) for i in range(0, size, len(piece))]
        return writes + [(0.0, b"\r\n\r\nok")]
    if target.startswith(b"/fields/"):
        n = int(target.rsplit(b"/", 1)[1])
        fields = b"".join(b"x-f%d: %s\r\n" % (i, b"f" * 90) for i in range(n))
        return [(0.0, b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + fields + b"\r\nok")]
    if target.startswith(b"/phrase/"):
        size, tag = target.split(b"/")[2:4]
        phrase = tag + b"p" * (int(size) - len(tag))
        return [(0.0, b"HTTP/1.1 299 " + phrase + b"\r\ncontent-length: 2\r\n\r\nok")]
    return None


def test_a_response_head_over_the_limit_is_502_and_its_connection_closed() -> None:
    async def body() -> None:
        async with backend("record", script=big_head_script) as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    ok = await client.request("GET", "/head/30000")  # under 32 KiB: relayed
                    assert ok.status == 200 and len(ok.header("x-big") or b"") == 30000
                    for path in ("/head/5000000", "/fields/400"):  # one 5 MB field; 400 small ones (40 KB)
                        started = time.monotonic()
                        response = await client.request("GET", path)
                        assert response.status == 502, (path, response.status)
                        assert time.monotonic() - started < 2.0
                    assert (await client.request("GET", "/after")).body == b"GET /after"
                await asyncio.sleep(0.05)
                # Each oversized head cost its connection; the one before it was reused.
                assert [p.transport.is_closing() for p in b.protocols][:3] == [True, True, False]

    run(body())


def test_reason_phrases_are_capped_in_length_and_their_cache_in_bytes() -> None:
    from lb.l7 import httputil

    async def body() -> None:
        async with backend("record", script=big_head_script) as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    long = await client.request("GET", "/phrase/20000/a")
                    assert long.status == 299 and len(long.reason) <= 256
                    short = await client.request("GET", "/phrase/20/b")
                    assert short.reason == b"b" + b"p" * 19
                    for i in range(600):  # distinct phrases: 600 × 12 KB if cached whole
                        assert (await client.request("GET", f"/phrase/12000/{i}")).status == 299
                    for i in range(600):
                        assert (await client.request("GET", f"/phrase/200/{i}")).status == 299

    run(body(), timeout=60)
    held = sum(len(key[1]) + len(line) for key, line in httputil._status_cache.items())
    assert held <= 64 * 1024, held


def test_time_lb_spends_not_reading_is_not_held_against_a_head() -> None:
    """A head cut short by lb's own backpressure (here a full pipeline queue,
    behind a slow answer) is not timed out while lb does not read it."""

    def slow(method: bytes, target: bytes, headers: object, body: bytes) -> list[tuple[float, bytes]] | None:
        return [(1.2, b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")] if target == b"/slow" else None

    async def body() -> None:
        async with backend("record", script=slow) as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), idle_timeout=5.0)
            config = L7Config(connect_timeout=2.0, header_timeout=0.5, max_pipeline=1)
            async with proxy(table, config) as (_, port):
                async with await Client.open(port) as client:
                    third = build_request("GET", "/third")
                    client.send(build_request("GET", "/slow") + build_request("GET", "/second") + third[:10])
                    await asyncio.sleep(0.2)
                    client.send(third[10:])
                    bodies = [(await client.response(timeout=4)).body for _ in range(3)]
                    assert bodies == [b"slow", b"GET /second", b"GET /third"]

    run(body())

"""Request and response desync: what a target sees must be what lb parsed.

Real sockets: a recording target (tests/l7_backends.py, ``record``) keeps
every byte it receives; the tests compare that stream, parsed with the
strict parser of tests/l7_strict.py, with what the client sent and got.
"""

from __future__ import annotations

import asyncio

from lb import model as m
from tests.l7_backends import (
    Backend,
    Client,
    backend,
    build_request,
    echo_response,
    forward_to,
    http_listener,
    proxy,
    routing_table,
    run,
    target_group,
)
from tests.l7_strict import parse_stream

FIXED = m.Rule(
    10, (m.Condition(m.ConditionField.PATH_PATTERN, ("/fixed",)),), m.FixedResponseAction(403, "text/plain", "blocked")
)


def guarded(b: Backend) -> tuple[object, ...]:
    """A listener whose rule answers /fixed itself (403): the target must never see it."""
    listener = http_listener(forward_to("g"), (FIXED,))
    return (routing_table(listener, (target_group("g", b),)),)


def target_requests(b: Backend) -> list[tuple[bytes, bytes]]:
    """(method, target) of every complete request the target received, all connections."""
    out = []
    for raw in b.stats.raw:
        out += [(r.method, r.target) for r in parse_stream(bytes(raw)).requests]
    return out


# --- 1. Connection nominating a framing header ------------------------------------------

HIDDEN = b"GET /fixed HTTP/1.1\r\nHost: x\r\nX-Pad: 12345678\r\n\r\n"


def smuggle(nomination: bytes) -> bytes:
    return (
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: %s\r\nContent-Length: %d\r\n\r\n" % (nomination, len(HIDDEN))
        + HIDDEN
    )


def test_request_connection_nominating_content_length_is_400_and_reaches_no_target() -> None:
    async def body() -> None:
        async with backend("record") as b:
            (table,) = guarded(b)
            async with proxy(table) as (_, port):  # type: ignore[arg-type]
                for nomination in (b"content-length", b"keep-alive, Content-Length", b"Transfer-Encoding", b"host"):
                    async with await Client.open(port) as client:
                        client.send(smuggle(nomination) + build_request("GET", "/after"))
                        raw = await client.read_raw(timeout=3)
                    assert raw.startswith(b"HTTP/1.1 400 "), (nomination, raw[:60])
                    assert b"connection: close\r\n" in raw and raw.count(b"HTTP/1.1 ") == 1
                assert target_requests(b) == []

    run(body())


def test_response_connection_nominating_content_length_is_502_and_the_connection_dropped() -> None:
    def script(method: bytes, target: bytes, headers: object, body: bytes) -> list[tuple[float, bytes]] | None:
        if target == b"/nominate":
            return [(0.0, b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello")]
        if target == b"/nominate-te":
            return [
                (
                    0.0,
                    b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n",
                )
            ]
        return None

    async def body() -> None:
        async with backend("record", script=script) as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    for path in ("/nominate", "/nominate-te"):
                        client.send(build_request("GET", path))
                        response = await client.response(timeout=3)
                        assert response.status == 502, (path, response)
                        # The connection goes on (the request was whole); the next answer is its own.
                        client.send(build_request("GET", "/next"))
                        assert (await client.response(timeout=3)).body == b"GET /next"
                # Each bad response cost its upstream connection: never reused.
                assert b.stats.connections >= 3

    run(body())


# --- 2. Upgrade with a body ------------------------------------------------------------------


def test_websocket_upgrade_with_a_body_is_400_and_reaches_no_target() -> None:
    async def body() -> None:
        async with backend("record") as b:
            (table,) = guarded(b)
            async with proxy(table) as (_, port):  # type: ignore[arg-type]
                for framing, payload in (
                    (b"Content-Length: %d\r\n" % len(HIDDEN), HIDDEN),
                    (b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN)),
                ):
                    request = (
                        b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                        + framing
                        + b"\r\n"
                        + payload
                    )
                    async with await Client.open(port) as client:
                        client.send(request)
                        raw = await client.read_raw(timeout=3)
                    assert raw.startswith(b"HTTP/1.1 400 "), raw[:80]
                assert target_requests(b) == []

    run(body())


def test_other_upgrade_with_a_body_is_forwarded_framed_without_the_upgrade() -> None:
    """curl --http2 -d … on http:// sends exactly this (Upgrade: h2c on a POST)."""

    async def body() -> None:
        async with backend("record") as b:
            (table,) = guarded(b)
            async with proxy(table) as (_, port):  # type: ignore[arg-type]
                for framing, payload in (
                    (b"Content-Length: %d\r\n" % len(HIDDEN), HIDDEN),
                    (b"Transfer-Encoding: chunked\r\n", b"%x\r\n%s\r\n0\r\n\r\n" % (len(HIDDEN), HIDDEN)),
                ):
                    request = (
                        b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n" + framing + b"\r\n" + payload
                    )
                    async with await Client.open(port) as client:
                        client.send(request + build_request("GET", "/next"))
                        first = await client.response(timeout=3)
                        second = await client.response(timeout=3)
                    assert (first.status, first.body) == (200, b"POST /up")
                    assert (second.status, second.body) == (200, b"GET /next")
                stream = parse_stream(bytes(b"".join(b.stats.raw)))
                assert stream.error is None and stream.rest == b""
                assert [(r.method, r.target, r.body) for r in stream.requests] == [
                    (b"POST", b"/up", HIDDEN),
                    (b"GET", b"/next", b""),
                ] * 2
                assert all(r.header(b"upgrade") is None for r in stream.requests)

    run(body())


# --- 3. Bytes a target sends that nobody asked for ---------------------------------------

EXTRA = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nhidden"


def test_a_late_extra_response_never_reaches_a_client_and_poisons_its_connection() -> None:
    variants: dict[bytes, list[tuple[float, bytes]]] = {
        b"/same-write": [(0.0, echo_response(b"GET", b"/same-write") + EXTRA)],
        b"/partial": [(0.0, echo_response(b"GET", b"/partial") + EXTRA[:20]), (0.05, EXTRA[20:])],
        b"/one-byte": [(0.0, echo_response(b"GET", b"/one-byte") + b"H"), (0.05, EXTRA[1:])],
        b"/while-idle": [(0.0, echo_response(b"GET", b"/while-idle")), (0.02, EXTRA)],
    }

    def script(method: bytes, target: bytes, headers: object, body: bytes) -> list[tuple[float, bytes]] | None:
        return variants.get(target)

    async def body() -> None:
        async with backend("record", script=script) as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                for path in variants:
                    async with await Client.open(port) as client:
                        assert (await client.request("GET", path.decode())).body == b"GET " + path
                        if path == b"/while-idle":
                            await asyncio.sleep(0.1)
                        assert (await client.request("GET", "/next")).body == b"GET /next", path
                        await asyncio.sleep(0.1)
                        assert (await client.request("GET", "/next2")).body == b"GET /next2", path
                        assert b"hidden" not in client.raw

    run(body(), timeout=30)


def test_bytes_after_the_head_of_a_response_to_head_poison_the_connection() -> None:
    extra = b"HTTP/1.1 200 OK\r\nx: hidden\r\n"  # ends with a line: the old check took it for the head's end

    def script(method: bytes, target: bytes, headers: object, body: bytes) -> list[tuple[float, bytes]] | None:
        if method == b"HEAD":
            return [
                (0.0, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n" + extra),
                (0.1, b"content-length: 6\r\n\r\nhidden"),
            ]
        return None

    async def body() -> None:
        async with backend("record", script=script) as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    assert (await client.request("HEAD", "/h")).header("content-length") == b"5"
                    await asyncio.sleep(0.01)
                    assert (await client.request("GET", "/next")).body == b"GET /next"
                    await asyncio.sleep(0.15)
                    assert (await client.request("GET", "/next2")).body == b"GET /next2"
                    assert b"hidden" not in client.raw

    run(body())


def test_extra_bytes_pending_on_an_idle_connection_are_seen_before_it_is_reused() -> None:
    """The target's stray bytes and the client's next request arrive in the same
    loop iteration, the request first: the idle connection must not be reused."""

    async def body() -> None:
        async with backend("record") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    assert (await client.request("GET", "/first")).body == b"GET /first"
                    await asyncio.sleep(0.05)  # the upstream connection is idle in its pool
                    # Both writes reach lb's sockets before its loop reads either.
                    client.send(build_request("GET", "/next"))
                    b.protocols[0].transport.write(EXTRA)
                    assert (await client.response(timeout=3)).body == b"GET /next"
                    assert b"hidden" not in client.raw

    run(body())

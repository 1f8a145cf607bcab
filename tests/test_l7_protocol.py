"""lb.l7.client without sockets: bytes in through data_received, bytes out of a fake transport.

The worker is real but never started (nothing is bound); upstream
connections are real :class:`UpstreamConnection` objects on fake transports,
put in the pool by hand, so a whole proxied exchange runs in memory.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lb import model as m
from lb.l7.client import ClientProtocol
from lb.l7.config import L7Config
from lb.l7.table import GroupTargets, RoutingTable
from lb.l7.upstream import UpstreamConnection
from lb.l7.worker import Worker

LOCAL = ipaddress.ip_address("127.0.0.1")
DATE = re.compile(rb"date: [^\r]*\r\n")


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] = ("192.0.2.7", 50000), local: tuple[str, int] = ("127.0.0.1", 8080)):
        super().__init__()
        self.extra = {"peername": peer, "sockname": local}
        self.written: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.eof = False
        self.reading = True
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written.append(bytes(data))

    def writelines(self, data: Any) -> None:
        for piece in data:
            self.write(piece)

    def data(self) -> bytes:
        out = b"".join(self.written)
        self.written.clear()
        return out

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading


def listener(action: m.Action, rules: tuple[m.Rule, ...] = ()) -> m.Listener:
    return m.Listener("web", m.Protocol.HTTP, LOCAL, 8080, action, rules)


def forward(*names: str) -> m.ForwardAction:
    return m.ForwardAction(tuple(m.WeightedTargetGroup(n) for n in names))


def group(name: str = "g", *endpoints: tuple[str, int, int], sticky: bool = False) -> GroupTargets:
    stickiness = m.Stickiness(enabled=sticky)
    return GroupTargets(m.TargetGroup(name, m.Protocol.HTTP, 80, stickiness=stickiness), tuple(endpoints))


class Harness:
    """A worker that is never started, and helpers to open fake connections."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: RoutingTable, config: L7Config | None = None):
        self.loop = loop
        self.worker = Worker(table, config or L7Config(), loop, b"k" * 32)
        self.upstreams: list[tuple[UpstreamConnection, FakeTransport]] = []

    def client(self, **kw: Any) -> tuple[ClientProtocol, FakeTransport]:
        protocol = ClientProtocol(self.worker, "web")
        transport = FakeTransport(**kw)
        protocol.connection_made(transport)
        return protocol, transport

    def upstream(self, address: str = "10.0.0.1", port: int = 80) -> tuple[UpstreamConnection, FakeTransport]:
        """An idle pooled connection to address:port on a fake transport."""
        pool = self.worker.pools.get(address, port)
        conn = UpstreamConnection(pool)
        transport = FakeTransport()
        conn.connection_made(transport)
        pool.connections += 1
        pool.idle.append(conn)
        self.upstreams.append((conn, transport))
        return conn, transport


@pytest.fixture
def run() -> Iterator[Callable[[Callable[[asyncio.AbstractEventLoop], Any]], Any]]:
    loop = asyncio.new_event_loop()

    def runner(fn: Callable[[asyncio.AbstractEventLoop], Any]) -> Any:
        async def main() -> Any:
            return fn(loop)

        return loop.run_until_complete(main())

    yield runner
    loop.close()


def fixed_table(status: int = 200, body: str = "hello", content_type: str = "text/plain") -> RoutingTable:
    return RoutingTable((listener(m.FixedResponseAction(status, content_type, body)),))


def no_date(data: bytes) -> bytes:
    return DATE.sub(b"", data)


# --- local answers --------------------------------------------------------------


def test_fixed_response_exact_bytes(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        client, t = Harness(loop, fixed_table(503, "down for maintenance")).client()
        client.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        out = t.data()
        assert DATE.search(out)
        assert no_date(out) == (
            b"HTTP/1.1 503 Service Unavailable\r\nserver: lb\r\n"
            b"content-type: text/plain; charset=utf-8\r\ncontent-length: 20\r\n\r\n"
            b"down for maintenance"
        )
        assert not t.closed

    run(body)


def test_fixed_response_head_has_no_body_and_http10_keep_alive(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        client, t = Harness(loop, fixed_table(200, "{}", "application/json")).client()
        client.data_received(b"HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert no_date(t.data()) == (
            b"HTTP/1.1 200 OK\r\nserver: lb\r\ncontent-type: application/json; charset=utf-8\r\n"
            b"content-length: 2\r\nconnection: keep-alive\r\n\r\n"
        )
        client.data_received(b"GET / HTTP/1.0\r\n\r\n")  # 1.0 without keep-alive: close after
        assert no_date(t.data()).endswith(b"connection: close\r\n\r\n{}")
        assert t.closed

    run(body)


REDIRECTS = [
    # (action, request target, Host, expected Location)
    (
        m.RedirectAction(301, protocol="HTTPS"),
        "/a/b?x=1",
        "example.com",
        b"https://example.com:8080/a/b?x=1",
    ),  # port kept
    (m.RedirectAction(302, host="new.example.org"), "/p", "example.com:8080", b"http://new.example.org:8080/p"),
    (m.RedirectAction(301, port="80"), "/", "h", b"http://h/"),
    (
        m.RedirectAction(301, protocol="HTTPS", port="443", path="/new/#{path}", query="q=#{query}&z"),
        "/old?a=b",
        "h",
        b"https://h/new/old?q=a=b&z",
    ),
    (
        m.RedirectAction(301, host="#{host}.eu", query=""),
        "/x?drop=me",
        "shop.example",
        b"http://shop.example.eu:8080/x",
    ),
    (m.RedirectAction(302, path="/#{host}/#{port}/#{protocol}"), "/", "h", b"http://h:8080/h/8080/http"),
]


@pytest.mark.parametrize("action,target,host,location", REDIRECTS)
def test_redirect_exact_bytes(run: Any, action: m.RedirectAction, target: str, host: str, location: bytes) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        client, t = Harness(loop, RoutingTable((listener(action),))).client()
        client.data_received(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status = b"301 Moved Permanently" if action.status_code == 301 else b"302 Found"
        html = (
            b"<html>\r\n<head><title>%s</title></head>\r\n<body>\r\n<center><h1>%s</h1></center>\r\n</body>\r\n</html>\r\n"
            % (status, status)
        )
        assert no_date(t.data()) == (
            b"HTTP/1.1 " + status + b"\r\nserver: lb\r\ncontent-type: text/html\r\n"
            b"content-length: %d\r\nlocation: %s\r\n\r\n%s" % (len(html), location, html)
        )

    run(body)


# --- self-generated errors and request smuggling --------------------------------

REJECTED = [
    (
        "CL and TE",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "TE and CL",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("duplicate CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    ("conflicting CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde", 400),
    ("CL list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 5\r\n\r\nabcde", 400),
    ("non-numeric CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3x\r\n\r\nabc", 400),
    ("negative CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    ("obs-fold tab", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\tc\r\n\r\n", 400),
    ("space in name", b"GET / HTTP/1.1\r\nHost: a\r\nX A: b\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
    ("bad name char", b"GET / HTTP/1.1\r\nHost: a\r\nX(A): b\r\n\r\n", 400),
    ("control char in value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x01\r\n\r\n", 400),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    (
        "TE chunked twice",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("two Host", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # Host = uri-host [ ":" port ] (RFC 9110 7.2, RFC 3986 3.2.2); anything else is 400,
    # so what #{host} copies into a redirect's Location is always an authority.
    ("Host with a path", b"GET / HTTP/1.1\r\nHost: evil.example/x?\r\n\r\n", 400),
    ("Host with userinfo", b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", 400),
    ("Host with a space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("Host with a tab", b"GET / HTTP/1.1\r\nHost: a\tb\r\n\r\n", 400),
    ("Host with a fragment", b"GET / HTTP/1.1\r\nHost: a#b\r\n\r\n", 400),
    ("Host with 8-bit bytes", b"GET / HTTP/1.1\r\nHost: a\x85b\r\n\r\n", 400),
    ("Host with a bad port", b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n", 400),
    ("Host with two ports", b"GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\n", 400),
    ("Host IPv6 unbracketed", b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", 400),
    ("Host IPv6 bad", b"GET / HTTP/1.1\r\nHost: [x::1]\r\n\r\n", 400),
    ("no Host in 1.1", b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400),
    ("bare LF", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("not HTTP", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    ("TE gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("TE gzip, chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    ("TRACE", b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", 405),
    ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    ("HTTP/3.0", b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505),
    ("HTTP/0.9", b"GET /\r\n\r\n", 505),
    ("request line over 16 KiB", b"GET /" + b"a" * 16400 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("header over 16 KiB", b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 16400 + b"\r\n\r\n", 400),
    (
        "headers over 64 KiB",
        b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"c" * 8000) for i in range(9)) + b"\r\n",
        400,
    ),
]


@pytest.mark.parametrize("host", [b"a", b"a.example:8080", b"10.0.0.1:80", b"[::1]:80", b"[::ffff:10.0.0.1]", b"xn--bcher-kva.example", b"a:", b""])
def test_a_host_that_is_an_authority_is_forwarded_as_received(run: Any, host: bytes) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = Harness(loop, RoutingTable((listener(forward("g")),), (group("g", ("10.0.0.1", 80, 1)),)))
        _, up = h.upstream()
        client, t = h.client()
        client.data_received(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert b"\r\nHost: " + host + b"\r\n" in up.data()
        assert t.data() == b""

    run(body)


@pytest.mark.parametrize("name,payload,status", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_requests_answer_and_close(run: Any, name: str, payload: bytes, status: int) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = Harness(loop, RoutingTable((listener(forward("g")),), (group("g", ("10.0.0.1", 80, 1)),)))
        _, up = h.upstream()
        client, t = h.client()
        client.data_received(payload)
        out = t.data()
        assert out.startswith(b"HTTP/1.1 %d " % status), out[:80]
        assert b"connection: close\r\n" in out
        assert t.eof or t.closed  # half-closed to linger, or closed
        if name == "bad chunk size":  # the head went out before the body went bad
            assert up.aborted and up.data().startswith(b"POST / ")
        else:
            assert up.data() == b""  # nothing reached the target
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # ignored from now on
        assert t.data() == b"" and up.data() == b""

    run(body)


def test_head_split_over_many_reads_is_bounded(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        client, t = Harness(loop, fixed_table()).client()
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: ")
        for _ in range(100):  # an endless header value, 8 KiB at a time
            client.data_received(b"v" * 8192)
            if t.written:
                break
        assert t.data().startswith(b"HTTP/1.1 400 ")

    run(body)


def test_no_targets_is_503_and_keeps_the_connection(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        client, t = Harness(loop, RoutingTable((listener(forward("g")),), (group("g"),))).client()
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert t.data().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert not t.closed
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert t.data().startswith(b"HTTP/1.1 503 ")

    run(body)


def test_unknown_group_is_503(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        client, t = Harness(loop, RoutingTable((listener(forward("missing")),))).client()
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert t.data().startswith(b"HTTP/1.1 503 ")

    run(body)


def test_pipelined_local_answers_in_order(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        rules = tuple(
            m.Rule(
                i, (m.Condition(m.ConditionField.PATH_PATTERN, (f"/{i}",)),), m.FixedResponseAction(200, body=f"r{i}")
            )
            for i in range(1, 4)
        )
        client, t = Harness(loop, RoutingTable((listener(m.FixedResponseAction(404), rules),))).client()
        client.data_received(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in (3, 1, 2, 9)))
        bodies = re.findall(rb"\r\n\r\n(r\d|)", t.data())
        assert bodies == [b"r3", b"r1", b"r2", b""]

    run(body)


def test_deep_pipeline_does_not_recurse(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        client, t = Harness(loop, fixed_table(200, "k")).client()
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 5000)
        assert t.data().count(b"HTTP/1.1 200 OK") == 5000
        assert t.reading  # the queue drained: reading resumed

    run(body)


# --- proxied exchanges, in memory ----------------------------------------------------


def proxy_harness(loop: asyncio.AbstractEventLoop, **group_kw: Any) -> Harness:
    table = RoutingTable((listener(forward("g")),), (group("g", ("10.0.0.1", 80, 1), **group_kw),))
    return Harness(loop, table)


def test_request_head_forwarded_headers_and_hop_by_hop(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = proxy_harness(loop)
        _, up = h.upstream()
        client, _ = h.client()
        client.data_received(
            b"GET /p?q=1 HTTP/1.1\r\nHost: shop.example\r\nConnection: keep-alive, X-Secret\r\n"
            b"Keep-Alive: timeout=5\r\nX-Secret: s\r\nTE: trailers\r\nProxy-Connection: x\r\n"
            b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Port: 1\r\n"
            b"Upgrade: h2c\r\nAccept: */*\r\n\r\n"
        )
        assert re.fullmatch(
            rb"GET /p\?q=1 HTTP/1.1\r\nHost: shop.example\r\nAccept: \*/\*\r\n"
            rb"x-forwarded-for: 203.0.113.9, 192.0.2.7\r\n"
            rb"x-forwarded-proto: http\r\nx-forwarded-port: 8080\r\nx-request-id: [0-9a-f]{32}\r\n\r\n",
            up.data(),
        ), up.data()

    run(body)


def test_response_relayed_without_hop_by_hop(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = proxy_harness(loop)
        conn, up = h.upstream()
        client, t = h.client()
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert up.data().startswith(b"GET / HTTP/1.1\r\nHost: a\r\nx-forwarded-for: 192.0.2.7\r\n")
        conn.data_received(
            b"HTTP/1.1 200 Fine\r\nServer: s\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n"
            b"X-Hop: 1\r\nContent-Length: 5\r\n\r\nhello"
        )
        assert t.data() == b"HTTP/1.1 200 Fine\r\nServer: s\r\nContent-Length: 5\r\n\r\nhello"
        pool = h.worker.pools.get("10.0.0.1", 80)
        assert pool.idle == [conn] and pool.outstanding == 0  # back in the pool

    run(body)


def test_chunked_both_ways(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = proxy_harness(loop)
        conn, up = h.upstream()
        client, t = h.client()
        client.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        assert up.data().endswith(b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        client.data_received(b"2;ext=1\r\nde\r\n0\r\nTrailer: x\r\n\r\n")
        assert up.data() == b"2\r\nde\r\n0\r\n\r\n"
        conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwxyz\r\n")
        assert t.data() == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwxyz\r\n"
        conn.data_received(b"0\r\n\r\n")
        assert t.data() == b"0\r\n\r\n"

    run(body)


def test_close_delimited_response_to_http10_and_http11(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = proxy_harness(loop)
        conn, _ = h.upstream()
        client, t = h.client()
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        conn.data_received(b"HTTP/1.0 200 OK\r\n\r\nsome")
        conn.connection_lost(None)
        assert t.data() == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nsome\r\n0\r\n\r\n"
        assert not t.closed
        conn, _ = h.upstream()
        client.data_received(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        conn.data_received(b"HTTP/1.0 200 OK\r\n\r\nmore")
        conn.connection_lost(None)
        assert t.data() == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nmore"
        assert t.closed

    run(body)


def test_expect_100_continue_is_relayed(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = proxy_harness(loop)
        conn, up = h.upstream()
        client, t = h.client()
        client.data_received(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        assert b"Expect: 100-continue\r\n" in up.data()
        conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert t.data() == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.data_received(b"abc")
        assert up.data() == b"abc"
        conn.data_received(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        assert t.data() == b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"

    run(body)


def test_head_response_ends_at_its_head(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = proxy_harness(loop)
        conn, _ = h.upstream()
        client, t = h.client()
        client.data_received(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        assert t.data() == b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # the same upstream connection again
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert t.data().endswith(b"\r\n\r\nok")

    run(body)


def test_malformed_response_is_502(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = proxy_harness(loop)
        conn, up = h.upstream()
        client, t = h.client()
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        conn.data_received(b"SSH-2.0-OpenSSH\r\n\r\n")
        assert t.data().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert up.closed and not t.closed

    run(body)


def test_pipelined_requests_are_forwarded_one_at_a_time(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = proxy_harness(loop)
        conn, up = h.upstream()
        client, t = h.client()
        client.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert up.data().startswith(b"GET /1 ")
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
        assert up.data().startswith(b"GET /2 ")  # only after the first answer, on the same connection
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
        assert re.findall(rb"\r\n\r\n(\d)", t.data()) == [b"1", b"2"]

    run(body)


def test_backpressure_both_ways(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = proxy_harness(loop)
        conn, up = h.upstream()
        client, t = h.client()
        client.data_received(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        conn.pause_writing()  # the target's socket is full: stop reading the client
        assert not t.reading
        conn.resume_writing()
        assert t.reading
        client.pause_writing()  # the client's socket is full: stop reading the target, and the client
        assert not up.reading and not t.reading
        client.resume_writing()
        assert up.reading and t.reading
        conn.pause_writing()
        conn.connection_lost(ConnectionResetError())  # the target fails while it held the client paused
        assert t.data().startswith(b"HTTP/1.1 502 ")
        assert t.reading or t.eof  # not left paused forever

    run(body)


def test_body_buffered_before_upstream_pauses_reading(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        h = proxy_harness(loop)
        conn, up = h.upstream()
        client, t = h.client()
        client.data_received(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert up.data().startswith(b"GET /1 ")
        # pipelined behind /1: its body is held, and past the high-water mark reading stops
        client.data_received(b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n" + b"x" * 70000)
        assert not t.reading
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        sent = up.data()
        assert sent.startswith(b"POST /2 ") and sent.endswith(b"\r\n\r\n" + b"x" * 70000)  # held body with /2's head
        assert t.reading

    run(body)


def test_stickiness_cookie_set_and_followed(run: Any) -> None:
    def body(loop: asyncio.AbstractEventLoop) -> None:
        table = RoutingTable(
            (listener(forward("g")),), (group("g", ("10.0.0.1", 80, 1), ("10.0.0.2", 80, 1), sticky=True),)
        )
        h = Harness(loop, table)
        conns = {addr: h.upstream(addr) for addr in ("10.0.0.1", "10.0.0.2")}
        client, t = h.client()
        client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        chosen = next(a for a, (_, up) in conns.items() if up.written)
        conns[chosen][1].data()
        conns[chosen][0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        cookie = re.search(rb"set-cookie: AWSALB=([^;]+); Expires=[^;]+; Path=/\r\n", t.data())
        assert cookie
        for _ in range(5):
            client.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nCookie: x=1; AWSALB=" + cookie.group(1) + b"\r\n\r\n")
            assert conns[chosen][1].data()  # the same target every time
            conns[chosen][0].data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            assert b"set-cookie: AWSALB=" in t.data()

    run(body)

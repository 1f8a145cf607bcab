"""lb.l7.server end to end: real sockets on 127.0.0.1, real backends.

Most tests run the proxy with :func:`serve` inside the test's own loop; the
last ones start :class:`L7Server` worker processes (SO_REUSEPORT, spawn).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import resource
import ssl
from collections import Counter
from pathlib import Path

import pytest

from lb import config as configmod
from lb import model as m
from lb.l7.config import L7Config
from lb.l7.server import L7Server
from lb.l7.table import RoutingTable
from tests.l7_backends import (
    HOST,
    Client,
    ThreadedBackends,
    backend,
    build_request,
    decode_frame,
    encode_frame,
    forward_to,
    http_listener,
    parse_access_line,
    proxy,
    routing_table,
    run,
    target_group,
)
from tests.tls_certs import Certs

PAGE = resource.getpagesize()


# The tests that take `scheme` run over plain HTTP and over an HTTPS listener
# (TLS terminated by lb, the same rules and actions).
@pytest.fixture(scope="module")
def tls_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[m.ListenerTls, ssl.SSLContext]:
    certs = Certs(tmp_path_factory.mktemp("certs"))
    return certs.listener_tls("example.com", others=(("shop.example",),)), certs.client()


@pytest.fixture(params=["http", "https"])
def scheme(request: pytest.FixtureRequest, tls_setup: tuple[m.ListenerTls, ssl.SSLContext]) -> Scheme:
    return Scheme(request.param, *tls_setup)


class Scheme:
    def __init__(self, name: str, listener_tls: m.ListenerTls, client: ssl.SSLContext) -> None:
        self.name = name
        self.tls = listener_tls if name == "https" else None
        self.client = client if name == "https" else None

    def listener(self, action: m.Action, rules: tuple[m.Rule, ...] = ()) -> m.Listener:
        return http_listener(action, rules, tls=self.tls)

    async def open(self, port: int) -> Client:
        return await Client.open(port, ssl=self.client, server_hostname="example.com")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def test_routing_table_build_and_pickle() -> None:
    import ipaddress
    import pickle

    web = m.TargetGroup(
        "web",
        m.Protocol.HTTP,
        8080,
        (m.Target(ipaddress.ip_address("10.0.0.1")), m.Target(ipaddress.ip_address("10.0.0.2"), 81, 3)),
    )
    tcp = m.TargetGroup("db", m.Protocol.TCP, 5432)
    http = m.Listener("web", m.Protocol.HTTP, ipaddress.ip_address("10.0.0.100"), 80, forward_to("web"))
    l4 = m.Listener("db", m.Protocol.TCP, ipaddress.ip_address("10.0.0.100"), 5432, forward_to("db"))
    lb = m.LoadBalancer("lb", (http, l4), (web, tcp), idle_timeout=7, workers=3)
    table = RoutingTable.build(lb)
    assert table.listeners == (http,) and table.idle_timeout == 7.0
    web_entry = table.group("web")
    assert web_entry is not None and table.group("db") is None
    assert web_entry.in_service == (("10.0.0.1", 8080, 1), ("10.0.0.2", 81, 3))
    later = RoutingTable.build(lb, {"web": [("10.0.0.2", 81, 3)]}, {"web": [("10.0.0.1", 8080)]}, version=2)
    entry = later.group("web")
    assert entry is not None and entry.in_service == (("10.0.0.2", 81, 3),) and entry.draining == {("10.0.0.1", 8080)}
    assert pickle.loads(pickle.dumps(later)) == later
    assert L7Config.for_load_balancer(lb, connect_timeout=1.0) == L7Config(workers=3, connect_timeout=1.0)
    strict = configmod.loads(
        '[load_balancer]\nname = "x"\nheader_timeout = 5\nbody_timeout = 6\nmin_body_rate = 7\n'
        "max_response_head = 8192\n"
    )
    assert L7Config.for_load_balancer(strict) == L7Config(
        header_timeout=5, body_timeout=6, min_body_rate=7, max_response_head=8192
    )


# --- keep-alive, pipelining, bodies ----------------------------------------------------


def test_keep_alive_both_sides_and_forwarded_headers(scheme: Scheme) -> None:
    async def body() -> None:
        async with backend("http", "b1") as b:
            table = routing_table(scheme.listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await scheme.open(port) as client:
                    for i in range(10):
                        response = await client.request(
                            "GET",
                            f"/p/{i}?q=1",
                            {"X-Forwarded-For": "203.0.113.5", "Connection": "keep-alive, X-Drop", "X-Drop": "1"},
                            host="shop.example:8443",
                        )
                        assert response.status == 200 and response.header("x-backend") == b"b1"
                        seen = response.json()
                        headers = {name.lower(): value for name, value in seen["headers"]}
                        assert seen["url"] == f"/p/{i}?q=1"
                        assert headers["host"] == "shop.example:8443"  # preserved
                        assert headers["x-forwarded-for"] == f"203.0.113.5, {HOST}"
                        assert headers["x-forwarded-proto"] == scheme.name
                        assert headers["x-forwarded-port"] == str(port)
                        assert "connection" not in headers and "x-drop" not in headers
                assert b.stats.connections == 1 and b.stats.requests == 10

    run(body())


def test_pipelined_requests_answered_in_order() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    paths = ["/slow?ms=30", "/a", "/status/404", "/b", "/chunked?n=2", "/c"]
                    client.send(b"".join(build_request("GET", p) for p in paths))
                    responses = [await client.response() for _ in paths]
                    assert [r.status for r in responses] == [200, 200, 404, 200, 200, 200]
                    assert [responses[i].json()["url"] for i in (0, 1, 3, 5)] == ["/slow?ms=30", "/a", "/b", "/c"]
                    assert responses[4].body == b"chunk0;chunk1;"

    run(body())


def test_chunked_request_and_response_bodies() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    client.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
                    for size in (1, 1000, 70000):
                        client.send(b"%x\r\n%s\r\n" % (size, b"u" * size))
                        await asyncio.sleep(0.01)
                    client.send(b"0\r\n\r\n")
                    assert (await client.response()).json()["body_len"] == 71001
                    response = await client.request("GET", "/chunked?n=4")
                    assert response.header("transfer-encoding") == b"chunked"
                    assert response.body == b"chunk0;chunk1;chunk2;chunk3;"
                    response = await client.request("GET", "/http10")  # close-delimited from the target
                    assert (
                        response.body == b"close-delimited body" and response.header("transfer-encoding") == b"chunked"
                    )
                    assert (await client.request()).status == 200

    run(body())


def test_expect_100_continue() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    client.send(b"PUT /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
                    interim = await client.response()
                    assert interim.status == 100
                    client.send(b"12345")
                    final = await client.response()
                    assert final.status == 200 and final.json()["body_len"] == 5

    run(body())


SIZE = 1024 * 1024 * 1024  # 1 GiB each way


def test_large_upload_and_download_stream_with_flat_memory() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                peak = [0]
                baseline = rss()

                async def sample() -> None:
                    while True:
                        peak[0] = max(peak[0], rss() - baseline)
                        await asyncio.sleep(0.01)

                sampler = asyncio.get_running_loop().create_task(sample())
                try:
                    reader, writer = await asyncio.open_connection(HOST, port)
                    writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % SIZE)
                    block = b"u" * (1 << 20)
                    for _ in range(SIZE // len(block)):
                        writer.write(block)
                        await writer.drain()
                    head = await reader.readuntil(b"\r\n\r\n")
                    found = re.search(rb"content-length: (\d+)", head)
                    assert found is not None
                    length = int(found.group(1))
                    assert b'"body_len": %d' % SIZE in await reader.readexactly(length)

                    writer.write(b"GET /download?size=%d HTTP/1.1\r\nHost: a\r\n\r\n" % SIZE)
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert b"content-length: %d" % SIZE in head
                    received = 0
                    while received < SIZE:
                        received += len(await reader.read(1 << 20))
                    assert received == SIZE
                    writer.close()
                    await writer.wait_closed()
                finally:
                    sampler.cancel()
                assert peak[0] < 64 * 1024 * 1024, f"memory grew by {peak[0] >> 20} MiB"
                assert b.stats.upload_bytes == SIZE

    run(body(), timeout=50)


SELF_GENERATED = [
    (
        "CL+TE smuggling",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        400,
    ),
    ("conflicting CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    ("non-numeric CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n", 400),
    ("invalid header name", b"GET / HTTP/1.1\r\nHost: a\r\nBad[Name]: 1\r\n\r\n", 400),
    ("TRACE", b"TRACE / HTTP/1.1\r\nHost: a\r\n\r\n", 405),
    ("TE gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
]


@pytest.mark.parametrize("name,payload,status", SELF_GENERATED, ids=[c[0] for c in SELF_GENERATED])
def test_self_generated_errors_over_sockets(name: str, payload: bytes, status: int) -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    assert (await client.request()).status == 200  # a good request first, same connection
                    client.send(payload + build_request("GET", "/smuggled"))
                    raw = await client.read_raw(timeout=3)
                assert raw.startswith(b"HTTP/1.1 %d " % status) and b"connection: close\r\n" in raw
                assert raw.count(b"HTTP/1.1 ") == 1  # nothing after it: the connection closed
                assert b.stats.requests == 1  # the target saw only the good request

    run(body())


def test_fixed_response_and_redirect_exact_bytes_over_sockets() -> None:
    async def body() -> None:
        listener = rules_listener(
            m.Rule(
                1,
                (m.Condition(m.ConditionField.PATH_PATTERN, ("/moved",)),),
                m.RedirectAction(302, protocol="HTTPS", port="443"),
            ),
        )
        async with proxy(routing_table(listener)) as (_, port):
            async with await Client.open(port) as client:
                client.send(
                    build_request("GET", "/nope") + build_request("GET", "/moved?a=1", host=f"h.example:{port}")
                )
                await client.response()
                await client.response()
        date = rb"date: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n"
        html = (
            b"<html>\r\n<head><title>302 Found</title></head>\r\n<body>\r\n"
            b"<center><h1>302 Found</h1></center>\r\n</body>\r\n</html>\r\n"
        )
        expected = (
            re.escape(
                b"HTTP/1.1 404 Not Found\r\nserver: lb\r\n"
                b"content-type: text/plain; charset=utf-8\r\ncontent-length: 8\r\n"
            )
            + date
            + re.escape(b"\r\nno route")
            + re.escape(
                b"HTTP/1.1 302 Found\r\nserver: lb\r\ncontent-type: text/html\r\ncontent-length: %d\r\n" % len(html)
            )
            + date
            + re.escape(b"location: https://h.example/moved?a=1\r\n\r\n" + html)
        )
        assert re.fullmatch(expected, client.raw), client.raw

    run(body())


# --- routing: rules, actions, weights, stickiness ------------------------------------------


def rules_listener(*rules: m.Rule, listener_tls: m.ListenerTls | None = None) -> m.Listener:
    return http_listener(m.FixedResponseAction(404, "text/plain", "no route"), rules, tls=listener_tls)


def test_rules_route_to_forward_fixed_response_and_redirect(scheme: Scheme) -> None:
    async def body() -> None:
        async with backend("http", "api") as api:

            def path(pattern: str) -> tuple[m.Condition, ...]:
                return (m.Condition(m.ConditionField.PATH_PATTERN, (pattern,)),)

            listener = rules_listener(
                m.Rule(10, path("/api/*"), forward_to("api")),
                m.Rule(20, path("/health"), m.FixedResponseAction(200, "application/json", '{"ok":true}')),
                m.Rule(30, path("/old/*"), m.RedirectAction(301, path="/new/#{path}")),
                listener_tls=scheme.tls,
            )
            table = routing_table(listener, (target_group("api", api),))
            async with proxy(table) as (_, port):
                async with await scheme.open(port) as client:
                    assert (await client.request("GET", "/api/v1")).json()["backend"] == "api"
                    health = await client.request("GET", "/health")
                    assert (health.status, health.body) == (200, b'{"ok":true}')
                    assert health.header("content-type") == b"application/json; charset=utf-8"
                    moved = await client.request("GET", "/old/page?x=1", host="h")
                    assert moved.status == 301
                    assert moved.header("location") == b"%s://h:%d/new/old/page?x=1" % (scheme.name.encode(), port)
                    assert (await client.request("GET", "/nowhere")).body == b"no route"

    run(body())


def test_weighted_target_groups_split_1000_requests() -> None:
    async def body() -> None:
        async with backend("http", "blue") as blue, backend("http", "green") as green:
            listener = http_listener(forward_to(("blue", 3), ("green", 1)))
            table = routing_table(listener, (target_group("blue", blue), target_group("green", green)))
            async with proxy(table) as (_, port):
                counts: Counter[bytes] = Counter()

                async def client_loop() -> None:
                    async with await Client.open(port) as client:
                        for _ in range(125):
                            counts[(await client.request()).header("x-backend") or b"?"] += 1

                await asyncio.gather(*(client_loop() for _ in range(8)))
                assert sum(counts.values()) == 1000
                assert 690 <= counts[b"blue"] <= 810, counts  # 750 expected, > 4 sigma of room

    run(body())


def test_lb_cookie_stickiness_and_rewrite_when_target_leaves() -> None:
    async def body() -> None:
        async with backend("http", "one") as one, backend("http", "two") as two:
            listener = http_listener(forward_to("g"))
            async with proxy(routing_table(listener, (target_group("g", one, two, sticky=600),))) as (worker, port):
                async with await Client.open(port) as client:
                    first = await client.request()
                    cookie = re.match(rb"AWSALB=([^;]+);", first.header("set-cookie") or b"")
                    assert cookie
                    chosen = first.header("x-backend")
                    for _ in range(10):
                        again = await client.request("GET", "/", {"Cookie": f"AWSALB={cookie.group(1).decode()}"})
                        assert again.header("x-backend") == chosen
                    # the chosen target leaves: its cookie is ignored and replaced
                    stay = two if chosen == b"one" else one
                    await worker.update(routing_table(listener, (target_group("g", stay, sticky=600),), version=2))
                    moved = await client.request("GET", "/", {"Cookie": f"AWSALB={cookie.group(1).decode()}"})
                    assert moved.header("x-backend") == stay.name.encode()
                    new_cookie = re.match(rb"AWSALB=([^;]+);", moved.header("set-cookie") or b"")
                    assert new_cookie and new_cookie.group(1) != cookie.group(1)

    run(body())


def test_group_stickiness_keeps_a_client_on_one_group() -> None:
    async def body() -> None:
        async with backend("http", "a") as a, backend("http", "b") as b:
            listener = http_listener(forward_to(("a", 1), ("b", 1), stickiness=300))
            table = routing_table(listener, (target_group("a", a), target_group("b", b)))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    first = await client.request()
                    cookie = re.match(rb"AWSALBTG=([^;]+);", first.header("set-cookie") or b"")
                    assert cookie
                    seen = {
                        (await client.request("GET", "/", {"Cookie": f"AWSALBTG={cookie.group(1).decode()}"})).header(
                            "x-backend"
                        )
                        for _ in range(20)
                    }
                    assert seen == {first.header("x-backend")}

    run(body())


def test_draining_targets_get_no_new_requests() -> None:
    async def body() -> None:
        async with backend("http", "live") as live, backend("http", "leaving") as leaving:
            group = target_group("g", live, leaving, draining=((HOST, leaving.port),))
            async with proxy(routing_table(http_listener(forward_to("g")), (group,))) as (_, port):
                async with await Client.open(port) as client:
                    seen = {(await client.request()).header("x-backend") for _ in range(10)}
                assert seen == {b"live"} and leaving.stats.requests == 0

    run(body())


def test_header_and_source_ip_rules(scheme: Scheme) -> None:
    async def body() -> None:
        header = m.Condition(m.ConditionField.HTTP_HEADER, ("beta*",), header_name="X-Channel")
        source = m.Condition(m.ConditionField.SOURCE_IP, ("10.0.0.0/8",))
        listener = rules_listener(
            m.Rule(1, (source,), m.FixedResponseAction(200, body="private")),
            m.Rule(2, (header,), m.FixedResponseAction(200, body="beta")),
            listener_tls=scheme.tls,
        )
        async with proxy(routing_table(listener)) as (_, port):
            async with await scheme.open(port) as client:
                assert (await client.request("GET", "/", {"X-Channel": "Beta-2"})).body == b"beta"
                assert (await client.request("GET", "/", {"X-Forwarded-For": "10.1.1.1"})).body == b"no route"

    run(body())


def test_client_stalling_mid_body_is_408() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), idle_timeout=0.3)
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:
                    client.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
                    raw = await client.read_raw(timeout=3)
                    assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n")

    run(body())


def test_http10_without_host_absolute_form_and_client_close() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (_, port):
                async with await Client.open(port) as client:  # 1.0, no Host: we name ourselves
                    client.send(b"GET /ten HTTP/1.0\r\n\r\n")
                    response = await client.response()
                    headers = {n.lower(): v for n, v in response.json()["headers"]}
                    assert headers["host"] == f"{HOST}:{port}"
                    assert response.header("connection") == b"close"
                    assert await client.read_raw() == b""
                async with await Client.open(port) as client:  # absolute-form: its authority is the Host
                    client.send(
                        b"GET http://other.example:81/abs?x=1 HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n"
                    )
                    response = await client.response()
                    seen = response.json()
                    assert seen["url"] == "/abs?x=1"
                    assert ["Host", "other.example:81"] in seen["headers"]
                    assert response.header("connection") == b"close"
                    assert await client.read_raw() == b""
                async with await Client.open(port) as client:  # half-close after the request: still answered
                    client.send(build_request("GET", "/slow?ms=50"))
                    client.writer.write_eof()
                    raw = await client.read_raw()
                    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")

    run(body())


def test_listeners_added_and_removed_at_run_time() -> None:
    async def body() -> None:
        first = http_listener(m.FixedResponseAction(200, body="first"), name="first")
        second = http_listener(m.FixedResponseAction(200, body="second"), name="second")
        async with proxy(routing_table(first)) as (worker, port):
            async with await Client.open(port) as client:
                assert (await client.request()).body == b"first"
                await worker.update(routing_table(second, version=2))
                assert set(worker.addresses) == {"second"}
                # a connection of a listener that left: answered 503, then closed
                assert (await client.request()).status == 503
            async with await Client.open(worker.addresses["second"][1]) as client:
                assert (await client.request()).body == b"second"
            with pytest.raises(OSError):
                await Client.open(port)

    run(body())


# --- WebSocket -----------------------------------------------------------------------


def test_websocket_echo_through_the_proxy(tmp_path: Path) -> None:
    async def body() -> None:
        async with backend("websocket") as ws:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", ws),),
                                  access_log=str(tmp_path / "access.log"), log_format="json")
            async with proxy(table) as (_, port):
                reader, writer = await asyncio.open_connection(HOST, port)
                try:
                    key = base64.b64encode(os.urandom(16)).decode()
                    writer.write(
                        build_request(
                            "GET",
                            "/chat",
                            {
                                "Upgrade": "websocket",
                                "Connection": "Upgrade",
                                "Sec-WebSocket-Key": key,
                                "Sec-WebSocket-Version": "13",
                            },
                        )
                        + encode_frame(1, b"early")  # sent before the 101: held until it comes
                    )
                    head = await reader.readuntil(b"\r\n\r\n")
                    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
                    assert b"connection: upgrade\r\nupgrade: websocket\r\n" in head.lower()
                    buffer = b""
                    for message in (b"", b"hello", b"x" * 70000):
                        if message:
                            writer.write(encode_frame(2, message))
                        expected = message or b"early"
                        while (frame := decode_frame(buffer)) is None:
                            buffer += await reader.read(1 << 16)
                        _, payload, used = frame
                        buffer = buffer[used:]
                        assert payload == expected
                    writer.write(encode_frame(8, b"\x03\xe8"))  # close: echoed, then both ends close
                    rest = buffer + await reader.read()
                    assert decode_frame(rest) == (8, b"\x03\xe8", len(rest))
                finally:
                    writer.close()
                    await writer.wait_closed()

    run(body())
    (line,) = (tmp_path / "access.log").read_text().splitlines()
    record = parse_access_line(line)  # ALB's type "ws", logged at the 101
    assert (record["type"], record["elb_status_code"], record["target_status_code"]) == ("ws", 101, 101)


# --- table swaps, timeouts, logging, stopping ---------------------------------------------


def test_table_update_keeps_client_connections() -> None:
    async def body() -> None:
        async with backend("http", "v1") as v1, backend("http", "v2") as v2:
            listener = http_listener(forward_to("g"))
            async with proxy(routing_table(listener, (target_group("g", v1),))) as (worker, port):
                async with await Client.open(port) as client:
                    slow = asyncio.get_running_loop().create_task(client.request("GET", "/slow?ms=150"))
                    await asyncio.sleep(0.05)
                    await worker.update(routing_table(listener, (target_group("g", v2),), version=7))
                    assert (await slow).json()["backend"] == "v1"  # routed before the swap
                    assert (await client.request()).json()["backend"] == "v2"
                assert worker.routes.version == 7

    run(body())


def test_idle_timeouts_408_for_silence_and_close_for_idle_keep_alive() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),), idle_timeout=0.3)
            async with proxy(table) as (_, port):
                async with await Client.open(port) as silent:
                    raw = await silent.read_raw(timeout=2)
                    assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close" in raw
                async with await Client.open(port) as partial:
                    partial.send(b"GET / HTTP/1.1\r\nHo")
                    assert (await partial.read_raw(timeout=2)).startswith(b"HTTP/1.1 408 ")
                async with await Client.open(port) as idle:
                    assert (await idle.request()).status == 200
                    assert await idle.read_raw(timeout=2) == b""  # closed without a word

    run(body())


def test_access_log_line_and_stats(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"

    async def body() -> None:
        async with backend("http") as b:
            listener = rules_listener(
                m.Rule(5, (m.Condition(m.ConditionField.PATH_PATTERN, ("/x",)),), forward_to("g"))
            )
            table = routing_table(listener, (target_group("g", b),), access_log=str(log_file))
            async with proxy(table) as (worker, port):
                async with await Client.open(port) as client:
                    await client.request("GET", "/x")
                    await client.request("GET", "/y")
                snapshot = worker.stats.snapshot()
                requests = {(r[1], r[2], r[4], r[5]): r[-1] for r in snapshot["requests"]}
                assert requests == {(5, "g", 200, False): 1, (None, "-", 404, True): 1}
                ((group, _, counts, _),) = snapshot["upstream_latency"]["series"]
                assert group == "g" and sum(counts) == 1

    run(body())
    lines = log_file.read_text().splitlines()
    time = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"
    start = rf"http {time} web 127\.0\.0\.1:\d+ "
    assert re.fullmatch(start + rf'127\.0\.0\.1:\d+ \d\.\d{{6}} \d\.\d{{6}} \d\.\d{{6}} 200 200 \d+ \d+ '
                        rf'"GET http://example\.com:\d+/x HTTP/1\.1" "-" g "[0-9a-f]{{32}}" 5 {time} "forward" "-" "-" - -',
                        lines[0]), lines[0]
    assert re.fullmatch(start + rf'- \d\.\d{{6}} -1 -1 404 - \d+ \d+ '
                        rf'"GET http://example\.com:\d+/y HTTP/1\.1" "-" - "[0-9a-f]{{32}}" 0 {time} '
                        rf'"fixed-response" "-" "-" - -', lines[1]), lines[1]


def test_graceful_stop_finishes_requests_in_flight() -> None:
    async def body() -> None:
        async with backend("http") as b:
            table = routing_table(http_listener(forward_to("g")), (target_group("g", b),))
            async with proxy(table) as (worker, port):
                busy = await Client.open(port)
                idle = await Client.open(port)
                try:
                    assert (await idle.request()).status == 200
                    slow = asyncio.get_running_loop().create_task(busy.request("GET", "/slow?ms=200"))
                    await asyncio.sleep(0.05)
                    stopping = asyncio.get_running_loop().create_task(worker.stop(2.0))
                    response = await slow
                    assert response.status == 200 and response.header("connection") == b"close"
                    assert await idle.read_raw(timeout=1) == b""  # idle keep-alive closed at once
                    await stopping
                    with pytest.raises(OSError):
                        await Client.open(port)
                finally:
                    await busy.close()
                    await idle.close()

    run(body())


# --- worker processes ----------------------------------------------------------------------


def test_l7server_workers_update_stats_and_stop() -> None:
    with ThreadedBackends(("http", "p1"), ("http", "p2")) as (p1, p2):
        listener = http_listener(forward_to("g"))

        async def requests(port: int, n: int) -> list[bytes | None]:
            out = []
            for _ in range(n):  # a new connection each time: both workers get some
                async with await Client.open(port) as client:
                    out.append((await client.request()).header("x-backend"))
            return out

        async def body() -> None:
            server = L7Server(L7Config(workers=2))
            await server.start(routing_table(listener, (target_group("g", p1),)))
            try:
                port = server.addresses["web"][1]
                assert len(server.pids()) == 2 and port != 0
                assert set(await requests(port, 20)) == {b"p1"}
                server.update(routing_table(listener, (target_group("g", p2),), version=3))
                assert await server.settle() == []
                assert set(await requests(port, 20)) == {b"p2"}
                stats = await server.stats()
                assert [row["worker"] for row in stats] == [0, 1] and all(row["answered"] for row in stats)
                per_worker = [sum(r[-1] for r in s["requests"]) for s in stats]
                assert sum(per_worker) == 40 and min(per_worker) > 0  # SO_REUSEPORT spread them
            finally:
                await server.stop(grace=1.0)
            assert server.pids() == []

        run(body())


def test_l7server_graceful_stop_in_flight_and_access_log_file(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    with ThreadedBackends(("http", "p1")) as (p1,):

        async def body() -> int:
            server = L7Server(L7Config(workers=1))
            await server.start(routing_table(http_listener(forward_to("g")), (target_group("g", p1),),
                                             access_log=str(log_file)))
            try:
                port = server.addresses["web"][1]
                async with await Client.open(port) as client:
                    client.send(build_request("GET", "/slow?ms=400"))
                    await asyncio.sleep(0.1)
                    stopper = asyncio.get_running_loop().create_task(server.stop(3.0))
                    response = await client.response()
                    await stopper
                    return response.status
            finally:
                await server.stop(grace=0.5)

        assert run(body()) == 200
    (line,) = log_file.read_text().splitlines()
    record = parse_access_line(line)
    assert (record["listener"], record["elb_status_code"], record["target_status_code"]) == ("web", 200, 200)
    assert re.fullmatch(r"GET http://example\.com:\d+/slow\?ms=400 HTTP/1\.1", record["request"]), record["request"]


def test_l7server_start_fails_cleanly_when_the_port_is_taken() -> None:
    import socket

    async def body() -> None:
        with socket.socket() as taken:  # no SO_REUSEPORT: nobody can share it
            taken.bind((HOST, 0))
            taken.listen()
            port = taken.getsockname()[1]
            server = L7Server(L7Config(workers=2, ready_timeout=10))
            with pytest.raises(OSError, match="lb-l7-"):
                await server.start(routing_table(http_listener(m.FixedResponseAction(200), port=port)))
            assert server.pids() == []

    run(body())

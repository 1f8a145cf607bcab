"""HTTP/2 from clients (lb.l7.h2client, lb.l7.h2stream): real TLS, ALPN h2.

The proxy serves in the test's loop; clients are curl (--http2) and the
``h2`` library (tests.h2_client), which can also write frames as they are
for the abuse cases: rapid reset, CONTINUATION, SETTINGS and PING floods,
too many streams, too large a header list. The ELB rule tests run over
HTTP/2 through the ``scheme`` fixture of tests/test_l7_server.py.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path

import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

from lb import config as configmod
from lb import model as m
from lb.l7.config import L7Config
from tests.h2_client import H2Client, StreamClosed, _Stream
from tests.l7_backends import (
    Client,
    backend,
    forward_to,
    http_listener,
    proxy,
    read_access_log,
    routing_table,
    run,
    target_group,
)
from tests.tls_certs import Certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def listener_tls(certs: Certs) -> m.ListenerTls:
    return certs.listener_tls("example.com")


def h2_ctx(certs: Certs) -> ssl.SSLContext:
    return certs.client(alpn=("h2", "http/1.1"))


def path_rule(priority: int, pattern: str, group: str) -> m.Rule:
    return m.Rule(priority, (m.Condition(m.ConditionField.PATH_PATTERN, (pattern,)),), forward_to(group))


# --- ALPN, curl ------------------------------------------------------------------------------------


def test_curl_http2_and_http11_on_one_listener(certs: Certs, listener_tls: m.ListenerTls, tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    async def body() -> None:
        async with backend("http", "b1") as b:
            listener = http_listener(forward_to("g"), tls=listener_tls)
            async with proxy(routing_table(listener, (target_group("g", b),), access_log=str(log))) as (_, port):
                for flag, version in (("--http2", "HTTP/2"), ("--http1.1", "HTTP/1.1")):
                    proc = await asyncio.create_subprocess_exec(
                        "curl", "-sSk", flag, "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                        "--data-binary", "x" * 100_000, f"https://127.0.0.1:{port}/up",
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                    out, err = await proc.communicate()
                    assert proc.returncode == 0, err
                    assert out.decode() == f"{version.split('/')[1]} 200", (flag, out)
            assert b.stats.upload_bytes == 200_000

    run(body())
    lines = read_access_log(log)
    assert [line["elb_status_code"] for line in lines] == [200, 200]
    assert [line["type"] for line in lines] == ["h2", "https"]  # ALB's types
    assert [line["request"].rsplit(" ", 1)[1] for line in lines] == ["HTTP/2.0", "HTTP/1.1"]
    assert lines[0]["request"].startswith("POST https://127.0.0.1:")
    assert [line["ssl_protocol"] for line in lines] == ["TLSv1.3", "TLSv1.3"]  # the connection's, for each stream


# --- many streams, several groups, bodies ------------------------------------------------------------


def test_many_concurrent_streams_to_several_groups_by_rule(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        async with backend("http", "a") as a, backend("http", "b") as b, backend("http", "c") as c:
            rules = (path_rule(1, "/a/*", "a"), path_rule(2, "/b/*", "b"))
            listener = http_listener(forward_to("c"), rules, tls=listener_tls)
            groups = (target_group("a", a), target_group("b", b), target_group("c", c))
            async with proxy(routing_table(listener, groups)) as (_, port):
                async with await H2Client.open(port, h2_ctx(certs)) as client:
                    started = time.monotonic()
                    paths = [f"/{'abc'[i % 3]}/{i}" for i in range(120)]
                    responses = await asyncio.gather(*(client.request("GET", f"{p}?x=/slow") for p in paths))
                    slow = await asyncio.gather(*(client.request("GET", "/slow?ms=200") for _ in range(20)))
                    elapsed = time.monotonic() - started
            for path, response in zip(paths, responses):
                assert response.status == 200 and response.json()["url"] == f"{path}?x=/slow"
                assert response.header("x-backend") == path[1:2].encode()
            assert all(r.status == 200 for r in slow)
            assert elapsed < 2.0, elapsed  # 20 × 200 ms one after the other would be 4 s: multiplexed
            assert c.stats.connections >= 10  # the slow ones each held a pooled connection

    run(body())


def test_large_bodies_both_ways_with_flow_control(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        async with backend("http", "b") as b:
            listener = http_listener(forward_to("g"), tls=listener_tls)
            async with proxy(routing_table(listener, (target_group("g", b),))) as (_, port):
                async with await H2Client.open(port, h2_ctx(certs)) as client:
                    upload = os.urandom(3 << 20)  # 48 × lb's 64 KiB stream window: WINDOW_UPDATEs needed
                    up, down = await asyncio.gather(
                        client.request("POST", "/echo", body=upload),
                        client.request("GET", "/download?size=%d" % (8 << 20)),  # 128 × the client's window
                    )
                    assert up.status == 200 and up.json()["body_len"] == len(upload)
                    assert down.status == 200 and len(down.body) == 8 << 20
                    chunked = await client.request("GET", "/download?size=1000000&chunked=1")
                    assert len(chunked.body) == 1000000 and chunked.header("content-length") is None

    run(body())


def test_a_client_that_does_not_read_gets_a_window_and_the_target_waits(certs: Certs,
                                                                        listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        async with backend("http", "b") as b:
            listener = http_listener(forward_to("g"), tls=listener_tls)
            async with proxy(routing_table(listener, (target_group("g", b),))) as (_, port):
                client = await H2Client.open(port, h2_ctx(certs), read_window=False)
                try:
                    stream = client.start("GET", "/download?size=%d" % (64 << 20))
                    await asyncio.sleep(1.0)
                    assert 65535 <= client.received < 65535 + 4096  # the window, frame and head overhead
                    backend_conn = b.protocols[0]
                    assert backend_conn.paused  # lb stopped reading the target: it stopped writing
                    client.read_window = True
                    client.conn.acknowledge_received_data(65535, stream)
                    client._flush()
                    response = await client.response_of(stream, timeout=60)
                    assert len(response.body) == 64 << 20
                finally:
                    await client.close()

    run(body(), timeout=90)


# --- errors ----------------------------------------------------------------------------------------------


def test_malformed_requests_and_lb_answers(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        async with backend("http", "b") as b:
            listener = http_listener(forward_to("g"), (m.Rule(1, (m.Condition(m.ConditionField.PATH_PATTERN,
                                                                                ("/fixed",)),),
                                                               m.FixedResponseAction(418, body="tea")),),
                                     tls=listener_tls)
            async with proxy(routing_table(listener, (target_group("g", b),))) as (worker, port):
                async with await H2Client.open(port, h2_ctx(certs)) as client:
                    assert (await client.request("TRACE", "/")).status == 405
                    fixed = await client.request("POST", "/fixed", body=b"q" * 200_000)  # answered before the body
                    assert (fixed.status, fixed.body) == (418, b"tea")
                    assert (await client.request("GET", "/", {"X-Request-Id": "abc"})).status == 200  # still usable
                    head = await client.request("HEAD", "/")
                    assert head.status == 200 and head.body == b"" and head.header("content-length") is not None
                    bad_host = await client.request("GET", "/", host="a b")
                    assert bad_host.status == 400
                    assert (await client.request("GET", "/status/204")).status == 204
                    (conn,) = worker.connections
                    assert not conn.streams  # type: ignore[attr-defined]  # each forgotten once answered
                # Malformed requests (RFC 9113 §8.1.1, §8.2): each stream is reset, the connection goes on.
                async with await H2Client.open(port, h2_ctx(certs)) as client:
                    client.conn.config.validate_outbound_headers = False
                    client.conn.config.normalize_outbound_headers = False
                    base = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"),
                            (b":path", b"/")]
                    for bad in ([(b"X-Upper", b"1")], [(b"connection", b"close")], [(b"te", b"gzip")],
                                [(b"x", b"1"), (b":path", b"/late")]):
                        stream = client.conn.get_next_available_stream_id()
                        client.streams[stream] = _Stream(asyncio.get_running_loop())
                        client.conn.send_headers(stream, base + bad, end_stream=True)
                        client._flush()
                        with pytest.raises(StreamClosed) as reset:
                            await client.response_of(stream)
                        assert reset.value.code == ErrorCodes.PROTOCOL_ERROR, bad
                    assert (await client.request()).status == 200 and client.terminated is None
                assert b.stats.requests == 4  # GET, HEAD, 204 and the last GET: nothing of the refused ones

    run(body())


def test_target_failures_answer_the_stream_only(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        async with backend("http", "ok") as ok, backend("reset", "bad") as bad:
            rules = (path_rule(1, "/bad", "bad"),)
            listener = http_listener(forward_to("ok"), rules, tls=listener_tls)
            async with proxy(routing_table(listener, (target_group("ok", ok), target_group("bad", bad)))) as (_, p):
                async with await H2Client.open(p, h2_ctx(certs)) as client:
                    good, failed = await asyncio.gather(client.request("GET", "/"), client.request("GET", "/bad"))
                    assert (good.status, failed.status) == (200, 502)
                    assert (await client.request("GET", "/")).status == 200

    run(body())


# --- limits and abuse ------------------------------------------------------------------------------------


async def _goaway(client: H2Client, timeout: float = 10.0) -> int:
    await asyncio.wait_for(client.closed, timeout)
    assert client.terminated is not None
    return int(client.terminated.error_code)


def _headers_block(stream_id: int, extra: int = 0) -> bytes:
    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"), (b":path", b"/")]
    if extra:
        fields.append((b"x-big", b"v" * extra))
    return Encoder().encode(fields)


def test_rapid_reset_is_cut_off_and_others_are_served(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        async with backend("http", "b") as b:
            listener = http_listener(forward_to("g"), tls=listener_tls)
            async with proxy(routing_table(listener, (target_group("g", b),))) as (worker, port):
                honest = await H2Client.open(port, h2_ctx(certs))
                attacker = await H2Client.open(port, h2_ctx(certs))
                try:
                    encoder = Encoder()
                    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"),
                              (b":path", b"/slow?ms=50")]
                    opened = 0
                    served = []

                    async def honest_requests() -> None:
                        for _ in range(20):
                            served.append((await honest.request("GET", "/")).status)

                    task = asyncio.get_running_loop().create_task(honest_requests())
                    for batch in range(100):  # 10,000 streams, opened and reset, 100 a write
                        frames = []
                        for _ in range(100):
                            stream_id = 1 + 2 * opened
                            opened += 1
                            headers = HeadersFrame(stream_id, encoder.encode(fields), flags=["END_HEADERS",
                                                                                            "END_STREAM"])
                            frames += (headers.serialize(), RstStreamFrame(stream_id, error_code=8).serialize())
                        if attacker.closed.done():
                            break
                        attacker.send_raw(b"".join(frames))
                        await asyncio.sleep(0.002 if batch % 10 else 0.02)
                    assert await _goaway(attacker) == ErrorCodes.ENHANCE_YOUR_CALM
                    assert worker.snapshot()["h2_calmed"] == 1  # lb_http2_connections_calmed_total
                    await task
                    assert served == [200] * 20
                    assert b.stats.requests < 300, b.stats.requests  # the resets barely reached the target
                    assert sum(pool.connections for pool in worker.pools.pools.values()) < 50
                    assert len(worker.connections) == 1  # the attacker's connection is gone, with its streams
                finally:
                    await honest.close()
                    await attacker.close()

    run(body(), timeout=60)


def test_continuation_flood_is_a_connection_error(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        listener = http_listener(m.FixedResponseAction(200), tls=listener_tls)
        async with proxy(routing_table(listener)) as (_, port):
            client = await H2Client.open(port, h2_ctx(certs))
            try:
                block = _headers_block(1)
                frames = [HeadersFrame(1, block[:5]).serialize()]  # no END_HEADERS: CONTINUATIONs follow
                frames += [ContinuationFrame(1, b"\x00" * 16384).serialize() for _ in range(2000)]
                client.send_raw(b"".join(frames))  # 32 MB of header block, if it were all kept
                assert await _goaway(client) == ErrorCodes.PROTOCOL_ERROR
            finally:
                await client.close()

    run(body())


@pytest.mark.parametrize("kind", ["ping", "settings", "empty-headers-only"])
def test_control_frame_floods_end_with_enhance_your_calm(certs: Certs, listener_tls: m.ListenerTls,
                                                          kind: str) -> None:
    async def body() -> None:
        listener = http_listener(m.FixedResponseAction(200), tls=listener_tls)
        async with proxy(routing_table(listener)) as (_, port):
            client = await H2Client.open(port, h2_ctx(certs))
            try:
                if kind == "ping":
                    frame = PingFrame(0, opaque_data=b"12345678").serialize()
                elif kind == "settings":
                    frame = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}).serialize()
                else:  # PRIORITY-less no-op: a WINDOW_UPDATE of the connection by 1
                    frame = bytes.fromhex("000004080000000000") + (1).to_bytes(4, "big")
                for _ in range(10):
                    if client.closed.done():
                        break
                    client.send_raw(frame * 1000)
                    await asyncio.sleep(0.01)
                assert await _goaway(client) == ErrorCodes.ENHANCE_YOUR_CALM
            finally:
                await client.close()

    run(body())


def test_stream_and_header_limits(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        listener = http_listener(m.FixedResponseAction(200), tls=listener_tls)
        config = L7Config(connect_timeout=2.0, h2_max_streams=8)
        async with proxy(routing_table(listener), config) as (_, port):
            client = await H2Client.open(port, h2_ctx(certs))
            try:
                # 9 streams at once, sent before the client could read the server's SETTINGS:
                # the 9th is refused (a stream error, RFC 9113 §5.1.2), the others go on.
                ids = [client.start("POST", "/", end_stream=False) for _ in range(9)]
                with pytest.raises(StreamClosed) as refused:
                    await client.response_of(ids[-1])
                assert refused.value.code == ErrorCodes.REFUSED_STREAM
                assert client.conn.remote_settings.max_concurrent_streams == 8
                assert client.conn.remote_settings.max_header_list_size == config.max_headers
                await client.send_body(ids[0], b"x" * 100)
                assert (await client.response_of(ids[0])).status == 200
                client.conn.end_stream(ids[1])  # an empty DATA with END_STREAM
                client._flush()
                assert (await client.response_of(ids[1])).status == 200
                assert (await client.request()).status == 200  # the connection serves on
                assert client.terminated is None
            finally:
                await client.close()
            client = await H2Client.open(port, h2_ctx(certs))
            try:
                block = _headers_block(1, config.max_headers)  # over the header list size
                pieces = [block[i:i + 16000] for i in range(0, len(block), 16000)]  # frames of at most 16 KiB
                frames = [HeadersFrame(1, pieces[0], flags=["END_STREAM"]).serialize()]
                frames += [ContinuationFrame(1, piece).serialize() for piece in pieces[1:-1]]
                frames.append(ContinuationFrame(1, pieces[-1], flags=["END_HEADERS"]).serialize())
                client.send_raw(b"".join(frames))
                assert await _goaway(client) == ErrorCodes.ENHANCE_YOUR_CALM
            finally:
                await client.close()

    run(body())


# --- the same listener, other clients ----------------------------------------------------------------------


def test_websocket_over_http11_next_to_h2_on_one_listener(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        async with backend("websocket") as ws, backend("http", "b") as b:
            rules = (path_rule(1, "/chat", "ws"),)
            listener = http_listener(forward_to("g"), rules, tls=listener_tls)
            groups = (target_group("ws", ws), target_group("g", b))
            async with proxy(routing_table(listener, groups)) as (_, port):
                async with await H2Client.open(port, h2_ctx(certs)) as h2client:
                    client = await Client.open(port, ssl=certs.client(alpn=("http/1.1",)),
                                               server_hostname="example.com")
                    assert (await client.upgrade_to_websocket()).startswith(b"HTTP/1.1 101 ")
                    assert await client.websocket_echo(1, b"hello") == b"hello"
                    assert (await h2client.request("GET", "/x")).status == 200
                    await client.close()

    run(body())


def test_graceful_stop_sends_goaway_and_finishes_streams(certs: Certs, listener_tls: m.ListenerTls) -> None:
    # curl: the h2 library takes no frame after a GOAWAY, so its client cannot see the stream finish.
    async def body() -> None:
        async with backend("http", "b") as b:
            listener = http_listener(forward_to("g"), tls=listener_tls)
            async with proxy(routing_table(listener, (target_group("g", b),)), grace=3.0) as (worker, port):
                proc = await asyncio.create_subprocess_exec(
                    "curl", "-sSk", "--http2", "-v", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                    f"https://127.0.0.1:{port}/slow?ms=500",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                while b.stats.connections == 0:  # the request reached the target
                    await asyncio.sleep(0.01)
                started = time.monotonic()
                await worker.stop(3.0)
                out, err = await proc.communicate()
                assert out == b"2 200", err
                assert time.monotonic() - started < 2.0  # stopped as soon as the stream was done

    run(body())


def test_http2_off_offers_http11_only(certs: Certs, listener_tls: m.ListenerTls) -> None:
    lb = configmod.loads('[load_balancer]\nname = "x"\nhttp2 = false\n')
    assert L7Config.for_load_balancer(lb).http2 is False

    async def body() -> None:
        listener = http_listener(m.FixedResponseAction(200), tls=listener_tls)
        async with proxy(routing_table(listener), L7Config.for_load_balancer(lb)) as (_, port):
            client = await Client.open(port, ssl=h2_ctx(certs), server_hostname="example.com")
            assert client.writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
            assert (await client.request()).status == 200
            await client.close()

    run(body())


def test_a_long_lived_connection_keeps_bounded_state(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        listener = http_listener(m.FixedResponseAction(200, body="ok"), tls=listener_tls)
        async with proxy(routing_table(listener)) as (worker, port):
            async with await H2Client.open(port, h2_ctx(certs)) as client:
                for _ in range(15):
                    responses = await asyncio.gather(*(client.request() for _ in range(100)))
                    assert {r.status for r in responses} == {200}
                (conn,) = worker.connections
                assert not conn.streams and not conn.blocked  # type: ignore[attr-defined]
                assert len(conn.h2._closed_streams) <= 1024  # type: ignore[attr-defined]

    run(body())


def test_streams_reset_after_reaching_their_target_leave_nothing_behind(certs: Certs,
                                                                       listener_tls: m.ListenerTls) -> None:
    """Rapid reset's other form: each stream reaches a target before its RST_STREAM
    (a read apart). Each reset costs a target connection; the credits end it."""
    async def body() -> None:
        async with backend("http", "b") as b:
            listener = http_listener(forward_to("g"), tls=listener_tls)
            async with proxy(routing_table(listener, (target_group("g", b),))) as (worker, port):
                attacker = await H2Client.open(port, h2_ctx(certs))
                try:
                    encoder = Encoder()
                    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com"),
                              (b":path", b"/slow?ms=1000")]
                    stream_id = 1
                    for _ in range(100):  # 20 streams a round: HEADERS, a moment, then their resets
                        if attacker.closed.done():
                            break
                        ids = range(stream_id, stream_id + 40, 2)
                        stream_id += 40
                        attacker.send_raw(b"".join(HeadersFrame(i, encoder.encode(fields),
                                                                flags=["END_HEADERS", "END_STREAM"]).serialize()
                                                   for i in ids))
                        await asyncio.sleep(0.05)
                        attacker.send_raw(b"".join(RstStreamFrame(i, error_code=8).serialize() for i in ids))
                        await asyncio.sleep(0.01)
                    assert await _goaway(attacker) == ErrorCodes.ENHANCE_YOUR_CALM
                    assert stream_id < 400  # cut off after about 100 resets
                    await asyncio.sleep(0.2)
                    pools = list(worker.pools.pools.values())
                    assert sum(pool.outstanding for pool in pools) == 0  # every abandoned exchange released
                    assert not worker.connections
                finally:
                    await attacker.close()
                async with await H2Client.open(port, h2_ctx(certs)) as client:  # and the next client is served
                    assert (await client.request()).status == 200

    run(body(), timeout=60)


def test_idle_connection_gets_goaway_and_a_stalled_body_408(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        async with backend("http", "b") as b:
            listener = http_listener(forward_to("g"), tls=listener_tls)
            table = routing_table(listener, (target_group("g", b),), idle_timeout=0.5)
            async with proxy(table, L7Config(connect_timeout=2.0, body_timeout=1)) as (_, port):
                async with await H2Client.open(port, h2_ctx(certs)) as client:
                    assert (await client.request()).status == 200
                    started = time.monotonic()
                    assert await _goaway(client) == ErrorCodes.NO_ERROR  # idle: closed politely
                    assert 0.4 < time.monotonic() - started < 3.0
                async with await H2Client.open(port, h2_ctx(certs)) as client:
                    stream = client.start("POST", "/", {"content-length": "10"}, end_stream=False)
                    client.conn.send_data(stream, b"12345")  # half the body, then nothing
                    client._flush()
                    response = await client.response_of(stream)
                    assert response.status == 408

    run(body())


def test_a_stream_out_of_window_does_not_hold_up_the_others(certs: Certs, listener_tls: m.ListenerTls) -> None:
    async def body() -> None:
        async with backend("http", "b") as b:
            listener = http_listener(forward_to("g"), tls=listener_tls)
            async with proxy(routing_table(listener, (target_group("g", b),))) as (_, port):
                async with await H2Client.open(port, h2_ctx(certs)) as client:
                    stuck = client.start("GET", "/download?size=%d" % (4 << 20))
                    client.held.add(stuck)  # its window stays shut; the connection's is given back
                    await asyncio.sleep(0.3)
                    others = await asyncio.gather(*(client.request("GET", "/download?size=300000")
                                                    for _ in range(10)))
                    assert all(len(r.body) == 300000 for r in others)  # 3 MB past the stuck stream
                    assert not client.streams[stuck].done.done()
                    received = sum(map(len, client.streams[stuck].body))
                    assert received <= 65535, received  # the stuck one got its window, no more
                    client.held.discard(stuck)
                    client.conn.acknowledge_received_data(received, stuck)  # open it: it finishes
                    client._flush()
                    assert len((await client.response_of(stuck)).body) == 4 << 20

    run(body())

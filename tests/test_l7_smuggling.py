"""The smuggling table: request shapes that desync a proxy from its target.

Each row is sent on a fresh connection, followed by a sentinel request,
through lb to a recording target (tests/l7_backends.py, ``record``). Each
row either

- is refused: the expected status with ``connection: close``, then the
  connection ends; the target saw at most the requests before the bad one,
  or
- is forwarded: the target's byte stream, parsed by the strict parser of
  tests/l7_strict.py (not httptools, which lb uses), is exactly the client's
  requests as that parser reads them: same methods, authorities, targets
  and bodies, nothing left over; and the client gets one answer per
  request, each the target's answer to that request.

Both sides are compared under one invariant whatever the row expects: the
target never sees a request the strict parser does not find in what the
client sent, in the same place.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from lb import model as m
from tests.l7_backends import Client, backend, forward_to, http_listener, proxy, routing_table, run, target_group
from tests.l7_strict import ParsedRequest, parse_stream

SENTINEL = b"GET /sentinel HTTP/1.1\r\nHost: x\r\n\r\n"
HIDDEN = b"GET /fixed HTTP/1.1\r\nHost: x\r\n\r\n"  # a rule answers /fixed itself: the target must never see it
FIXED = m.Rule(
    10, (m.Condition(m.ConditionField.PATH_PATTERN, ("/fixed",)),), m.FixedResponseAction(403, "text/plain", "no")
)


def head(*lines: bytes, body: bytes = b"") -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def post(*lines: bytes, body: bytes = b"", target: bytes = b"/a") -> bytes:
    return head(b"POST " + target + b" HTTP/1.1", b"Host: x", *lines, body=body)


def cl(body: bytes) -> bytes:
    return b"Content-Length: %d" % len(body)


def chunks(*pieces: bytes, trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n" + trailers + b"\r\n"


@dataclass(frozen=True)
class Forward:
    requests: int | None = None  # how many reach the target; None: all the client sent (the sentinel too)
    absent: bytes = b""  # a header the target must not see


PENDING = Forward(0)  # forwarded as it comes, and still incomplete: the rest of the body is awaited


WS = (
    b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
)
H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"
CHUNKED = b"Transfer-Encoding: chunked"

ROWS: list[tuple[str, bytes, int | Forward]] = [
    # --- Connection nominating a framing header or Host: 400 ---------------------------
    ("conn-cl", post(b"Connection: content-length", cl(HIDDEN), body=HIDDEN), 400),
    ("conn-cl-upper", post(b"Connection: CONTENT-LENGTH", cl(HIDDEN), body=HIDDEN), 400),
    ("conn-cl-title", post(b"Connection: Content-Length", cl(HIDDEN), body=HIDDEN), 400),
    ("conn-cl-second", post(b"Connection: keep-alive, content-length", cl(HIDDEN), body=HIDDEN), 400),
    ("conn-cl-first", post(b"Connection: content-length, keep-alive", cl(HIDDEN), body=HIDDEN), 400),
    ("conn-cl-middle", post(b"Connection: x-a, Content-Length, x-b", cl(HIDDEN), body=HIDDEN), 400),
    ("conn-cl-no-space", post(b"Connection: x-a,content-length", cl(HIDDEN), body=HIDDEN), 400),
    ("conn-cl-ows", post(b"Connection:   content-length   ", cl(HIDDEN), body=HIDDEN), 400),
    ("conn-cl-tab", post(b"Connection:\tcontent-length", cl(HIDDEN), body=HIDDEN), 400),
    ("conn-cl-empty-tokens", post(b"Connection: ,, content-length ,", cl(HIDDEN), body=HIDDEN), 400),
    (
        "conn-cl-second-header",
        post(b"Connection: keep-alive", b"Connection: content-length", cl(HIDDEN), body=HIDDEN),
        400,
    ),
    ("conn-cl-after-cl", post(cl(HIDDEN), b"Connection: content-length", body=HIDDEN), 400),
    ("conn-cl-no-cl", post(b"Connection: content-length"), 400),
    ("conn-cl-get", head(b"GET /a HTTP/1.1", b"Host: x", b"Connection: content-length", b"Content-Length: 0"), 400),
    ("conn-te", post(b"Connection: transfer-encoding", CHUNKED, body=chunks(HIDDEN)), 400),
    ("conn-te-upper", post(b"Connection: TRANSFER-ENCODING", CHUNKED, body=chunks(HIDDEN)), 400),
    ("conn-te-close", post(b"Connection: close, Transfer-Encoding", CHUNKED, body=chunks(HIDDEN)), 400),
    ("conn-te-with-cl", post(b"Connection: transfer-encoding", cl(HIDDEN), body=HIDDEN), 400),
    ("conn-host", post(b"Connection: host", cl(b"abc"), body=b"abc"), 400),
    ("conn-host-upper", post(b"Connection: keep-alive, HOST"), 400),
    ("conn-harmless", post(b"Connection: x-drop", b"X-Drop: 1", cl(b"abc"), body=b"abc"), Forward(absent=b"x-drop")),
    ("conn-keep-alive", post(b"Connection: keep-alive", cl(b"abc"), body=b"abc"), Forward()),
    ("conn-close", post(b"Connection: close", cl(b"abc"), body=b"abc"), Forward(1)),
    # --- Upgrade with a body --------------------------------------------------------------
    ("ws-cl", head(b"GET /chat HTTP/1.1", b"Host: x", WS, cl(HIDDEN), body=HIDDEN), 400),
    ("ws-te", head(b"GET /chat HTTP/1.1", b"Host: x", WS, CHUNKED, body=chunks(HIDDEN)), 400),
    ("ws-cl-zero", head(b"GET /chat HTTP/1.1", b"Host: x", WS, b"Content-Length: 0"), Forward(1)),
    ("h2c-cl", post(H2C, cl(HIDDEN), body=HIDDEN), Forward(absent=b"upgrade")),
    ("h2c-te", post(H2C, CHUNKED, body=chunks(HIDDEN, b"more")), Forward(absent=b"upgrade")),
    ("h2c-te-trailers", post(H2C, CHUNKED, body=chunks(HIDDEN, trailers=b"X-T: 1\r\n")), Forward()),
    ("h2c-no-body", head(b"GET /a HTTP/1.1", b"Host: x", H2C), Forward(absent=b"upgrade")),
    ("upgrade-without-connection", post(b"Upgrade: websocket", cl(HIDDEN), body=HIDDEN), Forward()),
    ("connection-upgrade-alone", post(b"Connection: upgrade", cl(HIDDEN), body=HIDDEN), Forward()),
    # --- Transfer-Encoding and Content-Length together, TE obfuscations -----------------
    ("cl-te", post(cl(b"0\r\n\r\n"), CHUNKED, body=b"0\r\n\r\n"), 400),
    ("te-cl", post(CHUNKED, b"Content-Length: 3", body=b"0\r\n\r\n"), 400),
    ("te-chunked-identity", post(b"Transfer-Encoding: chunked, identity", body=chunks(HIDDEN)), 400),
    ("te-identity-chunked", post(b"Transfer-Encoding: identity, chunked", body=chunks(HIDDEN)), Forward()),
    ("te-leading-space", post(b"Transfer-Encoding:  chunked", body=chunks(HIDDEN)), Forward()),
    ("te-tab", post(b"Transfer-Encoding:\tchunked", body=chunks(HIDDEN)), Forward()),
    ("te-upper", post(b"Transfer-Encoding: CHUNKED", body=chunks(HIDDEN)), Forward()),
    ("te-xchunked", post(b"Transfer-Encoding: xchunked", cl(HIDDEN), body=HIDDEN), 400),
    ("te-chunkedx", post(b"Transfer-Encoding: chunkedx", body=chunks(HIDDEN)), 501),
    ("te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked", body=chunks(HIDDEN)), 501),
    ("te-twice", post(CHUNKED, CHUNKED, body=chunks(HIDDEN)), 400),
    ("te-chunked-then-identity", post(CHUNKED, b"Transfer-Encoding: identity", body=chunks(HIDDEN)), 400),
    ("te-space-before-colon", post(b"Transfer-Encoding : chunked", cl(HIDDEN), body=HIDDEN), 400),
    ("te-obs-fold", post(b"Transfer-Encoding:", b" chunked", body=chunks(HIDDEN)), 400),
    ("te-underscore", post(b"Transfer_Encoding: chunked", cl(HIDDEN), body=HIDDEN), 400),
    ("te-http10", head(b"POST /a HTTP/1.0", b"Host: x", CHUNKED, body=chunks(HIDDEN)), 400),
    ("te-vertical-tab", post(b"Transfer-Encoding:\x0bchunked", cl(HIDDEN), body=HIDDEN), 400),
    # --- Content-Length -------------------------------------------------------------------
    ("cl-dup-same", post(cl(HIDDEN), cl(HIDDEN), body=HIDDEN), 400),
    ("cl-dup-different", post(b"Content-Length: 0", cl(HIDDEN), body=HIDDEN), 400),
    ("cl-list", post(b"Content-Length: %d, %d" % (len(HIDDEN), len(HIDDEN)), body=HIDDEN), 400),
    ("cl-plus", post(b"Content-Length: +%d" % len(HIDDEN), body=HIDDEN), 400),
    ("cl-negative", post(b"Content-Length: -1", body=HIDDEN), 400),
    ("cl-hex", post(b"Content-Length: 0x10", body=HIDDEN), 400),
    ("cl-inner-space", post(b"Content-Length: 1 0", body=HIDDEN), 400),
    ("cl-overflow", post(b"Content-Length: 99999999999999999999999", body=HIDDEN), 400),
    ("cl-underscore", post(b"Content_Length: %d" % len(HIDDEN), body=HIDDEN), 400),
    ("cl-leading-zeros", post(b"Content-Length: 003", body=b"abc"), Forward()),
    ("cl-trailing-space", post(b"Content-Length: 3 ", body=b"abc"), Forward()),
    ("cl-get-with-body", head(b"GET /a HTTP/1.1", b"Host: x", cl(HIDDEN), body=HIDDEN), Forward()),
    ("cl-zero-get", head(b"GET /a HTTP/1.1", b"Host: x", b"Content-Length: 0"), Forward()),
    # --- lines and characters ----------------------------------------------------------------
    ("bare-lf-request-line", b"GET /a HTTP/1.1\nHost: x\r\n\r\n", 400),
    ("bare-lf-header", b"GET /a HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400),
    ("bare-lf-end", b"GET /a HTTP/1.1\r\nHost: x\r\n\n", 400),
    ("bare-cr-header", b"GET /a HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", 400),
    ("nul-in-value", post(b"X: a\x00b", cl(HIDDEN), body=HIDDEN), 400),
    ("nul-in-name", post(b"X\x00: b", cl(HIDDEN), body=HIDDEN), 400),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("ctl-in-value", post(b"X: a\x01b"), 400),
    ("obs-fold", post(b"X-Folded: a", b" b"), 400),
    ("space-before-colon", post(b"Host : y"), 400),
    ("leading-space-header", b"GET /a HTTP/1.1\r\n Host: x\r\n\r\n", 400),
    ("empty-name", post(b": x"), 400),
    ("no-colon", post(b"X-No-Colon"), 400),
    ("space-in-target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("bad-version", b"GET /a HTTP/1.1x\r\nHost: x\r\n\r\n", 400),
    ("two-hosts", head(b"GET /a HTTP/1.1", b"Host: x", b"Host: y"), 400),
    # --- chunked bodies ------------------------------------------------------------------------
    ("chunk-size-leading-zeros", post(CHUNKED, body=b"0000000000000000" + b"5\r\nhello\r\n0\r\n\r\n"), Forward()),
    ("chunk-size-overflow", post(CHUNKED, body=b"FFFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-2^64-1", post(CHUNKED, body=b"FFFFFFFFFFFFFFFF\r\nhello\r\n0\r\n\r\n"), PENDING),
    ("chunk-size-leading-space", post(CHUNKED, body=b" 5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-trailing-space", post(CHUNKED, body=b"5 \r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-0x", post(CHUNKED, body=b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-negative", post(CHUNKED, body=b"-5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-bare-lf", post(CHUNKED, body=b"5\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-data-bare-lf", post(CHUNKED, body=b"5\r\nhello\n0\r\n\r\n"), 400),
    ("chunk-data-too-long", post(CHUNKED, body=b"3\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext", post(CHUNKED, body=b"5;ext=1\r\nhello\r\n0\r\n\r\n"), Forward()),
    ("chunk-ext-quoted", post(CHUNKED, body=b'5;a="b;c"\r\nhello\r\n0;z\r\n\r\n'), Forward()),
    ("chunk-ext-bare-lf", post(CHUNKED, body=b"5;ext\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-ctl", post(CHUNKED, body=b"5;e\x01t\r\nhello\r\n0\r\n\r\n"), 400),
    ("last-chunk-no-crlf", post(CHUNKED, body=b"5\r\nhello\r\n0\r\n"), 400),
    ("trailer", post(CHUNKED, body=chunks(b"hello", trailers=b"X-Checksum: 1\r\n")), Forward(absent=b"x-checksum")),
    ("trailer-cl", post(CHUNKED, body=chunks(b"hello", trailers=cl(HIDDEN) + b"\r\n")), 400),
    ("trailer-te", post(CHUNKED, body=chunks(b"hello", trailers=CHUNKED + b"\r\n")), 400),
    (
        "trailer-connection-cl",
        post(CHUNKED, body=chunks(b"hello", trailers=b"Connection: content-length\r\n")),
        Forward(),
    ),
    ("trailer-host", post(CHUNKED, body=chunks(b"hello", trailers=b"Host: other\r\n")), Forward()),
    ("trailer-obs-fold", post(CHUNKED, body=chunks(b"hello", trailers=b"X-T: a\r\n b\r\n")), 400),
    # --- request-targets ---------------------------------------------------------------------
    ("fragment", b"GET /fixed#frag HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("fragment-after-query", b"GET /a?x=1#f HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("fragment-only", b"GET /# HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("absolute-other-host", b"GET http://other/b HTTP/1.1\r\nHost: x\r\n\r\n", Forward()),
    ("absolute-with-port", b"GET http://other:8080/b?q=1 HTTP/1.1\r\nHost: x\r\n\r\n", Forward()),
    ("absolute-no-path", b"GET http://other HTTP/1.1\r\nHost: x\r\n\r\n", Forward()),
    ("absolute-userinfo", b"GET http://user@other/b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("absolute-fragment", b"GET http://other/b#f HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("asterisk", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", Forward()),
    ("connect", b"CONNECT other:443 HTTP/1.1\r\nHost: other:443\r\n\r\n", 405),
    # --- plain shapes that must pass untouched ---------------------------------------------
    ("pipelined", post(cl(b"abc"), body=b"abc") + post(CHUNKED, body=chunks(b"de", b"f")), Forward()),
    ("hidden-in-body", post(cl(HIDDEN), body=HIDDEN), Forward()),
    (
        "http10-keep-alive",
        head(b"POST /a HTTP/1.0", b"Host: x", b"Connection: keep-alive", cl(b"abc"), body=b"abc"),
        Forward(),
    ),
]


def effective(request: ParsedRequest) -> tuple[bytes, bytes, bytes, bytes]:
    authority, target = request.effective()
    return request.method, authority, target, request.body


async def exchange(payload: bytes, expect: int | Forward) -> tuple[Client, list[bytes]]:
    """Send ``payload`` and the sentinel; returns the client (its responses read) and the target's streams."""
    async with backend("record") as b:
        table = routing_table(http_listener(forward_to("g"), (FIXED,)), (target_group("g", b),))
        async with proxy(table) as (_, port):
            async with await Client.open(port) as client:
                client.send(payload + SENTINEL)
                if isinstance(expect, Forward):
                    count = (
                        expect.requests
                        if expect.requests is not None
                        else len(parse_stream(payload + SENTINEL).requests)
                    )
                    client.responses = [await client.response(timeout=3) for _ in range(count)]  # type: ignore[attr-defined]
                    await asyncio.sleep(
                        0.2 if expect is PENDING else 0.02
                    )  # anything glued after the last answer comes now
                else:
                    client.raw += await client.read_raw(timeout=3)
        return client, [bytes(raw) for raw in b.stats.raw]


@pytest.mark.parametrize("name,payload,expect", ROWS, ids=[r[0] for r in ROWS])
def test_smuggling_table(name: str, payload: bytes, expect: int | Forward) -> None:
    client, streams = run(exchange(payload, expect))
    sent = parse_stream(payload + SENTINEL)
    seen: list[ParsedRequest] = []
    for raw in streams:
        stream = parse_stream(raw)
        if isinstance(expect, Forward):
            assert stream.error is None and (stream.rest == b"" or expect is PENDING), (stream.error, stream.rest[:80])
        seen += stream.requests
    # The invariant, whatever the row: the target saw the client's requests, in order, and no other.
    assert [effective(r) for r in seen] == [effective(r) for r in sent.requests[: len(seen)]]
    if isinstance(expect, Forward):
        count = expect.requests if expect.requests is not None else len(sent.requests)
        assert len(seen) == count, f"target saw {len(seen)} of {count}"
        responses = client.responses  # type: ignore[attr-defined]
        for request, response in zip(seen, responses):
            assert (response.status, response.body) == (200, request.method + b" " + request.target)
        assert not client._done, "an answer nobody asked for"
        if expect.absent:
            assert all(r.header(expect.absent) is None for r in seen), expect.absent
        for request in seen:  # framing the target reads as the strict parser does
            assert not (request.header(b"content-length") and request.header(b"transfer-encoding"))
    else:
        raw = client.raw
        assert raw.count(b"\r\n\r\n") >= 1
        last = raw[raw.rfind(b"HTTP/1.1 ") :]
        assert last.startswith(b"HTTP/1.1 %d " % expect), raw[-300:]
        assert b"connection: close\r\n" in last, last[:200]
        assert raw.count(b"HTTP/1.1 ") == len(seen) + 1, raw  # one answer per forwarded request, then ours
        assert b"/sentinel" not in raw
        assert b"/fixed" not in raw

"""Loopback test backends and a small raw HTTP/1.1 client for the L7 tests.

Backends run as asyncio servers on 127.0.0.1, on an ephemeral port, in the
test's own loop (or a thread's, see :class:`ThreadedBackends`):

- ``http``: a keep-alive HTTP/1.1 server. ``GET /`` answers a JSON echo of
  the request (method, url, headers, body length) with ``x-backend: <name>``;
  ``/download?size=N[&chunked=1]`` streams N bytes; ``/upload`` counts a body
  of any size without keeping it; ``/status/<code>``; ``/slow?ms=N``;
  ``/close`` answers with Connection: close; ``/http10`` answers HTTP/1.0 with
  no length (close-delimited); ``/chunked?n=K`` answers K chunks.
  Expect: 100-continue is honoured with an interim 100.
- ``reset``: reads a request, then resets the connection (RST).
- ``hang``: reads a request, never answers.
- ``garbage``: answers bytes that are not HTTP.
- ``close``: reads a request, closes (FIN) without answering.
- ``truncate``: answers a head promising 1000 bytes, sends 10, then resets.
- ``websocket``: completes the RFC 6455 handshake, then echoes every frame.
- ``halfclose``: answers any request 101, then keeps every byte it gets
  (``stats.raw``); on ``FIN-PLEASE`` it sends ``last words`` and half-closes
  (and reads on); at the client's FIN it sends ``bye after your FIN`` and
  closes.
- ``record``: keeps every byte it receives, per connection (``stats.raw``),
  and answers each request it can delimit with a small 200 whose body is
  ``<method> <target>``, or with what its ``script`` returns: (delay, bytes)
  writes, for a target that misbehaves on cue. It delimits requests with
  httptools as a naive target would (the bytes after an Upgrade request are
  parsed as the next request): the tests judge framing by ``stats.raw``.

Everything started here is closed by the ``async with`` that started it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import ipaddress
import json
import os
import re
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import httptools

from lb import model as m
from lb.l7.config import L7Config
from lb.l7.server import serve
from lb.l7.table import GroupTargets, RoutingTable
from lb.l7.worker import Worker

HOST = "127.0.0.1"
Headers = dict[str, str] | list[tuple[str, str]] | tuple[tuple[str, str], ...]
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"


# --- backends -------------------------------------------------------------------


@dataclass
class BackendStats:
    connections: int = 0  # accepted
    requests: int = 0
    upload_bytes: int = 0
    peers: list[tuple[str, int]] = field(default_factory=list)
    raw: list[bytearray] = field(default_factory=list)  # record: every byte received, per connection
    eofs: int = 0  # record / half-close: connections whose peer sent FIN


class _HttpBackend(asyncio.Protocol):
    def __init__(self, name: str, stats: BackendStats, body: bytes | None, close_after: int = 0) -> None:
        self.close_after = close_after  # >0: after that many answers, drop the next request and close
        self.answered = 0
        self.name = name
        self.stats = stats
        self.fixed_body = body
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_len = 0
        self.paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.queue: asyncio.Queue[tuple[bytes, bytes, list[tuple[bytes, bytes]], int, bool]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # create_server's: a stream transport
        self.stats.connections += 1
        self.stats.peers.append(transport.get_extra_info("peername")[:2])
        self.task = asyncio.get_running_loop().create_task(self.serve())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    async def drain(self) -> None:
        if self.paused:
            self.drain_waiter = asyncio.get_running_loop().create_future()
            await self.drain_waiter

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body_len = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if name.lower() == b"expect" and value.lower() == b"100-continue":
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        self.stats.upload_bytes += len(body)

    def on_message_complete(self) -> None:
        self.stats.requests += 1
        method = self.parser.get_method()
        self.queue.put_nowait((method, self.url, self.headers, self.body_len, self.parser.should_keep_alive()))

    async def serve(self) -> None:
        while True:
            method, url, headers, body_len, keep_alive = await self.queue.get()
            if self.close_after and self.answered >= self.close_after:
                assert self.transport is not None
                self.transport.close()
                return
            self.answered += 1
            await self.respond(method, url, headers, body_len, keep_alive)

    async def respond(
        self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], body_len: int, keep_alive: bool
    ) -> None:
        t = self.transport
        assert t is not None
        parts = urlsplit(url.decode("latin-1"))
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        extra = b"x-backend: " + self.name.encode() + b"\r\n"
        if path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            t.write(b"HTTP/1.1 %d Whatever\r\n%scontent-length: 0\r\n\r\n" % (code, extra))
            return
        if path == "/slow":
            await asyncio.sleep(int(query.get("ms", "100")) / 1000)
        if path == "/download":
            size = int(query["size"])
            chunked = query.get("chunked") == "1"
            framing = b"transfer-encoding: chunked\r\n" if chunked else b"content-length: %d\r\n" % size
            t.write(b"HTTP/1.1 200 OK\r\n" + extra + framing + b"\r\n")
            block = os.urandom(64 * 1024) if query.get("random") else b"x" * (64 * 1024)
            left = size
            while left > 0:
                piece = block[: min(left, len(block))]
                left -= len(piece)
                t.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                await self.drain()
            if chunked:
                t.write(b"0\r\n\r\n")
            return
        if path == "/chunked":
            t.write(b"HTTP/1.1 200 OK\r\n" + extra + b"transfer-encoding: chunked\r\n\r\n")
            for i in range(int(query.get("n", "3"))):
                piece = b"chunk%d;" % i
                t.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await asyncio.sleep(0)
            t.write(b"0\r\n\r\n")
            return
        if path == "/http10":
            t.write(b"HTTP/1.0 200 OK\r\n" + extra + b"\r\nclose-delimited body")
            t.close()
            return
        if self.fixed_body is not None:
            body = self.fixed_body
        else:
            body = json.dumps(
                {
                    "backend": self.name,
                    "method": method.decode(),
                    "url": url.decode("latin-1"),
                    "headers": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers],
                    "body_len": body_len,
                }
            ).encode()
        close = path == "/close" or not keep_alive
        head = b"HTTP/1.1 200 OK\r\n" + extra + b"content-type: application/json\r\n"
        head += b"content-length: %d\r\n" % len(body)
        if close:
            head += b"connection: close\r\n"
        t.write(head + b"\r\n" + (b"" if method == b"HEAD" else body))
        if close:
            t.close()


class _MisbehavingBackend(asyncio.Protocol):
    """reset / hang / garbage / close: each reacts to the first request bytes."""

    def __init__(self, kind: str, stats: BackendStats) -> None:
        self.kind = kind
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # create_server's: a stream transport
        self.stats.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        self.stats.requests += 1
        t = self.transport
        assert t is not None
        if self.kind == "reset":
            sock = t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            t.abort()
        elif self.kind == "garbage":
            t.write(b"this is not HTTP at all\r\n\r\n")
        elif self.kind == "close":
            t.close()
        elif self.kind == "truncate":  # promises 1000 bytes, sends 10, then resets
            t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
            sock = t.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            asyncio.get_running_loop().call_later(0.05, t.abort)
        # hang: nothing


class _WebSocketBackend(asyncio.Protocol):
    def __init__(self, stats: BackendStats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # create_server's: a stream transport
        self.stats.connections += 1

    def data_received(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        self.buffer += data
        if not self.open:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            self.stats.requests += 1
            key = b""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            t.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            self.open = True
            self.buffer = rest
        while True:
            frame = decode_frame(self.buffer)
            if frame is None:
                return
            opcode, payload, used = frame
            self.buffer = self.buffer[used:]
            if opcode == 8:  # close
                t.write(encode_frame(8, payload, mask=False))
                t.close()
                return
            t.write(encode_frame(opcode, payload, mask=False))


class _HalfCloseBackend(asyncio.Protocol):
    def __init__(self, stats: BackendStats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()
        self.open = False
        self.sent_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.stats.connections += 1
        self.stats.raw.append(self.raw)

    def data_received(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        if not self.open:
            self.open = True
            self.stats.requests += 1
            t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            data = data.partition(b"\r\n\r\n")[2]
        self.raw += data
        if b"FIN-PLEASE" in data and not self.sent_eof:
            self.sent_eof = True
            t.write(b"last words")
            t.write_eof()

    def eof_received(self) -> bool:
        self.stats.eofs += 1
        t = self.transport
        assert t is not None
        if not self.sent_eof:
            t.write(b"bye after your FIN")
        t.close()
        return True


def encode_frame(opcode: int, payload: bytes, mask: bool = True) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def decode_frame(data: bytes) -> tuple[int, bytes, int] | None:
    """(opcode, unmasked payload, bytes used) of the first whole frame, or None."""
    if len(data) < 2:
        return None
    opcode = data[0] & 0x0F
    masked = data[1] & 0x80
    n = data[1] & 0x7F
    i = 2
    if n == 126:
        if len(data) < 4:
            return None
        n = struct.unpack("!H", data[2:4])[0]
        i = 4
    elif n == 127:
        if len(data) < 10:
            return None
        n = struct.unpack("!Q", data[2:10])[0]
        i = 10
    key = b""
    if masked:
        key = data[i : i + 4]
        i += 4
    if len(data) < i + n:
        return None
    payload = data[i : i + n]
    if masked:
        payload = bytes(b ^ key[j % 4] for j, b in enumerate(payload))
    return opcode, payload, i + n


# What a recording backend writes for one request: (method, target, headers,
# body) → [(delay in seconds, bytes)], or None for its usual answer.
Script = Callable[[bytes, bytes, list[tuple[bytes, bytes]], bytes], list[tuple[float, bytes]] | None]


def echo_response(method: bytes, target: bytes) -> bytes:
    """The recording backend's usual answer: a 200 whose body names the request."""
    body = method + b" " + target
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


class _RecordingBackend(asyncio.Protocol):
    def __init__(self, stats: BackendStats, script: Script | None) -> None:
        self.stats = stats
        self.script = script
        self.raw = bytearray()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.failed = False
        self.last_write = 0.0  # writes stay in order, whatever their delays

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.stats.connections += 1
        self.stats.raw.append(self.raw)

    def data_received(self, data: bytes) -> None:
        self.raw += data
        while data and not self.failed:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as exc:  # naive: the rest is the next request
                data = data[exc.args[0] :]
                self.parser = httptools.HttpRequestParser(self)
            except httptools.HttpParserError:
                self.failed = True  # keep recording, answer nothing more

    def eof_received(self) -> bool:
        self.stats.eofs += 1
        return False

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.stats.requests += 1
        method = self.parser.get_method()
        writes = self.script(method, self.url, self.headers, b"".join(self.body)) if self.script else None
        if writes is None:
            writes = [(0.0, echo_response(method, self.url))]
        loop = asyncio.get_running_loop()
        for delay, data in writes:
            when = self.last_write = max(self.last_write, loop.time() + delay)
            loop.call_at(when, self._write, data)

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            if data:
                t.write(data)
            else:  # b"": close
                t.close()


@dataclass
class Backend:
    kind: str
    name: str
    port: int
    stats: BackendStats
    server: asyncio.AbstractServer
    protocols: list[Any] = field(default_factory=list)  # one per accepted connection, in order

    @property
    def endpoint(self) -> tuple[str, int, int]:
        return (HOST, self.port, 1)


@contextlib.asynccontextmanager
async def backend(
    kind: str = "http", name: str = "b", body: bytes | None = None, close_after: int = 0, script: Script | None = None,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Backend]:
    """Start one backend on 127.0.0.1:<ephemeral>; closed on exit. With ``tls``
    (a server context), it speaks TLS (an HTTPS target)."""
    stats = BackendStats()
    factory: Callable[[], asyncio.Protocol]
    if kind == "record":
        factory = functools.partial(_RecordingBackend, stats, script)
    elif kind == "halfclose":
        factory = functools.partial(_HalfCloseBackend, stats)
    elif kind == "http":
        factory = functools.partial(_HttpBackend, name, stats, body, close_after)
    elif kind == "websocket":
        factory = functools.partial(_WebSocketBackend, stats)
    elif kind in ("reset", "hang", "garbage", "close", "truncate"):
        factory = functools.partial(_MisbehavingBackend, kind, stats)
    else:
        raise ValueError(kind)
    loop = asyncio.get_running_loop()
    protocols: list[Any] = []

    def tracked() -> asyncio.Protocol:
        protocol = factory()
        protocols.append(protocol)  # its transport is aborted on exit
        return protocol

    server = await loop.create_server(tracked, HOST, 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Backend(kind, name, port, stats, server, protocols)
    finally:
        server.close()
        for protocol in protocols:
            if protocol.transport is not None:
                protocol.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)


class ThreadedBackends:
    """Backends in their own thread and loop, for tests whose proxy is in processes."""

    def __init__(self, *specs: tuple[str, str]) -> None:
        self.specs = specs
        self.backends: list[Backend] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None

    def __enter__(self) -> list[Backend]:
        ready = threading.Event()
        errors: list[BaseException] = []

        async def main() -> None:
            self._stop = asyncio.Event()
            async with contextlib.AsyncExitStack() as stack:
                try:
                    for kind, name in self.specs:
                        self.backends.append(await stack.enter_async_context(backend(kind, name)))
                except BaseException as exc:
                    errors.append(exc)
                    ready.set()
                    raise
                ready.set()
                await self._stop.wait()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(main())
            except Exception as exc:  # noqa: BLE001 (reported by __enter__ when it happens at start)
                errors.append(exc)
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            self.__exit__()
            raise errors[0]
        return self.backends

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


# --- the client -------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    version: str

    def header(self, name: str) -> bytes | None:
        key = name.lower().encode()
        for n, v in self.headers:
            if n.lower() == key:
                return v
        return None

    def headers_named(self, name: str) -> list[bytes]:
        key = name.lower().encode()
        return [v for n, v in self.headers if n.lower() == key]

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A raw HTTP/1.x client on one connection: send bytes, read responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._done: list[Response] = []
        self._head_only = False
        self._new_parser()
        self.raw = b""  # every byte received

    def _new_parser(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._reason = b""

    @classmethod
    async def open(
        cls, port: int, host: str = HOST, ssl: Any = None, server_hostname: str | None = None
    ) -> Client:
        """Connect; with ``ssl`` (a client SSLContext), over TLS with that SNI."""
        reader, writer = await asyncio.open_connection(
            host, port, limit=1 << 20, ssl=ssl, server_hostname=server_hostname if ssl is not None else None
        )
        return cls(reader, writer)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> Client:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Headers | None = None,
        body: bytes = b"",
        host: str = "example.com",
    ) -> Response:
        self.send(build_request(method, path, headers, body, host))
        return await self.response(head_only=method == "HEAD")

    # httptools callbacks
    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._head_only and self.parser.get_status_code() >= 200:
            self._finish()
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._finish()

    def _finish(self) -> None:
        self._done.append(
            Response(
                self.parser.get_status_code(),
                self._reason,
                self._headers,
                b"".join(self._body),
                self.parser.get_http_version(),
            )
        )
        self._headers, self._body, self._reason = [], [], b""

    async def upgrade_to_websocket(self, path: str = "/chat") -> bytes:
        """Ask for a WebSocket on this connection (a new random key); the answer's head."""
        key = base64.b64encode(os.urandom(16)).decode()
        self.send(build_request("GET", path, {"Upgrade": "websocket", "Connection": "Upgrade",
                                              "Sec-WebSocket-Key": key, "Sec-WebSocket-Version": "13"}))
        return await self.reader.readuntil(b"\r\n\r\n")

    async def websocket_echo(self, opcode: int, payload: bytes) -> bytes:
        """Send one WebSocket frame; the payload of the first whole frame back."""
        self.send(encode_frame(opcode, payload))
        buffer = b""
        while (frame := decode_frame(buffer)) is None:
            buffer += await self.reader.read(1 << 16)
        return frame[1]

    async def response(self, head_only: bool = False, timeout: float = 5.0) -> Response:
        """The next whole response (interim 1xx ones are returned too)."""
        self._head_only = head_only
        async with asyncio.timeout(timeout):
            while not self._done:
                data = await self.reader.read(1 << 16)
                if not data:
                    with contextlib.suppress(httptools.HttpParserError):
                        self.parser.feed_data(b"")
                    framed = any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self._headers)
                    if (self._body or self._headers) and not framed:  # close-delimited: EOF ends it
                        self._finish()
                    if not self._done:
                        raise ConnectionError("closed before a whole response")
                    break
                self.raw += data
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserCallbackError as exc:
                    if not isinstance(exc.__context__, _Stop):
                        raise
                    self._new_parser()
        return self._done.pop(0)

    async def read_raw(self, timeout: float = 5.0) -> bytes:
        """Everything until the server closes the connection."""
        out: list[bytes] = []
        async with asyncio.timeout(timeout):
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    return b"".join(out)
                out.append(data)

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read(1) == b""
        except ConnectionResetError:
            return True


class _Stop(Exception):
    pass


def build_request(
    method: str = "GET",
    path: str = "/",
    headers: Headers | None = None,
    body: bytes = b"",
    host: str = "example.com",
) -> bytes:
    """``headers``: a dict, or (name, value) pairs (a name may repeat)."""
    pairs = list(headers.items() if isinstance(headers, dict) else headers or ())
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in pairs:
        lines.append(f"{name}: {value}")
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in pairs):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, then read until the server closes; returns what came back."""
    async with await Client.open(port) as client:
        client.send(data)
        return await client.read_raw(timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: connecting to it hangs (no SYN-ACK)."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind((HOST, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(8):  # fill the accept queue; further SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            fillers.append(filler)
            try:
                filler.connect((HOST, port))
            except BlockingIOError:
                pass
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# --- the proxy under test ---------------------------------------------------------

LOCALHOST = ipaddress.ip_address(HOST)


def http_listener(
    action: m.Action, rules: tuple[m.Rule, ...] = (), name: str = "web", port: int = 0, tls: m.ListenerTls | None = None
) -> m.Listener:
    """An HTTP listener, or with ``tls`` an HTTPS one."""
    return m.Listener(name, m.Protocol.HTTP, LOCALHOST, port, action, rules, tls)


def forward_to(*groups: str | tuple[str, int], stickiness: int | None = None) -> m.ForwardAction:
    """A forward action: names, or (name, weight) pairs; ``stickiness`` = group cookie seconds."""
    weighted = tuple(m.WeightedTargetGroup(g) if isinstance(g, str) else m.WeightedTargetGroup(*g) for g in groups)
    sticky = m.GroupStickiness(True, stickiness) if stickiness else m.GroupStickiness()
    return m.ForwardAction(weighted, sticky)


def target_group(
    name: str,
    *backends: Backend | tuple[str, int, int],
    algorithm: str = "round_robin",
    sticky: int | None = None,
    draining: tuple[tuple[str, int], ...] = (),
    tls: m.TargetTls | None = None,
) -> GroupTargets:
    """``tls``: an HTTPS group."""
    stickiness = m.Stickiness(enabled=True, duration=sticky) if sticky else m.Stickiness()
    group = m.TargetGroup(name, m.Protocol.HTTP, 80, algorithm=m.Algorithm(algorithm), stickiness=stickiness,
                          tls=tls)
    endpoints = tuple(b.endpoint if isinstance(b, Backend) else b for b in backends)
    return GroupTargets(group, endpoints, frozenset(draining))


def routing_table(
    listeners: m.Listener | tuple[m.Listener, ...],
    groups: tuple[GroupTargets, ...] = (),
    idle_timeout: float = 5.0,
    version: int = 0,
    access_log: str | None = None,
    log_format: str = "text",
) -> RoutingTable:
    """``access_log``: a path (or "-") to turn the access log on."""
    if not isinstance(listeners, tuple):
        listeners = (listeners,)
    settings = m.AccessLog() if access_log is None else m.AccessLog(True, access_log, m.AccessLogFormat(log_format))
    return RoutingTable(listeners, groups, idle_timeout=idle_timeout, version=version, access_log=settings)


# --- the access log, read back ------------------------------------------------------------

ACCESS_LOG_FIELDS = (
    "type", "time", "listener", "client", "target", "request_processing_time", "target_processing_time",
    "response_processing_time", "elb_status_code", "target_status_code", "received_bytes", "sent_bytes", "request",
    "user_agent", "target_group", "request_id", "matched_rule_priority", "request_creation_time",
    "actions_executed", "error_reason", "redirect_url", "ssl_cipher", "ssl_protocol",
)  # fmt: skip
_TEXT_FIELD = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')


def parse_access_line(line: str) -> dict[str, Any]:
    """One access log line, either format, as {field: value}: JSON's types, and
    for text the strings as written, "-" for none (as JSON's null)."""
    if line.startswith("{"):
        record: dict[str, Any] = json.loads(line)
        assert list(record) == list(ACCESS_LOG_FIELDS), list(record)
        return record
    values = [quoted if quoted is not None or bare is None else bare
              for quoted, bare in (match.groups() for match in _TEXT_FIELD.finditer(line))]
    assert len(values) == len(ACCESS_LOG_FIELDS), (len(values), line)
    record = dict(zip(ACCESS_LOG_FIELDS, values))
    for key in ("elb_status_code", "received_bytes", "sent_bytes"):
        record[key] = int(record[key])
    for key in ("target_status_code", "matched_rule_priority"):
        record[key] = None if record[key] == "-" else int(record[key])
    for key in ("request_processing_time", "target_processing_time", "response_processing_time"):
        record[key] = float(record[key])
    for key in ("target", "target_group", "user_agent", "actions_executed", "error_reason", "redirect_url",
                "ssl_cipher", "ssl_protocol"):
        if record[key] == "-":
            record[key] = None
    return record


def read_access_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path) as f:
        return [parse_access_line(line) for line in f.read().splitlines()]


@contextlib.asynccontextmanager
async def proxy(
    table: RoutingTable, config: L7Config | None = None, grace: float = 0.5
) -> AsyncIterator[tuple[Worker, int]]:
    """lb's worker in this loop: yields (worker, port of the first listener)."""
    worker = await serve(table, config=config or L7Config(connect_timeout=2.0))
    try:
        yield worker, worker.addresses[table.listeners[0].name][1]
    finally:
        await worker.stop(grace)


def run(coro: Any, timeout: float = 20.0) -> Any:
    """Run one test coroutine in a fresh uvloop, bounded in time."""
    import uvloop

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return uvloop.run(bounded())

"""One keep-alive connection to a target: send a request, relay its response.

The connection is the httptools callback object for its responses (as the
client side is for requests). The response head is rebuilt from the parsed
headers without the hop-by-hop ones, with framing and Connection chosen for
the client; body bytes are relayed as they come, re-chunked when the client
gets chunked encoding. Everything produced while feeding one chunk from the
target is joined and written to the client once: one send per read.

Failures map to the load balancer's own answers: reset, refused, malformed
or closed before a response → 502 (``upstream_failed`` of the exchange's
:class:`~lb.l7.exchange.Client`, the boundary this side knows the client by);
a response cut short → the client connection is aborted, as the bytes already
sent cannot be taken back. A connection that served a request before and
closes before answering the next one is retried once on a new connection when
the request has no body (the target closed an idle keep-alive connection
just as we reused it).

A connection that delivers bytes nobody asked for (after the final response
to its request, in the same read or while idle in its pool) is poisoned:
those bytes reach no client and the connection is closed, never reused.

A :class:`Pool` per target endpoint (per worker) keeps the idle keep-alive
connections to it, opens new ones, and hands a released connection straight
to a request queued for it when ``max_conns_per_target`` is reached. Pools
outlive routing tables: a swap *retires* the pools of endpoints that left
(their idle connections close now, busy ones when released), and
``outstanding`` — the requests this worker has in flight to the endpoint —
is what least_outstanding_requests reads. The connection and its pool are
one module because each needs the other: the pool makes connections, a
connection goes back to (or is forgotten by) its pool.
"""

from __future__ import annotations

import asyncio
import logging
import select
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)

from lb import tls
from lb.l7 import errors, flow_control
from lb.l7.clock import Clock
from lb.l7.config import L7Config
from lb.l7.httputil import (
    COMMON_RESPONSE_HEADERS,
    CRLF,
    FRAMING,
    UNKNOWN,
    connection_names,
    header_table,
    status_line,
    without_headers,
)
from lb.model import TargetTls

if TYPE_CHECKING:
    from lb.l7.exchange import Exchange

log = logging.getLogger("lb.l7")
_now = time.perf_counter

_COLON = b": "
_CHUNKED = b"transfer-encoding: chunked\r\n"
_CLOSE = b"connection: close\r\n"
_KEEP_ALIVE = b"connection: keep-alive\r\n"
_LAST_CHUNK = b"0\r\n\r\n"

# Response headers the proxy does not pass through as they are.
_CONNECTION, _HOP, _TRANSFER_ENCODING, _UPGRADE, _CONTENT_LENGTH = range(5)
_SPECIAL = {
    b"connection": _CONNECTION,
    b"keep-alive": _HOP,
    b"proxy-connection": _HOP,
    b"te": _HOP,
    b"trailer": _HOP,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"upgrade": _UPGRADE,
    b"content-length": _CONTENT_LENGTH,
}
_TABLE = header_table(_SPECIAL, COMMON_RESPONSE_HEADERS)


class _HeadOnly(Exception):
    """Raised in on_headers_complete to stop the parser after a HEAD response.

    httptools cannot be told that a response answers HEAD, so it would wait
    for the Content-Length bytes that never come.
    """


class _BadResponse(Exception):
    pass


class _HeadTooLarge(_BadResponse):
    pass


# --- the connection -----------------------------------------------------------------


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        # For the connection's lifetime.
        "pool",
        "transport",
        "parser",
        "last_rx",  # coarse clock stamp of the last bytes from the target
        "served",  # responses completed on it
        "read_paused",  # by the client, whose write buffer is full
        "write_paused",  # by our transport, whose write buffer is full
        "tunnel",  # after a 101: raw bytes both ways
        "eof_in",  # the target sent FIN through the tunnel
        "poller",  # polls the socket for stray bytes before an idle connection is reused
        # While it serves one exchange.
        "ex",
        "client_tx",
        "out",  # client-bound bytes produced by one feed_data
        "parts",  # response head being rebuilt: [status line, name, ": ", value, CRLF, ...]
        "phrase",
        "keep_alive",
        "done",
        "broken",
        "got_data",
        "in_body",
        "has_length",
        "chunked_in",
        "chunk_out",
        "interim",
        "upgrade_value",
        "drop",
        "head_size",  # bytes of the response head(s) parsed so far: status lines and fields
        "head_rx",  # bytes read while a response head was incomplete
        "max_head",  # the pool's (L7Config.max_response_head)
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport  # set by connection_made, before anything reads it
        self.parser = HttpResponseParser(self)
        self.last_rx = pool.clock.now
        self.served = 0
        self.read_paused = False
        self.write_paused = False
        self.tunnel = False
        self.eof_in = False
        self.poller: select.poll | None = None
        self.ex: Exchange | None = None
        self.client_tx: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.parts: list[bytes] = []
        self.phrase = b""
        self.keep_alive = False
        self.done = False
        self.broken = False
        self.got_data = False
        self.in_body = False
        self.has_length = False
        self.chunked_in = False
        self.chunk_out = False
        self.interim = False
        self.upgrade_value = b""
        self.drop: set[bytes] | None = None
        self.head_size = 0
        self.head_rx = 0
        self.max_head = pool.max_head

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: uvloop's are asyncio.Transports in all but name.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN)

    def stray(self) -> bool:
        """Whether bytes (or the end) wait unread on this idle connection.

        Asked before an idle connection is reused: what a target sends while
        nobody asked for anything is normally read at once and closes the
        connection (data_received), but the client's next request can be read
        first in the same loop iteration, and those bytes would be taken for
        its response. One poll(2) with no timeout.
        """
        poller = self.poller
        return poller is not None and bool(poller.poll(0))

    def attach(self, ex: Exchange) -> None:
        """Serve ``ex``: its request head is written next by the client side."""
        client = ex.client
        self.ex = ex
        self.client_tx = client.transport
        self.done = self.broken = self.got_data = False
        self.head_size = self.head_rx = 0
        self._new_message()
        self.last_rx = self.pool.clock.now
        if client.write_paused:
            self.pause_reading()
        if self.write_paused:
            client.gate.pause(flow_control.UPSTREAM_FULL)

    def detach(self) -> None:
        ex = self.ex
        self.ex = None
        self.client_tx = None
        if ex is not None and self.write_paused:
            ex.client.gate.resume(flow_control.UPSTREAM_FULL)
        if self.read_paused:
            self.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.pool.clock.now
        if self.tunnel:
            tx = self.client_tx
            assert tx is not None  # the tunnel ends with detach(), which stops our reading
            tx.write(data)
            return
        ex = self.ex
        if ex is None:  # bytes nobody asked for: the connection is unusable
            self.transport.close()
            return
        self.got_data = True
        out = self.out = []
        failed = None
        reason = errors.TARGET_RESPONSE_MALFORMED
        in_head = not self.in_body
        if in_head:
            self.head_rx += len(data)
        try:
            if ex.head_only and not ex.upgrade:
                self._feed_head_only(data)
            else:
                self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            failed = self._switch(ex, data[exc.args[0] :])
        except HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadOnly):
                self.parser = HttpResponseParser(self)  # the old one stopped mid-message
            else:
                cause = exc.__context__
                if not isinstance(cause, _BadResponse):
                    log.error("upstream %s: callback failed", self.pool.label, exc_info=cause)
                failed = f"malformed response: {cause or exc}"
                if isinstance(cause, _HeadTooLarge):
                    reason = errors.TARGET_RESPONSE_HEAD_TOO_LARGE
        except HttpParserError as exc:
            failed = f"malformed response: {exc}"
        else:
            # Still in a head after this read: every byte of it was head (the
            # parser buffers a field until it ends: bound it before it does).
            if in_head and not self.in_body and not self.done and self.head_rx > self.max_head:
                failed = "response head too large"
                reason = errors.TARGET_RESPONSE_HEAD_TOO_LARGE
        if out:
            chunk = b"".join(out) if len(out) > 1 else out[0]
            ex.resp_bytes += len(chunk)
            tx = self.client_tx
            assert tx is not None  # set with self.ex
            tx.write(chunk)
        if failed is not None:
            self.broken = True
            if not self.done:  # else: a whole response, then junk: relay it, drop the connection
                self._fail(ex, failed, reason)
                return
        if self.done:
            self._complete(ex)
        elif self.tunnel:
            ex.client.start_tunnel(ex, self)

    def _feed_head_only(self, data: bytes) -> None:
        """Feed a response to HEAD a line at a time, to know where its head ends.

        The parser is stopped at the end of the head (_HeadOnly): any byte
        after it in the same read is one nobody asked for, and poisons the
        connection.
        """
        pos = 0
        size = len(data)
        while pos < size:
            end = data.find(b"\n", pos) + 1 or size
            try:
                self.parser.feed_data(data[pos:end])
            except HttpParserCallbackError as exc:
                if end < size and isinstance(exc.__context__, _HeadOnly):
                    self.broken = True
                raise
            pos = end

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        ex = self.ex
        if ex is None:
            return
        if self.tunnel:
            self.ex = None
            ex.client.tunnel_closed()
            return
        if self.in_body and not self.has_length and not self.chunked_in and not ex.head_only:
            # A close-delimited response ends here.
            if self.chunk_out:
                ex.resp_bytes += len(_LAST_CHUNK)
                tx = self.client_tx
                assert tx is not None  # set with self.ex
                tx.write(_LAST_CHUNK)
            self.keep_alive = False
            self._complete(ex)
            return
        self._fail(ex, f"target closed the connection ({exc or 'EOF'})", errors.TARGET_CONNECTION_CLOSED)

    def eof_received(self) -> bool:
        ex = self.ex
        if self.tunnel and ex is not None:  # half-close: the client may still send
            self.eof_in = True
            return ex.client.tunnel_eof()
        return False

    def client_eof(self) -> bool:
        """The client sent FIN through the tunnel: pass it on to the target.

        Returns whether the client's connection stays open, for the target's
        bytes still to come; not if the target had finished sending too.
        """
        if self.eof_in:
            return False
        if not self.transport.can_write_eof():  # TLS to the target: no half-close
            self.transport.close()
            return False
        if not self.transport.is_closing():
            self.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self.ex
        if ex is not None:
            ex.client.gate.pause(flow_control.UPSTREAM_FULL)

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.ex
        if ex is not None:
            ex.client.gate.resume(flow_control.UPSTREAM_FULL)

    # --- called by the client side ----------------------------------------------

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            if not self.transport.is_closing():
                self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def close(self) -> None:
        self.transport.close()

    def abort(self) -> None:
        """The exchange gave up on us mid-way: this connection cannot be reused."""
        self.detach()
        self.transport.abort()

    # --- httptools callbacks ----------------------------------------------------

    def _new_message(self) -> None:
        # Called by attach and after an interim response; on_message_begin only
        # watches for responses nobody asked for.
        self.parts = [b""]
        self.phrase = b""
        self.in_body = self.has_length = self.chunked_in = self.chunk_out = False
        self.drop = None

    def on_message_begin(self) -> None:
        # A response begins after the final one to this request: the target sent
        # bytes nobody asked for. Whatever they are, they are not relayed (the
        # parser stops at their head) and the connection is never reused.
        if self.done:
            self.broken = True

    def on_status(self, phrase: bytes) -> None:
        self.phrase += phrase
        self.head_size = size = self.head_size + len(phrase) + 15  # "HTTP/1.1 200 " and CRLF
        if size > self.max_head:
            raise _HeadTooLarge("response head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size = size = self.head_size + len(name) + len(value) + 4
        if size > self.max_head:  # trailers count too
            raise _HeadTooLarge("response head too large")
        if self.in_body:  # a trailer: not passed on
            return
        kind = _TABLE.get(name, UNKNOWN)
        if kind is None:  # the usual header, passed on as it came
            self.parts += (name, _COLON, value, CRLF)
            return
        if kind == UNKNOWN:
            kind = _SPECIAL.get(name.lower())
        if kind is None:
            self.parts += (name, _COLON, value, CRLF)
        elif kind == _CONTENT_LENGTH:
            self.has_length = True
            self.parts += (name, _COLON, value, CRLF)
        elif kind == _TRANSFER_ENCODING:
            if value.strip().lower() != b"chunked":  # a coding we would have to keep
                raise _BadResponse(f"unsupported Transfer-Encoding {value!r}")
            self.chunked_in = True
        elif kind == _CONNECTION:
            # Most targets send exactly "keep-alive" (or "close"): options we
            # act on, naming no header to drop; skip the tokenising call.
            if value != b"keep-alive" and value != b"close":
                self.drop = connection_names(value, self.drop)
        elif kind == _UPGRADE:
            self.upgrade_value = value

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        ex = self.ex
        assert ex is not None
        if self.done or self.in_body:  # a second response to one request
            self.broken = True
            raise _BadResponse("more than one response")
        if status < 200:
            self.interim = True  # its on_message_complete is not the end
            if status == 101:  # relayed when the parser raises HttpParserUpgrade
                return
            if ex.version11:  # 100 Continue, 103 Early Hints: relayed to 1.1 clients
                parts = self.parts
                parts[0] = status_line(status, self.phrase)
                parts.append(CRLF)
                self.out += parts
            return
        if self.drop is not None and not self.drop.isdisjoint(FRAMING):
            # Framed by a header it nominates as hop-by-hop: relayed without it, the
            # body would run into the next response. Malformed (502), not reused.
            raise _BadResponse("Connection nominates a framing header")
        self.in_body = True
        self.keep_alive = parser.should_keep_alive()
        ex.upstream_time = _now() - ex.t_sent
        ex.status = status
        ex.response_started = True
        client = ex.client
        close = ex.close_after or not ex.keep_alive or client.closing or ex.upgrade or not ex.request_complete
        framing = b""
        if ex.head_only or status == 204 or status == 304 or self.has_length:
            pass
        elif ex.version11:  # chunked or close-delimited from the target: chunked to the client
            framing = _CHUNKED
            self.chunk_out = True
        else:  # an HTTP/1.0 client: the end of the body is the end of the connection
            close = True
        ex.close_after = close
        parts = self.parts
        parts[0] = status_line(status, self.phrase)
        if self.drop is not None:
            parts = without_headers(parts, self.drop, 1)  # after the status line
        out = self.out
        out += parts
        out.append(framing)
        out.append(_CLOSE if close else (b"" if ex.version11 else _KEEP_ALIVE))
        out.append(ex.set_cookies)
        out.append(CRLF)
        if ex.head_only:
            self.done = True
            raise _HeadOnly

    def on_body(self, body: bytes) -> None:
        if self.chunk_out:
            self.out += (b"%x\r\n" % len(body), body, CRLF)
        else:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            if self.parser.get_status_code() != 101:  # a 101's head is relayed by _switch
                self._new_message()
            return
        if self.done:  # a second response to one request
            self.broken = True
            return
        if self.chunk_out:
            self.out.append(_LAST_CHUNK)
        self.done = True

    # --- endings ----------------------------------------------------------------

    def _switch(self, ex: Exchange, rest: bytes) -> str | None:
        """A 101 arrived: relay its head and become a tunnel. None if all is well."""
        if not ex.upgrade or self.parser.get_status_code() != 101 or self.broken:
            return "unexpected 101 Switching Protocols"
        parts = self.parts
        parts[0] = status_line(101, self.phrase)
        self.out += parts
        self.out += (b"connection: upgrade\r\nupgrade: ", self.upgrade_value, CRLF, CRLF)
        if rest:
            self.out.append(rest)
        ex.status = 101
        ex.response_started = True
        ex.upstream_time = _now() - ex.t_sent
        self.tunnel = True
        return None

    def _complete(self, ex: Exchange) -> None:
        reusable = self.keep_alive and not self.broken and ex.request_complete and not ex.upgrade
        self.served += 1
        self.detach()
        if not self.transport.is_closing():
            self.pool.give_back(self, reusable)
        ex.client.response_done(ex)

    def _fail(self, ex: Exchange, why: str, reason: str) -> None:
        """The exchange failed here (``reason``: the access log's error_reason)."""
        retry = self.served > 0 and not self.got_data and ex.retryable()
        self.detach()
        if not self.transport.is_closing():
            self.transport.close()
        if retry:
            ex.client.retry(ex)
        else:
            ex.error_reason = reason
            ex.client.upstream_failed(ex, 502, why)


# --- pools ------------------------------------------------------------------------

# Called with a released connection, or with None: "a slot is free, open one".
Waiter = Callable[[UpstreamConnection | None], None]
# A connection being opened (Pool.open).
Opening = asyncio.Task[tuple[asyncio.BaseTransport, UpstreamConnection]]


class Pool:
    __slots__ = (
        "host",
        "port",
        "label",
        "loop",
        "clock",
        "idle",
        "outstanding",
        "connections",
        "retired",
        "waiters",
        "max_head",
        "ssl",
        "_max_idle",
        "_max_conns",
        "_factory",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Clock, config: L7Config, host: str, port: int,
                 context: ssl.SSLContext | None = None):
        self.host = host
        self.port = port
        self.ssl = context  # HTTPS targets: the group's client context (lb.tls.target_context)
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.loop = loop
        self.clock = clock
        self.idle: list[UpstreamConnection] = []  # LIFO: the warmest connection first
        self.outstanding = 0  # requests in flight to this endpoint
        self.connections = 0  # open or opening
        self.retired = False  # left the table: no idle keeping
        self.waiters: deque[Waiter] = deque()  # requests queued for a connection
        self.max_head = config.max_response_head
        self._max_idle = config.max_idle_per_target
        self._max_conns = config.max_conns_per_target
        self._factory = lambda: UpstreamConnection(self)

    # --- the hot path ---------------------------------------------------------

    def give_back(self, conn: UpstreamConnection, reusable: bool) -> None:
        """A request is done with ``conn``: keep it, hand it on, or close it."""
        if reusable and not self.retired:
            if self.waiters:
                self.waiters.popleft()(conn)
                return
            if len(self.idle) < self._max_idle:
                conn.last_rx = self.clock.now  # idle since
                self.idle.append(conn)
                return
        conn.close()

    # --- opening --------------------------------------------------------------

    def can_open(self) -> bool:
        return not self._max_conns or self.connections < self._max_conns

    def open(self) -> Opening:
        """Start connecting; the caller adds its own done callback."""
        self.connections += 1
        if self.ssl is None:
            connect = self.loop.create_connection(self._factory, self.host, self.port)
        else:  # no SNI: a target is an address
            connect = self.loop.create_connection(self._factory, self.host, self.port, ssl=self.ssl,
                                                  server_hostname="")
        task = self.loop.create_task(connect)
        task.add_done_callback(self._opened)
        return task

    def _opened(self, task: Opening) -> None:
        if task.cancelled() or task.exception() is not None:
            self.connections -= 1
            self._serve_waiter()

    def forget(self, conn: UpstreamConnection) -> None:
        """``conn`` has closed."""
        self.connections -= 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        self._serve_waiter()

    def wait(self, waiter: Waiter) -> None:
        self.waiters.append(waiter)

    def cancel_wait(self, waiter: Waiter) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def _serve_waiter(self) -> None:
        # A connection slot freed: the first queued request may open one.
        if self.waiters and self.can_open():
            self.waiters.popleft()(None)

    # --- retirement -----------------------------------------------------------

    def retire(self) -> None:
        self.retired = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def expire(self, deadline: float) -> None:
        """Close the connections idle since before ``deadline`` (the oldest are first)."""
        idle = self.idle
        while idle and idle[0].last_rx < deadline:
            idle.pop(0).close()


PoolKey = tuple[str, int, TargetTls | None]  # address, port, and TLS to it (HTTPS groups)


class PoolSet:
    """This worker's pools by (address, port, TLS): an endpoint that is the target
    of an HTTP and an HTTPS group, or of two groups with other CA bundles, has
    one pool for each, since their connections are not interchangeable."""

    __slots__ = ("_loop", "_clock", "_config", "pools", "_contexts")

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Clock, config: L7Config) -> None:
        self._loop = loop
        self._clock = clock
        self._config = config
        self.pools: dict[PoolKey, Pool] = {}
        self._contexts: dict[TargetTls, ssl.SSLContext] = {}

    def get(self, host: str, port: int, target_tls: TargetTls | None = None) -> Pool:
        key = (host, port, target_tls)
        pool = self.pools.get(key)
        if pool is None:
            context = None
            if target_tls is not None:
                context = self._contexts.get(target_tls)
                if context is None:
                    context = self._contexts[target_tls] = tls.target_context(target_tls)
            pool = self.pools[key] = Pool(self._loop, self._clock, self._config, host, port, context)
        return pool

    def retain(self, keys: set[PoolKey]) -> None:
        """Retire every pool whose endpoint is not in ``keys``."""
        for key in [k for k in self.pools if k not in keys]:
            self.pools.pop(key).retire()

    def expire(self, deadline: float) -> None:
        for pool in self.pools.values():
            pool.expire(deadline)
        if len(self._contexts) > 1:  # a reload changed a bundle: forget the contexts no pool uses
            used = {key[2] for key in self.pools}
            for stale in [t for t in self._contexts if t not in used]:
                del self._contexts[stale]

    def close(self) -> None:
        for pool in self.pools.values():
            pool.retire()
        self.pools.clear()

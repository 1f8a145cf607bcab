"""The client side of the proxy: one asyncio Protocol per client connection.

The protocol is itself the httptools callback object (as uvicorn's is). A
request is parsed into an :class:`~lb.l7.exchange.Exchange`; when it is the
oldest on the connection it is routed (rules → plan) and answered locally
(fixed-response, redirect) or forwarded on a pooled upstream connection
(:mod:`lb.l7.upstream`), which relays the response. Pipelined requests
queue behind it and are answered in order. Bodies stream both ways; every
buffer has a reason bit in the connection's ReadGate.

The class is one protocol in sections, in the order a request meets them:
asyncio.Protocol (bytes in, backpressure, the connection's end); the
httptools callbacks (a request head and body into an Exchange); answering,
in order (route, answer locally, account, the next request); forwarding
(pick a target, reuse or open a connection, send the head); what the
upstream connection calls (the :class:`~lb.l7.exchange.Client` boundary);
WebSocket upgrades; and errors, timeouts and closing. Its state is grouped
by lifetime in ``__init__``: worker-wide, per connection, per request.

The loop comes from the worker and the transport from ``connection_made``,
so tests drive ``data_received(bytes)`` with a fake transport.

Hot path (a keep-alive GET, the benchmark's): ``data_received`` → four
parser callbacks (on_url, on_header per header, on_headers_complete,
on_message_complete) → ``_start`` (no rule matching when the listener has
no rules) → ``_forward`` → an idle pooled connection → ``_send``: one
``write`` of the head joined from the parts collected by ``on_header``.
Nothing is decoded to ``str`` unless rules need it; the per-connection
parts of the forwarded headers are formatted once in ``connection_made``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from functools import partial
from typing import Protocol, cast

import httptools
from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserUpgrade,
)

from lb.l7 import errors, flow_control
from lb.l7.access_log import AccessLogFile
from lb.l7.actions import FixedResponse, Redirect
from lb.l7.clock import Clock
from lb.l7.config import L7Config
from lb.l7.exchange import Exchange
from lb.l7.flow_control import ReadGate
from lb.l7.httputil import CRLF, NOT_NOMINABLE, UNKNOWN
from lb.l7.request_head import (
    COLON,
    HOST,
    SPECIAL,
    TABLE,
    VALID_HOSTS,
    build_head,
    origin_form,
    peer_address,
    rules_request,
    special_header,
)
from lb.l7.routing import Forward, Routes
from lb.l7.stats import WorkerStats
from lb.l7.stickiness import CookieSigner
from lb.l7.upstream import Opening, Pool, UpstreamConnection
from lb.model import IPAddress

log = logging.getLogger("lb.l7")

_LAST_CHUNK = b"0\r\n\r\n"
_CLOSE = errors.CONNECTION_CLOSE
_KEEP_ALIVE = errors.CONNECTION_KEEP_ALIVE
_now = time.perf_counter  # loop.time() has only millisecond resolution under uvloop
_CLOSING_STATUSES = frozenset((400, 408, 500, 501, 505))
_LINGER = 1.0  # seconds to read and drop after an error response, before closing
_CLIENT_CLOSED = 460  # ELB's access log status for "the client closed first"


def _stand_in_head(ex: Exchange) -> bytes:
    """A head with the framing of ``ex``, for a parser that is to read its body."""
    if ex.chunked:
        return b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
    parts = ex.parts
    for i in range(4, len(parts), 4):
        if parts[i].lower() == b"content-length":
            return b"POST / HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % int(parts[i + 2])
    raise AssertionError("a body without framing")  # has_body comes from one of the two


class _BodyAfterUpgrade:
    """The callbacks of the parser that takes over after a declined Upgrade request with a body.

    httptools stops at such a request's head. The new parser is fed a stand-in
    head with the request's framing (swallowed here), then the bytes that
    followed: the body goes to the client protocol, and so does every later
    request on the connection. A rare path: the per-call delegation is the
    price of keeping the usual parser's callbacks free of a check.
    """

    __slots__ = ("client", "head")

    def __init__(self, client: ClientProtocol) -> None:
        self.client = client
        self.head = True  # the stand-in's

    def on_url(self, url: bytes) -> None:
        if not self.head:
            self.client.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head:
            self.client.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.head:
            self.head = False
        else:
            self.client.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.client.on_body(body)

    def on_message_complete(self) -> None:
        self.client.on_message_complete()


class WorkerView(Protocol):
    """What a client connection uses of its worker (:class:`lb.l7.worker.Worker`)."""

    loop: asyncio.AbstractEventLoop
    clock: Clock
    config: L7Config
    routes: Routes  # swapped whole by a table update: read per request
    signer: CookieSigner
    stats: WorkerStats
    access_log: AccessLogFile | None
    closing: bool

    def opened(self, conn: ClientProtocol) -> None: ...

    def closed(self, conn: ClientProtocol) -> None: ...


class ClientProtocol(asyncio.Protocol):
    __slots__ = (
        # Worker-wide: shared by every connection of the worker.
        "worker",
        "loop",
        "clock",
        "config",
        "listener",  # the listener's name: its route is looked up per request
        "protocol",  # "http" or "https" (TLS terminated before us), for X-Forwarded-Proto and redirects
        # Per connection.
        "tls_cipher",  # the cipher (OpenSSL's name) and protocol ("TLSv1.3") the handshake chose,
        "tls_protocol",  # for the access log; "-" over plain HTTP
        "transport",
        "gate",
        "parser",
        "peer",  # "ip:port", for the access log
        "peer_ip",  # str, or the ip_address object once rules needed it
        "local_host",  # our address, for a redirect or a Host-less HTTP/1.0 request
        "local_port",
        "authority",  # b"<our address>:<port>"
        "xff_line",  # "x-forwarded-for: <peer ip>\r\n", the usual case
        "fwd_tail",  # "x-forwarded-proto: http\r\nx-forwarded-port: <port>\r\n"
        "last_rx",  # coarse clock stamp of the last bytes from the client
        "served",  # exchanges completed
        "write_paused",  # our transport's write buffer is full
        "closing",  # graceful stop: close after the response in flight
        "eof",  # the client sent FIN: answer what it sent, then close
        "broken",  # a request was rejected: parse nothing more
        "dead",  # closed or closing
        "in_head",  # parsing a request head (for its size limit)
        "head_bytes",
        "head_since",  # coarse clock at the first byte of the request head being received, 0 if none
        "swept",  # the last check_idle: time the gate kept the client from sending is not held against it
        "tunnel",  # the upstream connection after a 101
        "upgrading",  # the Upgrade request waiting for its 101
        "held",  # client bytes received while upgrading
        "linger",  # the timer that ends a half-closed connection
        "advancing",  # inside _advance (no recursion)
        # Per request.
        "current",  # the exchange being answered
        "parsing",  # the exchange being parsed (may be current, or queued)
        "last",  # the exchange parsed last
        "queue",  # parsed, waiting for current to finish
    )

    def __init__(self, worker: WorkerView, listener: str, https: bool = False) -> None:
        # Worker-wide.
        self.worker = worker
        self.loop = worker.loop
        self.clock = worker.clock
        self.config = worker.config
        self.listener = listener
        self.protocol = "https" if https else "http"
        # Per connection.
        self.tls_cipher = self.tls_protocol = "-"
        self.transport: asyncio.Transport  # set by connection_made, before anything reads it
        self.gate: ReadGate  # likewise
        self.parser = httptools.HttpRequestParser(self)
        self.peer = "-"
        self.peer_ip: str | IPAddress = ""
        self.local_host = "127.0.0.1"
        self.local_port = 0
        self.authority = b""
        self.xff_line = b""
        self.fwd_tail = b""
        self.last_rx = self.clock.now
        self.served = 0
        self.write_paused = False
        self.closing = self.eof = self.broken = self.dead = False
        self.in_head = False
        self.head_bytes = 0
        self.head_since = 0.0
        self.swept = self.clock.now
        self.tunnel: UpstreamConnection | None = None
        self.upgrading: Exchange | None = None
        self.held: list[bytes] = []
        self.linger: asyncio.TimerHandle | None = None
        self.advancing = False
        # Per request.
        self.current: Exchange | None = None
        self.parsing: Exchange | None = None
        self.last: Exchange | None = None
        self.queue: deque[Exchange] = deque()

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport: uvloop's are asyncio.Transports in all but name.
        self.transport = cast(asyncio.Transport, transport)
        self.gate = ReadGate(self.transport)
        peer = transport.get_extra_info("peername")
        if not peer:
            # Reset before we saw it: getpeername fails once the peer's RST is in,
            # though what it sent before is still readable. Its address unknown,
            # nothing of it can be matched by source, forwarded with a true
            # X-Forwarded-For or logged with a true peer (it was "0.0.0.0:0"),
            # and no answer can reach it: dropped unread.
            self.worker.opened(self)
            self.dead = self.broken = True
            self.transport.abort()
            return
        local = transport.get_extra_info("sockname") or ("127.0.0.1", 0)
        ip = peer[0]
        self.peer_ip = ip
        self.peer = f"[{ip}]:{peer[1]}" if ":" in ip else f"{ip}:{peer[1]}"
        self.local_host = f"[{local[0]}]" if ":" in local[0] else local[0]
        self.local_port = local[1]
        self.authority = b"%s:%d" % (self.local_host.encode("ascii"), local[1])
        # Per connection, so the common request costs no formatting.
        self.xff_line = b"x-forwarded-for: " + ip.encode("ascii") + CRLF
        self.fwd_tail = b"x-forwarded-proto: %s\r\nx-forwarded-port: %d\r\n" % (self.protocol.encode(), local[1])
        if self.protocol == "https":  # the handshake is over before connection_made
            tls_object = transport.get_extra_info("ssl_object")
            cipher = tls_object.cipher() if tls_object is not None else None
            if cipher:
                self.tls_cipher, self.tls_protocol = cipher[0], tls_object.version() or cipher[1]
        self.last_rx = self.clock.now
        self.worker.opened(self)
        if self.worker.closing:
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        self.worker.closed(self)
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            if exc is None:  # closed after a half-close: what we still hold for the target goes out
                tunnel.close()
            else:
                tunnel.abort()
        ex = self.current
        if ex is not None:
            self.current = None
            self._abandon(ex)
        self.queue.clear()

    def eof_received(self) -> bool:
        self.eof = True
        tunnel = self.tunnel
        if tunnel is not None:  # the client is done sending; the target may not be
            return tunnel.client_eof()
        # Nothing in flight: close now. Else answer what was sent, then close (_done).
        return self.current is not None or bool(self.queue)

    def pause_writing(self) -> None:
        # The client reads slower than we answer: stop reading the target, and
        # stop reading more requests (pipelined local answers would pile up).
        self.write_paused = True
        self.gate.pause(flow_control.WRITE_FULL)
        up = self.tunnel or (self.current.upstream if self.current is not None else None)
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.gate.resume(flow_control.WRITE_FULL)
        up = self.tunnel or (self.current.upstream if self.current is not None else None)
        if up is not None:
            up.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.clock.now
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.transport.write(data)
            return
        if self.upgrading is not None:
            self._hold(data)
            return
        if self.broken:  # answering an error, then closing: drop the rest
            return
        if self.in_head:
            self.head_bytes += len(data)
        elif self.parsing is None and not self.head_since:  # these bytes begin a request head
            self.head_since = self.last_rx
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, errors.RequestRejected):
                self._reject(cause.status, cause.why, cause.reason)
            else:
                log.error("%s: request handling failed", self.peer, exc_info=cause or exc)
                self._reject(500, "internal error", errors.INTERNAL_ERROR)
        except HttpParserInvalidMethodError as exc:
            self._reject(errors.BAD_REQUEST, str(exc), errors.REQUEST_MALFORMED)
        except HttpParserError as exc:
            why = str(exc)
            if "HTTP version" in why:
                self._reject(errors.VERSION_NOT_SUPPORTED, why, errors.VERSION_REFUSED)
            else:
                self._reject(errors.BAD_REQUEST, why, errors.REQUEST_MALFORMED)
        else:
            # A head still incomplete after this read: every byte of it was head.
            if self.in_head and self.head_bytes > self.config.max_request_line + self.config.max_headers:
                self._reject(errors.BAD_REQUEST, "request head too large", errors.REQUEST_HEAD_TOO_LARGE)

    # --- httptools callbacks ----------------------------------------------------

    # No on_message_begin: one callback less per request. The first on_url
    # of a request starts it.

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        if ex is None:
            ex = self.parsing = Exchange(self)
            self.in_head = True
            self.head_bytes = 0
            if not self.head_since:  # began in the read that ended the previous request
                self.head_since = self.clock.now
        ex.url += url  # may come in pieces
        if len(ex.url) > self.config.max_request_line:
            raise errors.RequestRejected(errors.BAD_REQUEST, "request line too long", errors.REQUEST_HEAD_TOO_LARGE)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None  # on_url came first
        size = len(name) + len(value)
        ex.header_bytes += size + 4
        if size > self.config.max_header or ex.header_bytes > self.config.max_headers:
            raise errors.RequestRejected(errors.BAD_REQUEST, "request headers too large",
                                         errors.REQUEST_HEAD_TOO_LARGE)
        if not self.in_head:  # a trailer (chunked body): counted, never forwarded nor acted on
            return
        kind = TABLE.get(name, UNKNOWN)
        if kind == UNKNOWN:
            kind = SPECIAL.get(name.lower())
        if kind is None:  # passed through as received
            ex.parts += (name, COLON, value, CRLF)
        elif kind == HOST and ex.host is None and value in VALID_HOSTS:  # else special_header checks it
            ex.host = value
            ex.parts += (name, COLON, value, CRLF)
        else:
            special_header(ex, kind, name, value)

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None  # on_url came first
        self.in_head = False
        self.head_since = 0.0
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1":
            if version != "1.0":
                raise errors.RequestRejected(errors.VERSION_NOT_SUPPORTED, f"HTTP/{version}")
            ex.version11 = False
        method = ex.method = parser.get_method()
        if ex.chunked and not ex.version11:  # RFC 9112 §6.1: faulty framing
            raise errors.RequestRejected(errors.BAD_REQUEST, "Transfer-Encoding in an HTTP/1.0 request")
        if ex.bad_te:
            raise errors.RequestRejected(errors.NOT_IMPLEMENTED, "unsupported Transfer-Encoding")
        if b"#" in ex.url:
            # A fragment is not part of a request-target (RFC 9112 §3.2): no client
            # sends one. Refused rather than stripped, so that no rule and no target
            # ever sees a path that means something else to either.
            raise errors.RequestRejected(errors.BAD_REQUEST, "fragment in the request-target")
        if method == b"TRACE" or method == b"CONNECT":
            raise errors.RequestRejected(errors.METHOD_NOT_ALLOWED, method.decode())
        if ex.host is None and ex.version11:
            raise errors.RequestRejected(errors.BAD_REQUEST, "HTTP/1.1 request without Host")
        if ex.drop is not None and not ex.drop.isdisjoint(NOT_NOMINABLE):
            # Framed (or routed) by a header it asks the next hop to drop: a desync attempt.
            raise errors.RequestRejected(errors.BAD_REQUEST, "Connection nominates a framing header or Host")
        parts = ex.parts
        parts[0] = method
        parts[2] = ex.url
        ex.keep_alive = parser.should_keep_alive()
        ex.head_only = method == b"HEAD"
        if ex.chunked:
            ex.has_body = True
        elif not ex.has_body:
            ex.request_complete = True  # nothing follows the head
        if parser.should_upgrade():
            ex.upgrade = ex.upgrade_value.strip().lower() == b"websocket"
            if ex.has_body:
                # httptools gives an Upgrade request no body: the bytes after its
                # head would be parsed as the next request while the target waits
                # for the body its Content-Length promised (a desync).
                if ex.upgrade:  # a WebSocket handshake is a GET without content (RFC 6455 §4.1)
                    raise errors.RequestRejected(errors.BAD_REQUEST, "WebSocket upgrade with a body")
                # Any other upgrade (h2c: curl --http2 -d) is declined, as a server
                # may (RFC 9110 §7.8): the request goes on as plain HTTP, body framed.
                ex.body_after_upgrade = True
        ex.req_bytes = len(ex.url) + ex.header_bytes + len(method) + 13
        ex.t_start = _now()
        self.last = ex
        if self.dead:
            return
        if self.current is None and not self.queue:
            self._start(ex)
        else:
            self.queue.append(ex)
            if len(self.queue) >= self.config.max_pipeline:
                self.gate.pause(flow_control.PIPELINE)
            self._advance()

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None:  # rejected or closed meanwhile
            return
        if not ex.body_since:
            ex.body_since = self.clock.now
            ex.body_base = ex.req_bytes
        ex.req_bytes += len(body)
        if ex.discard:
            return
        if ex.chunked:
            body = b"".join((b"%x\r\n" % len(body), body, CRLF))
        up = ex.upstream
        if up is not None:
            up.transport.write(body)
            return
        if ex.body_buf is None:
            ex.body_buf = [body]
        else:
            ex.body_buf.append(body)
        ex.buffered += len(body)
        if ex.buffered > self.config.buffer_high_water:
            self.gate.pause(flow_control.BUFFERED)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None:  # rejected or closed meanwhile
            return
        if ex.body_after_upgrade:  # the parser stops here; _upgrade_requested parses the body
            return
        self.parsing = None
        ex.request_complete = True
        if ex.chunked and not ex.discard:
            up = ex.upstream
            if up is not None:
                up.transport.write(_LAST_CHUNK)
            elif ex.body_buf is None:
                ex.body_buf = [_LAST_CHUNK]
            else:
                ex.body_buf.append(_LAST_CHUNK)
        if ex.response_complete and ex is self.current:
            self._done(ex)

    # --- answering, in order ----------------------------------------------------

    def _advance(self) -> None:
        """Start queued exchanges while nothing is in flight (a loop, not recursion)."""
        if self.advancing:
            return
        self.advancing = True
        try:
            queue = self.queue
            while self.current is None and queue and not self.dead:
                ex = queue.popleft()
                if len(queue) < self.config.max_pipeline:
                    self.gate.resume(flow_control.PIPELINE)
                self._start(ex)
        finally:
            self.advancing = False

    def _start(self, ex: Exchange) -> None:
        self.current = ex
        if ex.error:
            self._respond_error(ex, ex.error)
            return
        route = self.worker.routes.listeners.get(self.listener)
        if route is None:  # the listener left the table
            ex.close_after = True
            ex.error_reason = errors.LISTENER_REMOVED
            self._respond_error(ex, errors.SERVICE_UNAVAILABLE)
            return
        if ex.url[:1] != b"/" and not origin_form(ex):
            self._respond_error(ex, errors.BAD_REQUEST)
            return
        router = route.router
        if router is None:
            plan = route.default
        else:
            peer = self.peer_ip
            if isinstance(peer, str):
                peer = self.peer_ip = peer_address(peer)
            match = router.match(rules_request(ex, peer, route.needs_headers))
            ex.rule = match.rule_priority
            plan = route.default if match.rule_priority is None else route.plans[match.rule_priority]
        if plan.__class__ is Forward:
            ex.action = "forward"
            self._forward(ex, plan)
        elif isinstance(plan, FixedResponse):
            ex.action = "fixed-response"
            self._respond(ex, plan.render(self._connection(ex), ex.head_only), plan.status)
        else:
            assert isinstance(plan, Redirect)
            ex.action = "redirect"
            path, _, query = ex.url.partition(b"?")
            location = ex.redirect_url = plan.location(
                ex.host.decode("latin-1") if ex.host is not None else None,
                path.decode("latin-1"),
                query.decode("latin-1"),
                self.local_port,
                self.local_host,
                self.protocol,
            )
            self._respond(ex, plan.answer(self._connection(ex), ex.head_only, location), plan.status)

    def _connection(self, ex: Exchange) -> bytes:
        """The Connection line of a local answer; decides whether we close after it."""
        if (
            ex.close_after
            or not ex.keep_alive
            or self.closing
            or ex.upgrade
            or (ex.expect_continue and not ex.request_complete)  # its body will not come
        ):
            ex.close_after = True
            return _CLOSE
        return b"" if ex.version11 else _KEEP_ALIVE

    def _respond(self, ex: Exchange, data: bytes, status: int) -> None:
        """A local answer: written whole; the rest of the request body is dropped."""
        ex.status = status
        ex.local = ex.response_started = ex.response_complete = True
        ex.resp_bytes += len(data)
        self.transport.write(data)
        ex.discard = True
        if ex.body_buf is not None:
            ex.body_buf = None
            self.gate.resume(flow_control.BUFFERED)
        if ex.request_complete or ex.close_after:
            self._done(ex)

    def _respond_error(self, ex: Exchange, status: int) -> None:
        if ex.error_reason == "-":
            ex.error_reason = errors.REASONS.get(status, "-")
        if status in _CLOSING_STATUSES or not ex.request_complete:
            ex.close_after = True
        self._respond(ex, errors.error_response(status, self._connection(ex), ex.head_only), status)

    def _done(self, ex: Exchange) -> None:
        """Request and response both complete: account, then the next request."""
        ex.release()
        self.current = None
        self.served += 1
        self._account(ex)
        if ex.close_after or self.dead or self.closing or (self.eof and not self.queue):
            if ex.error or (not ex.request_complete and ex.status != 101):
                self._linger()
            else:
                self._close()
            return
        if self.queue:
            self._advance()

    def _account(self, ex: Exchange) -> None:
        """The exchange's line in the stats, and in the access log if it is on."""
        worker = self.worker
        worker.stats.record(self.listener, ex.rule, ex.group, ex.target, ex.status,
                            ex.local or not ex.response_started, ex.upstream_time)
        access_log = worker.access_log
        if access_log is not None:
            access_log.record(self, ex)

    # --- forwarding ---------------------------------------------------------------

    # The hot path is _forward → an idle keep-alive connection of the pool →
    # _send: one write of the joined head, plus any body that arrived while
    # there was no connection yet. A new connection is opened in a task; a
    # pool at its connection limit queues the request instead. The connect
    # timeout is enforced by check_idle.

    def _forward(self, ex: Exchange, plan: Forward) -> None:
        direct = plan.direct
        if direct is not None:
            pool = direct.pick()
            ex.group = plan.direct_group
        else:
            ex.group, chosen, ex.set_cookies = plan.choose(ex.cookies, self.worker.signer)
            if chosen is None:  # no target in service
                self._respond_error(ex, errors.SERVICE_UNAVAILABLE)
                return
            pool = chosen
        ex.pool = pool
        ex.target = pool.label
        pool.outstanding += 1
        # Reuse the newest idle keep-alive connection still open (LIFO: the
        # warmest); read straight off the pool, this is the per-request path.
        idle = pool.idle
        while idle:
            conn = idle.pop()
            if not conn.transport.is_closing():
                if conn.stray():  # it sent bytes nobody asked for: never reused
                    conn.close()
                    continue
                self._send(ex, conn)
                return
        self._open(ex, pool)

    def _open(self, ex: Exchange, pool: Pool) -> None:
        ex.since = self.clock.now
        if not pool.can_open():
            ex.waiting = waiter = partial(self._waited, ex)
            pool.wait(waiter)
            return
        task = ex.connecting = pool.open()
        task.add_done_callback(partial(self._connected, ex))

    def _waited(self, ex: Exchange, conn: UpstreamConnection | None) -> None:
        ex.waiting = None
        if conn is None:  # a connection slot is free
            assert ex.pool is not None  # released only after the wait is cancelled
            self._open(ex, ex.pool)
        else:
            self._send(ex, conn)

    def _connected(self, ex: Exchange, task: Opening) -> None:
        if ex.connecting is not task:  # we gave up waiting: keep the connection for others
            if not task.cancelled() and task.exception() is None:
                conn = task.result()[1]
                conn.pool.give_back(conn, True)
            return
        ex.connecting = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:  # refused, unreachable
            ex.error_reason = errors.TARGET_CONNECTION_ERROR
            self.upstream_failed(ex, errors.BAD_GATEWAY, f"connect to {ex.target}: {exc}")
        else:
            self._send(ex, task.result()[1])

    def _send(self, ex: Exchange, conn: UpstreamConnection) -> None:
        ex.upstream = conn
        conn.attach(ex)
        head = ex.head or build_head(ex, self.xff_line, self.fwd_tail, self.authority)
        ex.t_sent = _now()
        body = ex.body_buf
        if body:
            ex.body_buf = None
            ex.buffered = 0
            body.insert(0, head)
            conn.transport.writelines(body)
            self.gate.resume(flow_control.BUFFERED)
        else:
            conn.transport.write(head)

    # --- called by the upstream connection ----------------------------------------

    # These six methods, with transport, gate, write_paused and closing, are
    # the lb.l7.exchange.Client boundary: all the upstream side uses of us.

    def response_done(self, ex: Exchange) -> None:
        ex.upstream = None
        ex.response_complete = True
        if ex is self.current and (ex.request_complete or ex.close_after):
            self._done(ex)

    def retry(self, ex: Exchange) -> None:
        """A reused connection closed before answering: once more, on a new one."""
        ex.upstream = None
        ex.retried = True
        if ex is self.current and not self.dead:
            assert ex.pool is not None  # released only once ex is no longer current
            self._open(ex, ex.pool)

    def upstream_failed(self, ex: Exchange, status: int, why: str) -> None:
        """The target failed this exchange (502); answer or cut."""
        if ex is not self.current or self.dead:
            return
        log.debug("%s: %s (%d)", self.peer, why, status)
        self._fail_current(ex, status)

    def start_tunnel(self, ex: Exchange, conn: UpstreamConnection) -> None:
        """The target answered 101 (relayed already): from now on, bytes pass through."""
        self.tunnel = conn
        self.upgrading = None
        ex.response_complete = True
        ex.upstream = None
        if self.held:
            held, self.held = self.held, []
            conn.transport.writelines(held)
        self.gate.resume(flow_control.UPGRADING)
        ex.release()
        self.current = None
        self._account(ex)

    def tunnel_eof(self) -> bool:
        """The target sent FIN through the tunnel: pass it on to the client.

        Returns whether the target's connection stays open, for the client's
        bytes still to come; not if the client had finished sending too.
        """
        if self.eof:
            return False
        if not self.transport.can_write_eof():  # TLS: no half-close; what is queued goes out, then close
            self._close()
            return False
        if not self.transport.is_closing():
            self.transport.write_eof()
        return True

    def tunnel_closed(self) -> None:
        """The target closed its side of the tunnel."""
        self.tunnel = None
        self._close()

    # --- WebSocket upgrade --------------------------------------------------------

    # After an Upgrade request the client's bytes are not parsed as HTTP any
    # more: they are held until the target answers. A 101 turns the
    # connection pair into a tunnel (raw bytes both ways, with the same
    # backpressure and idle timeout as HTTP; start_tunnel); any other answer
    # is relayed and the connection closed, and the held bytes are dropped,
    # since a target that refused the upgrade would read them as a request of
    # its own (a smuggling vector).

    def _upgrade_requested(self, rest: bytes) -> None:
        """The parser stopped after an Upgrade request; ``rest`` came after it."""
        ex = self.last
        if ex is not None and ex.body_after_upgrade:  # declined, with a body: parse it, then go on
            ex.body_after_upgrade = False
            self.parser = httptools.HttpRequestParser(_BodyAfterUpgrade(self))
            self.parser.feed_data(_stand_in_head(ex))
            if rest:
                self._feed(rest)
            return
        if ex is None or not ex.upgrade:  # not WebSocket: go on as plain HTTP
            if rest:
                self._feed(rest)
            return
        self.upgrading = ex
        if rest:
            self._hold(rest)

    def _hold(self, data: bytes) -> None:
        self.held.append(data)
        if sum(map(len, self.held)) > self.config.buffer_high_water:
            self.gate.pause(flow_control.UPGRADING)

    # --- errors, timeouts, closing ------------------------------------------------

    # - A request we will not serve (_reject): answered in its turn with the
    #   status of errors.py, then the connection closes.
    # - Timeouts (check_idle, from the worker's sweep): 408 for a client that
    #   sent nothing or half a request within the idle timeout, 504 for a
    #   connect past the connect timeout or a target idle past the idle
    #   timeout; an idle keep-alive connection is just closed.
    # - A failure once part of the response is out: the client connection is
    #   cut (_done_aborted).
    # - The client leaving (_abandon): the target's connection is dropped, a
    #   connect in progress finishes into the pool.
    # - Graceful stop (shutdown) and the two ways to close: at once, or
    #   half-closed for a moment (_linger) so that an error response is not
    #   destroyed by a reset caused by request bytes we never read.

    def _reject(self, status: int, why: str, reason: str) -> None:
        """A request we will not serve: answer it in its turn, then close
        (``reason``: the access log's error_reason)."""
        log.debug("%s: %d %s", self.peer, status, why)
        self.broken = True
        self.in_head = False
        self.head_since = 0.0
        ex = self.parsing
        self.parsing = None
        if ex is None:
            ex = Exchange(self)
        ex.error = status
        ex.error_reason = reason
        ex.request_complete = True
        ex.close_after = True
        if ex is self.current:  # its body went bad mid-stream
            self._fail_current(ex, status)
        elif ex not in self.queue:
            self.queue.append(ex)
            self._advance()

    def check_idle(self, now: float, idle: float, connect_timeout: float) -> None:
        """The worker's sweep, a few times a second: enforce the timeouts."""
        if self.dead:
            return
        tunnel = self.tunnel
        if tunnel is not None:
            if now - max(self.last_rx, tunnel.last_rx) > idle:
                self._close()
            return
        if not self.broken and self._too_slow(now):
            return
        ex = self.current
        client_idle = now - self.last_rx > idle
        if ex is None:
            if client_idle:
                if self.parsing is not None or self.served == 0:  # sent half a request, or nothing
                    self._reject(errors.REQUEST_TIMEOUT, "idle timeout", errors.CLIENT_IDLE_TIMEOUT)
                else:  # an idle keep-alive connection
                    self._close()
            return
        if client_idle and not ex.request_complete:
            status, ex.error_reason = errors.REQUEST_TIMEOUT, errors.CLIENT_IDLE_TIMEOUT
        elif (ex.connecting is not None or ex.waiting is not None) and now - ex.since > connect_timeout:
            status, ex.error_reason = errors.GATEWAY_TIMEOUT, errors.TARGET_CONNECT_TIMEOUT
        elif ex.upstream is not None and client_idle and now - ex.upstream.last_rx > idle:
            status, ex.error_reason = errors.GATEWAY_TIMEOUT, errors.TARGET_RESPONSE_TIMEOUT
        else:
            return
        log.debug("%s: %d on %s", self.peer, status, ex.target)
        self._fail_current(ex, status)

    def _too_slow(self, now: float) -> bool:
        """The request deadlines (L7Config.header_timeout, body_timeout, min_body_rate):
        408 for a head or a body that is too slow, however steadily its bytes trickle in."""
        swept, self.swept = self.swept, now
        config = self.config
        ex = self.parsing
        if self.gate.reasons:  # we are not reading: the client cannot send
            if self.head_since:
                self.head_since += now - swept
            if ex is not None and ex.body_since:
                ex.body_since += now - swept
            return False
        head_since = self.head_since
        if head_since and now - head_since > config.header_timeout:
            self._reject(errors.REQUEST_TIMEOUT, "request head timeout", errors.REQUEST_HEAD_TIMEOUT)
            return True
        if ex is None or not ex.body_since or self.upgrading is not None:
            return False
        allowed = config.body_timeout + (ex.req_bytes - ex.body_base) / config.min_body_rate
        if now - ex.body_since <= allowed:
            return False
        self._reject(errors.REQUEST_TIMEOUT, "request body too slow", errors.REQUEST_BODY_TIMEOUT)
        return True

    def _fail_current(self, ex: Exchange, status: int) -> None:
        """Give up on the exchange in flight with ``status``, however far it got."""
        self._unhook(ex)
        if ex.response_complete:  # answered already (its body was being dropped)
            ex.close_after = True
            self._done(ex)
        elif ex.response_started:  # part of the response is out: all we can do is cut
            self._done_aborted(ex)
        else:
            self._respond_error(ex, status)

    def _unhook(self, ex: Exchange) -> None:
        """Let go of whatever upstream the exchange holds or awaits."""
        conn = ex.upstream
        if conn is not None:
            ex.upstream = None
            conn.abort()
        task = ex.connecting
        if task is not None:
            ex.connecting = None
            task.cancel()
        waiting = ex.waiting
        if waiting is not None:
            ex.waiting = None
            assert ex.pool is not None  # released only after this
            ex.pool.cancel_wait(waiting)
        ex.release()

    def _abandon(self, ex: Exchange) -> None:
        """The client left mid-exchange."""
        ex.connecting = None  # not cancelled: the connection goes to the pool
        self._unhook(ex)
        if not ex.response_complete:
            ex.status = ex.status or _CLIENT_CLOSED
            if ex.error_reason == "-":
                ex.error_reason = errors.CLIENT_CLOSED
            self._account(ex)

    def _done_aborted(self, ex: Exchange) -> None:
        ex.close_after = True
        self.current = None
        self._account(ex)
        self.dead = True
        self.transport.abort()

    def shutdown(self) -> None:
        """Graceful stop: finish the exchange in flight, then close."""
        self.closing = True
        if self.current is None and self.parsing is None and self.tunnel is None:
            self._close()

    def _close(self) -> None:
        self.dead = True
        self.transport.close()

    def _linger(self) -> None:
        """Half-close, and drop what the client still sends for a moment."""
        self.dead = self.broken = True
        self.parsing = None
        self.queue.clear()
        transport = self.transport
        if transport.can_write_eof() and not transport.is_closing():
            transport.write_eof()
            self.gate.release()  # read (and drop) whatever still comes
            self.linger = self.loop.call_later(_LINGER, transport.close)
        else:
            transport.close()

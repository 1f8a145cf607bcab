"""The client side of the proxy: one asyncio Protocol per client connection.

The protocol is itself the httptools callback object (as uvicorn's is). A
request is parsed into an :class:`~lb.l7.exchange.Exchange`; when it is the
oldest on the connection it is routed (rules → plan) and answered locally
(fixed-response, redirect) or forwarded (:mod:`lb.l7.forwarding`) on a pooled
upstream connection (:mod:`lb.l7.upstream`), which relays the response.
Pipelined requests queue behind it and are answered in order. Bodies stream
both ways; every buffer has a reason bit in the connection's ReadGate.
WebSocket upgrades are in :mod:`lb.l7.upgrade`; errors, timeouts and
closing in :mod:`lb.l7.endings`; the state, grouped by lifetime, in
:mod:`lb.l7.client_state`.

The loop comes from the worker and the transport from ``connection_made``,
so tests drive ``data_received(bytes)`` with a fake transport.

Hot path (a keep-alive GET, the benchmark's): ``data_received`` → four
parser callbacks (on_url, on_header per header, on_headers_complete,
on_message_complete) → ``_start`` (no rule matching when the listener has
no rules) → an idle pooled connection → one ``write`` of the head joined
from the parts collected by ``on_header``. Nothing is decoded to ``str``
unless rules need it; the per-connection parts of the forwarded headers are
formatted once in ``connection_made``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserUpgrade,
)

from lb.l7 import errors, flow_control
from lb.l7.actions import FixedResponse, Redirect
from lb.l7.endings import Endings
from lb.l7.exchange import Exchange
from lb.l7.flow_control import ReadGate
from lb.l7.forwarding import Forwarding
from lb.l7.httputil import CRLF, UNKNOWN
from lb.l7.request_head import (
    COLON,
    HOST,
    SPECIAL,
    TABLE,
    origin_form,
    peer_address,
    rules_request,
    special_header,
)
from lb.l7.routing import Forward
from lb.l7.stats import log_access
from lb.l7.upgrade import Upgrading

log = logging.getLogger("lb.l7")

_LAST_CHUNK = b"0\r\n\r\n"
_CLOSE = errors.CONNECTION_CLOSE
_KEEP_ALIVE = errors.CONNECTION_KEEP_ALIVE
_now = time.perf_counter  # loop.time() has only millisecond resolution under uvloop
_CLOSING_STATUSES = frozenset((400, 408, 500, 501, 505))


class ClientProtocol(Forwarding, Upgrading, Endings):
    __slots__ = ()

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.gate = ReadGate(transport)
        peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        local = transport.get_extra_info("sockname") or ("127.0.0.1", 0)
        ip = peer[0]
        self.peer_ip = ip
        self.peer = f"[{ip}]:{peer[1]}" if ":" in ip else f"{ip}:{peer[1]}"
        self.local_host = f"[{local[0]}]" if ":" in local[0] else local[0]
        self.local_port = local[1]
        self.authority = b"%s:%d" % (self.local_host.encode("ascii"), local[1])
        # Per connection, so the common request costs no formatting.
        self.xff_line = b"x-forwarded-for: " + ip.encode("ascii") + CRLF
        self.fwd_tail = b"x-forwarded-proto: http\r\nx-forwarded-port: %d\r\n" % local[1]
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
            tunnel.abort()
        ex = self.current
        if ex is not None:
            self.current = None
            self._abandon(ex)
        self.queue.clear()

    def eof_received(self) -> bool:
        self.eof = True
        # Nothing in flight: close now. Else answer what was sent, then close (_done).
        return self.tunnel is None and (self.current is not None or bool(self.queue))

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
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
        except HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, errors.RequestRejected):
                self._reject(cause.status, cause.why)
            else:
                log.error("%s: request handling failed", self.peer, exc_info=cause or exc)
                self._reject(500, "internal error")
        except HttpParserInvalidMethodError as exc:
            self._reject(errors.BAD_REQUEST, str(exc))
        except HttpParserError as exc:
            why = str(exc)
            self._reject(errors.VERSION_NOT_SUPPORTED if "HTTP version" in why else errors.BAD_REQUEST, why)
        else:
            # A head still incomplete after this read: every byte of it was head.
            if self.in_head and self.head_bytes > self.config.max_request_line + self.config.max_headers:
                self._reject(errors.BAD_REQUEST, "request head too large")

    # --- httptools callbacks ----------------------------------------------------

    # No on_message_begin: one callback less per request. The first on_url
    # of a request starts it.

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        if ex is None:
            ex = self.parsing = Exchange(self)
            self.in_head = True
            self.head_bytes = 0
        ex.url += url  # may come in pieces
        if len(ex.url) > self.config.max_request_line:
            raise errors.RequestRejected(errors.BAD_REQUEST, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex: Exchange = self.parsing  # type: ignore[assignment]
        size = len(name) + len(value)
        ex.header_bytes += size + 4
        if size > self.config.max_header or ex.header_bytes > self.config.max_headers:
            raise errors.RequestRejected(errors.BAD_REQUEST, "request headers too large")
        kind = TABLE.get(name, UNKNOWN)
        if kind == UNKNOWN:
            kind = SPECIAL.get(name.lower())
        if kind is None:  # passed through as received
            ex.parts += (name, COLON, value, CRLF)
        elif kind == HOST and ex.host is None:
            ex.host = value
            ex.parts += (name, COLON, value, CRLF)
        else:
            special_header(ex, kind, name, value)

    def on_headers_complete(self) -> None:
        ex: Exchange = self.parsing  # type: ignore[assignment]
        self.in_head = False
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1":
            if version != "1.0":
                raise errors.RequestRejected(errors.VERSION_NOT_SUPPORTED, f"HTTP/{version}")
            ex.version11 = False
        method = parser.get_method()
        if ex.bad_te:
            raise errors.RequestRejected(errors.NOT_IMPLEMENTED, "unsupported Transfer-Encoding")
        if method == b"TRACE" or method == b"CONNECT":
            raise errors.RequestRejected(errors.METHOD_NOT_ALLOWED, method.decode())
        if ex.host is None and ex.version11:
            raise errors.RequestRejected(errors.BAD_REQUEST, "HTTP/1.1 request without Host")
        ex.method = method
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

    # --- answering, in order ----------------------------------------------------------

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
            match = router.match(rules_request(ex, peer, route.needs_headers))  # type: ignore[arg-type]
            ex.rule = match.rule_priority
            plan = route.default if match.rule_priority is None else route.plans[match.rule_priority]
        if plan.__class__ is Forward:
            self._forward(ex, plan)
        elif isinstance(plan, FixedResponse):
            self._respond(ex, plan.render(self._connection(ex), ex.head_only), plan.status)
        else:
            assert isinstance(plan, Redirect)
            path, _, query = ex.url.partition(b"?")
            data = plan.render(
                self._connection(ex),
                ex.head_only,
                ex.host.decode("latin-1") if ex.host is not None else None,
                path.decode("latin-1"),
                query.decode("latin-1"),
                self.local_port,
                self.local_host,
            )
            self._respond(ex, data, plan.status)

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
        ex.response_started = ex.response_complete = True
        ex.resp_bytes += len(data)
        self.transport.write(data)
        ex.discard = True
        if ex.body_buf is not None:
            ex.body_buf = None
            self.gate.resume(flow_control.BUFFERED)
        if ex.request_complete or ex.close_after:
            self._done(ex)

    def _respond_error(self, ex: Exchange, status: int) -> None:
        if status in _CLOSING_STATUSES or not ex.request_complete:
            ex.close_after = True
        self._respond(ex, errors.error_response(status, self._connection(ex), ex.head_only), status)

    def _done(self, ex: Exchange) -> None:
        """Request and response both complete: account, then the next request."""
        pool = ex.pool
        if pool is not None:  # _release, inlined: this is the hot path
            ex.pool = None
            pool.outstanding -= 1
        self.current = None
        self.served += 1
        worker = self.worker
        worker.stats.record(self.listener, ex.rule, ex.target, ex.status, ex.upstream_time)
        if worker.access_log:
            self._log(ex)
        if ex.close_after or self.dead or self.closing or (self.eof and not self.queue):
            if ex.error or (not ex.request_complete and ex.status != 101):
                self._linger()
            else:
                self._close()
            return
        if self.queue:
            self._advance()

    def _log(self, ex: Exchange) -> None:
        log_access(
            self.peer,
            self.listener,
            ex.rule,
            ex.target,
            ex.status,
            ex.req_bytes,
            ex.resp_bytes,
            _now() - ex.t_start if ex.t_start else 0.0,
            ex.upstream_time,
        )

    # --- called by the upstream connection ------------------------------------------

    def response_done(self, ex: Exchange) -> None:
        ex.upstream = None
        ex.response_complete = True
        if ex is self.current and (ex.request_complete or ex.close_after):
            self._done(ex)

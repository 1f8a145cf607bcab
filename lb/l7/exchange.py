"""One request and its response: the per-request state, in one slotted object.

Created by the client protocol when a request begins, handed to the upstream
connection that serves it, and dropped after the access log line. Fields
are grouped by who writes them, in the order they are filled.

:class:`Client` is all the upstream side uses of the client connection an
exchange came on (:class:`lb.l7.client.ClientProtocol`), so that the
upstream side depends on this boundary rather than on the client class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from asyncio import Transport

    from lb.l7.flow_control import ReadGate
    from lb.l7.upstream import Opening, Pool, UpstreamConnection, Waiter


class Client(Protocol):
    """The client connection, as its upstream connection sees it."""

    # Read, never written, by the upstream side.
    transport: Transport  # the response is relayed straight to it
    gate: ReadGate  # paused (UPSTREAM_FULL) while the target takes no more request body
    write_paused: bool  # the client reads slowly: so must the upstream connection
    closing: bool  # graceful stop: the response says "connection: close"

    def response_done(self, ex: Exchange) -> None:
        """The whole response is relayed; the connection is back in its pool."""

    def upstream_failed(self, ex: Exchange, status: int, why: str) -> None:
        """The target failed the exchange: answer ``status``, or cut if too late."""

    def retry(self, ex: Exchange) -> None:
        """A reused connection closed before answering: send again on a new one."""

    def start_tunnel(self, ex: Exchange, conn: UpstreamConnection) -> None:
        """A 101 is relayed: bytes pass through both ways from now on."""

    def tunnel_eof(self) -> bool:
        """The target sent FIN through the tunnel; whether its connection stays open."""

    def tunnel_closed(self) -> None:
        """The target closed its side of the tunnel."""


class Exchange:
    __slots__ = (
        "client",
        # The request as parsed (client protocol callbacks).
        "method",
        "url",
        "version11",  # HTTP/1.1 (else 1.0)
        "keep_alive",  # the client wants the connection kept
        "parts",  # upstream request head: [method, " ", url, " HTTP/1.1\r\n", name, ": ", value, CRLF, ...]
        "host",
        "xff",  # X-Forwarded-For as received, to append to
        "cookies",  # Cookie header values, for stickiness
        "expect_continue",
        "upgrade",  # a WebSocket upgrade request
        "upgrade_value",
        "body_after_upgrade",  # an Upgrade declined for its body: httptools left the body to us
        "chunked",  # request body chunked (re-chunked upstream)
        "has_body",
        "head_only",  # HEAD: the response has no body
        "header_bytes",
        "bad_te",
        "drop",  # header names the client's Connection header makes hop-by-hop
        "error",  # a status to answer with instead of routing (a rejected request)
        "user_agent",  # for the access log
        "request_id",  # a valid X-Request-Id received, or the one made when forwarding
        # Request body flow.
        "request_complete",
        "body_buf",  # body held until an upstream is attached
        "buffered",
        "discard",  # answered locally: the rest of the body is dropped
        "body_since",  # coarse clock at the first body byte (the body deadline's start), 0 before
        "body_base",  # req_bytes then: the body's bytes are counted from it
        # Routing (when the exchange starts).
        "rule",  # priority, None for the default rule
        "action",  # "forward", "fixed-response", "redirect"; "" before (or without) routing
        "redirect_url",  # the Location of a redirect action, for the access log; None for the rest
        "group",  # the target group's name, or "-"
        "target",  # "address:port" or "-"
        "pool",  # set while the request counts as outstanding on it
        "set_cookies",  # set-cookie header lines for the response
        # Upstream.
        "upstream",
        "connecting",  # the connect task while one is open for us
        "waiting",  # our waiter while queued on a full pool
        "since",  # coarse clock: connect or wait start
        "retried",
        "head",  # the request head as sent, for a retry
        # Response.
        "status",  # sent to the client: the target's, or lb's own (local)
        "local",  # lb answered itself (fixed-response, redirect, an error): no target status
        "error_reason",  # why lb answered with an error or cut the exchange (ALB's error_reason), or "-"
        "response_started",
        "response_complete",
        "close_after",
        "req_bytes",
        "resp_bytes",
        # Timing (loop.time()).
        "t_start",
        "t_sent",
        "upstream_time",
    )

    def __init__(self, client: Client) -> None:
        self.client = client
        self.method = b""
        self.url = b""
        self.version11 = True
        self.keep_alive = True
        self.parts: list[bytes] = [b"", b" ", b"", b" HTTP/1.1\r\n"]  # method, SP, url, version
        self.host: bytes | None = None
        self.xff: bytes | None = None
        self.cookies: list[bytes] | None = None
        self.expect_continue = False
        self.upgrade = False
        self.upgrade_value = b""
        self.body_after_upgrade = False
        self.chunked = False
        self.has_body = False
        self.head_only = False
        self.header_bytes = 0
        self.bad_te = False
        self.drop: set[bytes] | None = None
        self.error = 0
        self.user_agent: bytes | None = None
        self.request_id: bytes | None = None
        self.request_complete = False
        self.body_buf: list[bytes] | None = None
        self.buffered = 0
        self.discard = False
        self.body_since = 0.0
        self.body_base = 0
        self.rule: int | None = None
        self.action = ""
        self.redirect_url: str | None = None
        self.group = "-"
        self.target = "-"
        self.pool: Pool | None = None
        self.set_cookies = b""
        self.upstream: UpstreamConnection | None = None
        self.connecting: Opening | None = None
        self.waiting: Waiter | None = None
        self.since = 0.0
        self.retried = False
        self.head = b""
        self.status = 0
        self.local = False
        self.error_reason = "-"
        self.response_started = False
        self.response_complete = False
        self.close_after = False
        self.req_bytes = 0
        self.resp_bytes = 0
        self.t_start = 0.0
        self.t_sent = 0.0
        self.upstream_time = -1.0

    def release(self) -> None:
        """The exchange no longer counts as outstanding on its target."""
        pool = self.pool
        if pool is not None:
            self.pool = None
            pool.outstanding -= 1

    def retryable(self) -> bool:
        """Safe to send again on a new connection: nothing of it is lost."""
        return not self.retried and not self.has_body and not self.upgrade

"""The L7 proxy's own settings: one typed object, a default on every field.

Built once (by the CLI or a test) and passed down to the server, every
worker and every connection. What comes from the load balancer's model and
may change at run time (listeners, groups, idle timeout) travels in the
:class:`lb.l7.table.RoutingTable` instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lb.model import LoadBalancer


@dataclass(frozen=True)
class L7Config:
    workers: int = 0  # worker processes; 0: one per core
    connect_timeout: float = 10.0  # to a target; past it: 504
    # Upstream pools, per target and per worker.
    max_idle_per_target: int = 256  # keep-alive connections kept idle
    max_conns_per_target: int = 0  # open connections; 0: unlimited, else requests queue
    # Request limits (ELB's): past them, 400.
    max_request_line: int = 16 * 1024
    max_header: int = 16 * 1024  # one header, name and value
    max_headers: int = 64 * 1024  # all of a request's headers
    # Request deadlines, against clients that send slowly on purpose (slowloris,
    # slow POST). Past either: 408 and close (RFC 9110 §15.5.9: the request did
    # not arrive whole within the time the server was prepared to wait; nginx
    # answers a slow head or body with 408 too). The defaults are Apache
    # mod_reqtimeout's (header=20, body=20,MinRate=500). nginx has
    # client_header_timeout / client_body_timeout (60 s, the body's between two
    # reads, so a byte every few seconds passes it); HAProxy `timeout
    # http-request` bounds the head. ELB has no counterpart of its own: only
    # the idle timeout (60 s) between bytes, which a byte every 5 s never trips.
    header_timeout: float = 20.0  # from the first byte of a request head to its end
    body_timeout: float = 20.0  # a request body's allowance from its first byte, plus:
    min_body_rate: int = 500  # one more second per this many body bytes received
    # A target's response head (status line and header fields, each 1xx too):
    # past it, 502 and the connection closed. ALB's quota: 32 KiB for all
    # response headers (docs/elb-reference.md); nginx's proxy_buffer_size is
    # 4-8 KiB. Without it a target's 50 MB header block was buffered whole.
    max_response_head: int = 32 * 1024
    # Flow control.
    max_pipeline: int = 16  # parsed requests queued behind the one in flight
    buffer_high_water: int = 64 * 1024  # request body held before an upstream is ready
    # Listening sockets.
    backlog: int = 1024
    # lb_cookie / group stickiness: HMAC key of the cookies. Empty: a random
    # key, made once per L7Server (shared by its workers) or per serve().
    cookie_secret: bytes = b""
    ready_timeout: float = 15.0  # for a worker process to bind its listeners
    # HTTPS: the workers' shared TLS session ticket key is replaced this often
    # (seconds); a ticket made before resumes no more (a full handshake).
    ticket_key_rotation: float = 3600.0
    # Off: no resumption (no session tickets, no session id cache), for measuring
    # full handshakes (tests/bench/https.py; the load balancer's
    # tls_session_resumption); ELB always resumes.
    session_resumption: bool = True
    # HTTPS listeners: HTTP/2 by ALPN (ALB's routing.http2.enabled, on by
    # default), and its limits (lb.l7.h2client says what each bounds).
    http2: bool = True
    h2_max_streams: int = 128  # SETTINGS_MAX_CONCURRENT_STREAMS, ALB's
    h2_stream_window: int = 64 * 1024  # SETTINGS_INITIAL_WINDOW_SIZE: request body in flight per stream

    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    @classmethod
    def for_load_balancer(cls, lb: LoadBalancer, **overrides: Any) -> L7Config:
        """The settings the model decides (workers, deadlines, the response-head
        bound), plus ``overrides``."""
        return cls(
            workers=lb.workers,
            header_timeout=lb.header_timeout,
            body_timeout=lb.body_timeout,
            min_body_rate=lb.min_body_rate,
            max_response_head=lb.max_response_head,
            http2=lb.http2,
            session_resumption=lb.tls_session_resumption,
            **overrides,
        )

"""The state of one client connection, grouped by lifetime.

:class:`ClientState` holds every slot of the client protocol; the behaviour
is split by concern over :mod:`lb.l7.protocol` (parsing and answering, in
order), :mod:`lb.l7.forwarding` (getting a request to a target),
:mod:`lb.l7.upgrade` (WebSocket tunnels) and :mod:`lb.l7.endings` (errors,
timeouts, closing). The stubs at the end are
the methods one part calls in another; the real ones override them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import httptools

from lb.l7.exchange import Exchange
from lb.l7.flow_control import ReadGate

if TYPE_CHECKING:
    from lb.l7.upstream import UpstreamConnection
    from lb.l7.worker import Worker


class ClientState(asyncio.Protocol):
    __slots__ = (
        # Worker-wide: shared by every connection of the worker.
        "worker",
        "loop",
        "clock",
        "config",
        "listener",  # the listener's name: its route is looked up per request
        # Per connection.
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

    def __init__(self, worker: Worker, listener: str) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.clock = worker.clock
        self.config = worker.config
        self.listener = listener
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.gate: ReadGate = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.peer = "-"
        self.peer_ip: object = ""
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
        self.tunnel: UpstreamConnection | None = None
        self.upgrading: Exchange | None = None
        self.held: list[bytes] = []
        self.linger: asyncio.TimerHandle | None = None
        self.advancing = False
        self.current: Exchange | None = None
        self.parsing: Exchange | None = None
        self.last: Exchange | None = None
        self.queue: deque[Exchange] = deque()

    # --- implemented elsewhere (see the module docstring) -------------------------

    def _advance(self) -> None:
        raise NotImplementedError

    def _done(self, ex: Exchange) -> None:
        raise NotImplementedError

    def _log(self, ex: Exchange) -> None:
        raise NotImplementedError

    def _respond_error(self, ex: Exchange, status: int) -> None:
        raise NotImplementedError

    def _feed(self, data: bytes) -> None:
        raise NotImplementedError

    def _account(self, ex: Exchange) -> None:
        raise NotImplementedError

    def upstream_failed(self, ex: Exchange, status: int, why: str) -> None:
        raise NotImplementedError

    def _unhook(self, ex: Exchange) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    @staticmethod
    def _release(ex: Exchange) -> None:
        """The exchange no longer counts as outstanding on its target."""
        pool = ex.pool
        if pool is not None:
            ex.pool = None
            pool.outstanding -= 1

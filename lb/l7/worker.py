"""One worker: the listeners, the routing table and the pools of one event loop.

Runs inside a worker process (:mod:`lb.l7.server`) or inside a test's own
loop (:func:`lb.l7.server.serve`). It owns everything the connections
share: the compiled routes (swapped whole on :meth:`update`), the upstream
pools, the stats, the coarse clock, and the sweep that enforces idle and
connect timeouts a few times a second (one timer for the worker rather than
one per request).

Open files: near the process's limit (the soft RLIMIT_NOFILE less
:func:`lb.rlimits.reserve`), a new connection makes the worker close its
oldest idle connections (no request in flight: idle keep-alive, or a
request head still arriving, slowloris-style), nginx-like, so the listener
keeps accepting and requests in flight keep finding descriptors for their
upstream connections. With nothing idle to close, the new connection is
closed instead. Both are counted (:meth:`Worker.snapshot`) and logged at
most every 10 s. The count is an estimate kept without system calls: the
descriptors open once the listeners were bound, plus client and upstream
connections.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from functools import partial
from typing import Any

from lb import rlimits, tls
from lb.l7.access_log import AccessLogFile
from lb.l7.client import ClientConnection, ClientProtocol
from lb.l7.clock import Clock
from lb.l7.config import L7Config
from lb.l7.h2client import HttpsProtocol
from lb.l7.httputil import request_ids
from lb.l7.routing import Routes
from lb.l7.stats import WorkerStats
from lb.l7.stickiness import CookieSigner
from lb.l7.table import RoutingTable
from lb.l7.tls_transport import TlsServer, TlsTransport
from lb.l7.upstream import PoolSet
from lb.model import AccessLog, Listener

log = logging.getLogger("lb.l7")


class Worker:
    def __init__(self, table: RoutingTable, config: L7Config, loop: asyncio.AbstractEventLoop, secret: bytes):
        # Shared by every connection of this worker.
        self.loop = loop
        self.config = config
        self.clock = Clock(loop.time())
        self.pools = PoolSet(loop, self.clock, config)
        self.stats = WorkerStats()
        self.signer = CookieSigner(secret)
        self.table = table
        self.routes = Routes(table, self.pools)
        self.connections: dict[ClientConnection, None] = {}  # oldest first
        self.handshakes: dict[TlsTransport, None] = {}  # TLS connections in their handshake, oldest first
        self.closing = False
        # Open files (see the module's docstring).
        self.fd_limit = rlimits.nofile_limit()
        self.fd_high = self.fd_limit - rlimits.reserve(self.fd_limit)  # shed idle connections from here
        self.base_fds = 0  # open once the listeners were bound (counted at start and update)
        self.upstream_fds = 0  # upstream connections (counted by the sweep and near the limit)
        self.shed = 0  # idle connections closed to make room
        self.refused = 0  # new connections closed: nothing idle to close
        self.h2_calmed = 0  # HTTP/2 connections ended with ENHANCE_YOUR_CALM (lb.l7.h2client)
        self._reported = (0, 0)  # shed, refused at the last log line
        self._report_after = 0.0
        # The access log (lb.l7.access_log), as the table says: opened by start(),
        # changed by update(), written by the sweep and by stop().
        self.access_log: AccessLogFile | None = None
        self.access_log_lost = 0  # lines the files closed since (a reload moved the log) failed to write
        # Listening sockets, by listener name: (address, port, TLS policy or None) and the server.
        self._servers: dict[str, tuple[tuple[str, int, str | None], asyncio.AbstractServer]] = {}
        # HTTPS listeners' certificates, by listener name: replaced in place by
        # update() so the listening socket stays (lb.tls.SniContexts).
        self.tls: dict[str, tls.SniContexts] = {}
        self._listening: dict[str, ssl.SSLContext] = {}  # each HTTPS listener's listening context
        self.ticket_key: bytes | None = None  # session ticket key shared by the workers (lb.tls.set_ticket_keys)
        self.addresses: dict[str, tuple[str, int]] = {}  # listener name → bound (host, port)
        self._tick: asyncio.TimerHandle | None = None

    # --- lifetime -----------------------------------------------------------------

    async def start(self) -> None:
        self._set_access_log(self.table.access_log)
        try:
            for listener in self.table.listeners:
                await self._bind(listener)
        except BaseException:
            for _, server in self._servers.values():
                server.close()
            self._set_access_log(AccessLog())
            raise
        self._count_base_fds()
        self._sweep()

    async def _bind(self, listener: Listener) -> None:
        server: asyncio.AbstractServer
        if listener.tls is not None:
            alpn = ("h2", "http/1.1") if self.config.http2 else ("http/1.1",)
            contexts = self.tls[listener.name] = tls.SniContexts(listener.tls, alpn)
            context = self._listening[listener.name] = tls.listening_context(contexts)
            if not self.config.session_resumption:
                context.options |= ssl.OP_NO_TICKET
                context.num_tickets = 0
                tls.set_session_cache(context, False)  # TLS 1.2 resumes by session id without tickets
            if self.ticket_key is not None:
                tls.set_ticket_keys(context, self.ticket_key)
            # OpenSSL on the socket (lb.l7.tls_transport); HTTP/2 or HTTP/1.1 after the handshake,
            # which is part of a request head's arrival: the same deadline.
            server = TlsServer.listen(self.loop, str(listener.address), listener.port, self.config.backlog, context,
                                      partial(HttpsProtocol, self, listener.name), self.config.header_timeout, self)
        else:
            server = await self.loop.create_server(
                partial(ClientProtocol, self, listener.name),
                host=str(listener.address),
                port=listener.port,
                reuse_port=True,
                backlog=self.config.backlog,
            )
        self._servers[listener.name] = (_bind_key(listener), server)
        host, port = server.sockets[0].getsockname()[:2]
        self.addresses[listener.name] = (host, port)

    async def update(self, table: RoutingTable) -> None:
        """Swap in ``table``: new requests use it, requests in flight keep theirs.

        An HTTPS listener whose certificates changed keeps its socket: new
        handshakes get the new certificates, established connections keep
        theirs. All are built before anything is swapped (a failure changes
        nothing); a new policy binds a new socket.
        """
        replaced = {}
        for new in table.listeners:
            current = self.tls.get(new.name)
            if new.tls is not None and current is not None and current.tls != new.tls \
                    and current.tls.ssl_policy == new.tls.ssl_policy:
                replaced[new.name] = tls.SniContexts(new.tls, current.alpn)
        for name, contexts in replaced.items():
            self.tls[name].adopt(contexts)
        routes = Routes(table, self.pools)
        self.routes = routes  # one assignment: the swap is atomic for every request
        self.table = table
        self.pools.retain(routes.endpoints)
        wanted = {listener.name: listener for listener in table.listeners}
        stale = []
        for name, (key, server) in list(self._servers.items()):
            listener = wanted.get(name)
            if listener is None or _bind_key(listener) != key:
                del self._servers[name]
                self.addresses.pop(name, None)
                self.tls.pop(name, None)
                self._listening.pop(name, None)
                if listener is not None and key[:2] == _bind_key(listener)[:2]:
                    stale.append(server)  # the same port, set up anew: closed once the new socket listens
                else:
                    server.close()
        try:
            for name, listener in wanted.items():
                if name not in self._servers:
                    await self._bind(listener)
        finally:
            for server in stale:
                server.close()
        try:
            self._set_access_log(table.access_log)
        except OSError as exc:  # the daemon checked the path: rare (a race, a full disk)
            log.error("access log %s: %s; still as it was", table.access_log.path, exc)
        self._count_base_fds()
        log.debug("routing table %d in service", table.version)

    def _set_access_log(self, settings: AccessLog) -> None:
        """Open the access log, move it or close it as ``settings`` say (OSError:
        the new file cannot be opened; the old one stays)."""
        current = self.access_log
        if current is not None and current.settings == settings:
            return
        new = AccessLogFile(settings, request_ids) if settings.enabled else None
        self.access_log = new
        if current is not None:
            current.close()
            self.access_log_lost += current.lost

    def reopen_access_log(self) -> None:
        """SIGUSR1 to the daemon (logrotate): what is buffered goes to the file
        open now (renamed, perhaps), the next lines to the path opened anew."""
        if self.access_log is not None:
            self.access_log.reopen()

    def set_ticket_key(self, key: bytes) -> None:
        """Encrypt and decrypt TLS session tickets with ``key`` from now on, on
        every HTTPS listener (and those bound later): the server gives all its
        workers the same key, so a ticket resumes on any of them, and replaces
        it to rotate (tickets made with the old one then get a full handshake)."""
        self.ticket_key = key
        for context in self._listening.values():
            tls.set_ticket_keys(context, key)

    async def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for ``grace`` s, close the rest."""
        self.closing = True
        for _, server in self._servers.values():
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.transport.abort()
        for handshake in list(self.handshakes):
            handshake.abort()
        self.pools.close()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for _, server in self._servers.values():
            await server.wait_closed()
        self._servers.clear()
        await asyncio.sleep(0)  # let the transports' connection_lost run (and log their requests)
        await asyncio.sleep(0)
        self._set_access_log(AccessLog())  # the last lines written, the file closed

    # --- connections --------------------------------------------------------------

    def opened(self, conn: ClientConnection) -> None:
        self.connections[conn] = None
        self.stats.connections += 1
        if len(self.connections) + self.base_fds + self.upstream_fds >= self.fd_high:
            self._make_room(conn)

    def closed(self, conn: ClientConnection) -> None:
        self.connections.pop(conn, None)
        self.stats.connections -= 1

    def handshake_started(self, transport: TlsTransport) -> None:
        """A TLS connection accepted (lb.l7.tls_transport): a descriptor, and nothing in flight."""
        self.handshakes[transport] = None
        if self.open_fds() >= self.fd_high:
            self._make_room(transport)

    def handshake_ended(self, transport: TlsTransport) -> None:
        """Done (the protocol's connection_made follows: opened()), failed, or timed out."""
        self.handshakes.pop(transport, None)

    # --- open files ---------------------------------------------------------------

    def open_fds(self) -> int:
        """The estimate: descriptors in use now."""
        return self.base_fds + len(self.connections) + len(self.handshakes) + self.upstream_fds

    def _count_base_fds(self) -> None:
        counted = rlimits.open_fds()
        if counted is not None:
            self.base_fds = max(0, counted - len(self.connections) - self._count_upstream())

    def _count_upstream(self) -> int:
        self.upstream_fds = sum(pool.connections for pool in self.pools.pools.values())
        return self.upstream_fds

    def _make_room(self, new: ClientConnection | TlsTransport | None) -> None:
        """At the mark: close the oldest TLS handshakes, then the oldest idle connections
        (never `new`); none: close `new`."""
        self._count_upstream()
        excess = self.open_fds() - self.fd_high + (1 if new is not None else 0)
        if excess <= 0:
            return
        handshakes = []
        for handshake in self.handshakes:  # oldest first; no request yet, like an idle connection
            if excess <= 0:
                break
            if handshake is not new:
                handshakes.append(handshake)
                excess -= 1
        victims = []
        for conn in self.connections:  # oldest first
            if excess <= 0:
                break
            if conn is new:
                continue
            if conn.transport.is_closing():  # its descriptor is being freed already
                excess -= 1
            elif conn.current is None and conn.tunnel is None and conn.upgrading is None:
                victims.append(conn)
                excess -= 1
        for handshake in handshakes:
            handshake.abort()
        for conn in victims:
            conn.transport.close()
        self.shed += len(handshakes) + len(victims)
        if excess > 0 and new is not None:
            if isinstance(new, TlsTransport):
                new.abort()
            else:
                new.transport.close()
            self.refused += 1
        self._report_pressure()

    def _report_pressure(self) -> None:
        now = self.loop.time()
        if now < self._report_after:
            return
        self._report_after = now + 10.0
        shed, refused = self.shed - self._reported[0], self.refused - self._reported[1]
        self._reported = (self.shed, self.refused)
        log.warning("file descriptors: %d of %d in use (%d kept free for accepting and upstream connections): "
                    "closed %d idle connections, oldest first, and refused %d new ones since the last report",
                    self.open_fds(), self.fd_limit, self.fd_limit - self.fd_high, shed, refused)

    def snapshot(self) -> dict[str, Any]:
        """What the parent's stats request gets: :meth:`WorkerStats.snapshot`,
        "fds" {"open" (the estimate), "limit", "high" (where shedding starts)},
        "shed" and "refused" (connections closed near the limit, see above),
        "access_log_lost" (lines dropped by failed writes, every file this worker had),
        "h2_calmed" (HTTP/2 connections ended for a flood, lb.l7.h2client)."""
        lost = self.access_log_lost + (self.access_log.lost if self.access_log is not None else 0)
        return {**self.stats.snapshot(), "fds": {"open": self.open_fds(), "limit": self.fd_limit,
                                                  "high": self.fd_high}, "shed": self.shed, "refused": self.refused,
                "access_log_lost": lost, "h2_calmed": self.h2_calmed}

    def _sweep(self) -> None:
        now = self.clock.now = self.loop.time()
        if self.access_log is not None:
            self.access_log.flush()
        idle = self.routes.idle_timeout
        connect = self.config.connect_timeout
        for conn in list(self.connections):
            conn.check_idle(now, idle, connect)
        self.pools.expire(now - idle)  # upstream keep-alive connections idle too long
        self._count_upstream()
        if self.open_fds() >= self.fd_high:  # grown with the upstream side
            self._make_room(None)
        elif (self.shed, self.refused) != self._reported:  # the rest of a burst, once 10 s have passed
            self._report_pressure()
        interval = min(max(min(idle, connect) / 10.0, 0.01), 0.5)
        self._tick = self.loop.call_later(interval, self._sweep)


def _bind_key(listener: Listener) -> tuple[str, int, str | None]:
    """What a listening socket is bound and set up with: a change binds anew."""
    return str(listener.address), listener.port, listener.tls.ssl_policy if listener.tls is not None else None

"""One worker: the listeners, the routing table and the pools of one event loop.

Runs inside a worker process (:mod:`lb.l7.server`) or inside a test's own
loop (:func:`lb.l7.server.serve`). It owns everything the connections
share: the compiled routes (swapped whole on :meth:`update`), the upstream
pools, the stats, the coarse clock, and the sweep that enforces idle and
connect timeouts a few times a second (one timer for the worker rather than
one per request).
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from lb.l7.client import ClientProtocol
from lb.l7.clock import Clock
from lb.l7.config import L7Config
from lb.l7.routing import Routes
from lb.l7.stats import WorkerStats, access_logger
from lb.l7.stickiness import CookieSigner
from lb.l7.table import RoutingTable
from lb.l7.upstream import PoolSet
from lb.model import Listener

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
        self.connections: set[ClientProtocol] = set()
        self.closing = False
        # Whether "lb.access" takes INFO lines: read per request, so it is
        # cached here and refreshed by every sweep.
        self.access_log = access_logger.isEnabledFor(logging.INFO)
        # Listening sockets, by listener name.
        self._servers: dict[str, tuple[tuple[str, int], asyncio.AbstractServer]] = {}
        self.addresses: dict[str, tuple[str, int]] = {}  # listener name → bound (host, port)
        self._tick: asyncio.TimerHandle | None = None

    # --- lifetime -----------------------------------------------------------------

    async def start(self) -> None:
        try:
            for listener in self.table.listeners:
                await self._bind(listener)
        except BaseException:
            for _, server in self._servers.values():
                server.close()
            raise
        self._sweep()

    async def _bind(self, listener: Listener) -> None:
        server = await self.loop.create_server(
            partial(ClientProtocol, self, listener.name),
            host=str(listener.address),
            port=listener.port,
            reuse_port=True,
            backlog=self.config.backlog,
        )
        self._servers[listener.name] = ((str(listener.address), listener.port), server)
        host, port = server.sockets[0].getsockname()[:2]
        self.addresses[listener.name] = (host, port)

    async def update(self, table: RoutingTable) -> None:
        """Swap in ``table``: new requests use it, requests in flight keep theirs."""
        routes = Routes(table, self.pools)
        self.routes = routes  # one assignment: the swap is atomic for every request
        self.table = table
        self.pools.retain(routes.endpoints)
        wanted = {listener.name: listener for listener in table.listeners}
        for name, (key, server) in list(self._servers.items()):
            listener = wanted.get(name)
            if listener is None or (str(listener.address), listener.port) != key:
                server.close()
                del self._servers[name]
                self.addresses.pop(name, None)
        for name, listener in wanted.items():
            if name not in self._servers:
                await self._bind(listener)
        log.debug("routing table %d in service", table.version)

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
        self.pools.close()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        for _, server in self._servers.values():
            await server.wait_closed()
        self._servers.clear()
        await asyncio.sleep(0)  # let the transports' connection_lost run

    # --- connections --------------------------------------------------------------

    def opened(self, conn: ClientProtocol) -> None:
        self.connections.add(conn)
        self.stats.connections += 1

    def closed(self, conn: ClientProtocol) -> None:
        self.connections.discard(conn)
        self.stats.connections -= 1

    def snapshot(self) -> dict[str, Any]:
        """:meth:`WorkerStats.snapshot`: what the parent's stats request gets."""
        return self.stats.snapshot()

    def _sweep(self) -> None:
        now = self.clock.now = self.loop.time()
        self.access_log = access_logger.isEnabledFor(logging.INFO)
        idle = self.routes.idle_timeout
        connect = self.config.connect_timeout
        for conn in list(self.connections):
            conn.check_idle(now, idle, connect)
        self.pools.expire(now - idle)  # upstream keep-alive connections idle too long
        interval = min(max(min(idle, connect) / 10.0, 0.01), 0.5)
        self._tick = self.loop.call_later(interval, self._sweep)

"""Upstream connection pools: one per target endpoint, per worker.

A pool keeps the keep-alive connections to one ``address:port`` that are
idle, opens new ones, and hands a released connection straight to a request
queued for it when ``max_conns_per_target`` is reached. Pools outlive
routing tables: a swap *retires* the pools of endpoints that left (their idle
connections close now, busy ones when released), and ``outstanding`` — the
requests this worker has in flight to the endpoint — is what
least_outstanding_requests reads.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from lb.l7.clock import Clock
from lb.l7.config import L7Config

if TYPE_CHECKING:
    from lb.l7.upstream import UpstreamConnection

# Called with a released connection, or with None: "a slot is free, open one".
Waiter = Callable[["UpstreamConnection | None"], None]


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
        "_max_idle",
        "_max_conns",
        "_factory",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Clock, config: L7Config, host: str, port: int):
        from lb.l7.upstream import UpstreamConnection  # the protocol needs Pool too

        self.host = host
        self.port = port
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.loop = loop
        self.clock = clock
        self.idle: list[UpstreamConnection] = []  # LIFO: the warmest connection first
        self.outstanding = 0  # requests in flight to this endpoint
        self.connections = 0  # open or opening
        self.retired = False  # left the table: no idle keeping
        self.waiters: deque[Waiter] = deque()  # requests queued for a connection
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

    def open(self) -> asyncio.Task[tuple[asyncio.BaseTransport, UpstreamConnection]]:
        """Start connecting; the caller adds its own done callback."""
        self.connections += 1
        task = self.loop.create_task(self.loop.create_connection(self._factory, self.host, self.port))
        task.add_done_callback(self._opened)
        return task

    def _opened(self, task: asyncio.Task[tuple[asyncio.BaseTransport, UpstreamConnection]]) -> None:
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


class PoolSet:
    """This worker's pools by (address, port)."""

    __slots__ = ("_loop", "_clock", "_config", "pools")

    def __init__(self, loop: asyncio.AbstractEventLoop, clock: Clock, config: L7Config) -> None:
        self._loop = loop
        self._clock = clock
        self._config = config
        self.pools: dict[tuple[str, int], Pool] = {}

    def get(self, host: str, port: int) -> Pool:
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = Pool(self._loop, self._clock, self._config, host, port)
        return pool

    def retain(self, keys: set[tuple[str, int]]) -> None:
        """Retire every pool whose endpoint is not in ``keys``."""
        for key in [k for k in self.pools if k not in keys]:
            self.pools.pop(key).retire()

    def expire(self, deadline: float) -> None:
        for pool in self.pools.values():
            pool.expire(deadline)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.retire()
        self.pools.clear()

"""Getting a request to a target: pick, connect or reuse, send.

The hot path is ``_forward`` → ``Pool.take`` (an idle keep-alive
connection) → ``_send``: one write of the joined head, plus any body that
arrived while there was no connection yet. A new connection is opened in a
task; a pool at its connection limit queues the request instead. The
connect timeout and what follows a failure are in :mod:`lb.l7.endings`.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import TYPE_CHECKING

from lb.l7 import errors, flow_control
from lb.l7.client_state import ClientState
from lb.l7.exchange import Exchange
from lb.l7.request_head import build_head
from lb.l7.routing import Forward

if TYPE_CHECKING:
    from lb.l7.upstream import Pool
    from lb.l7.upstream import UpstreamConnection

_now = time.perf_counter  # loop.time() has only millisecond resolution under uvloop
_Opening = asyncio.Task[tuple[asyncio.BaseTransport, "UpstreamConnection"]]


class Forwarding(ClientState):
    __slots__ = ()

    def _forward(self, ex: Exchange, plan: Forward) -> None:
        direct = plan.direct
        if direct is not None:
            pool = direct.pick()
        else:
            chosen, ex.set_cookies = plan.choose(ex.cookies, self.worker.signer)
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
            self._open(ex, ex.pool)  # type: ignore[arg-type]
        else:
            self._send(ex, conn)

    def _connected(self, ex: Exchange, task: _Opening) -> None:
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

    def retry(self, ex: Exchange) -> None:
        """A reused connection closed before answering: once more, on a new one."""
        ex.upstream = None
        ex.retried = True
        if ex is self.current and not self.dead:
            self._open(ex, ex.pool)  # type: ignore[arg-type]

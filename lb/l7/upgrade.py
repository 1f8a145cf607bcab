"""Connection: Upgrade (WebSocket): hold the client, then tunnel both ways.

After an Upgrade request the client's bytes are not parsed as HTTP any
more: they are held until the target answers. A 101 turns the connection
pair into a tunnel (raw bytes both ways, with the same backpressure and idle
timeout as HTTP); any other answer is relayed and the connection closed, and
the held bytes are dropped, since a target that refused the upgrade would
read them as a request of its own (a smuggling vector).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lb.l7 import flow_control
from lb.l7.client_state import ClientState
from lb.l7.exchange import Exchange

if TYPE_CHECKING:
    from lb.l7.upstream import UpstreamConnection


class Upgrading(ClientState):
    __slots__ = ()

    def _upgrade_requested(self, rest: bytes) -> None:
        """The parser stopped after an Upgrade request; ``rest`` came after it."""
        ex = self.last
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
        self._release(ex)
        self.current = None
        self._account(ex)

    def tunnel_closed(self) -> None:
        """The target closed its side of the tunnel."""
        self.tunnel = None
        self._close()

"""How exchanges and client connections end other than well.

- A request we will not serve (``_reject``): answered in its turn with the
  status of errors.py, then the connection closes.
- Timeouts (``check_idle``, from the worker's sweep): 408 for a client that
  sent nothing or half a request within the idle timeout, 504 for a connect
  past the connect timeout or a target idle past the idle timeout; an idle
  keep-alive connection is just closed.
- A failure once part of the response is out: the client connection is cut.
- The client leaving (``_abandon``): the target's connection is dropped, a
  connect in progress finishes into the pool.
- Graceful stop (``shutdown``) and the two ways to close: at once, or
  half-closed for a moment (``_linger``) so that an error response is not
  destroyed by a reset caused by request bytes we never read.
"""

from __future__ import annotations

import logging

from lb.l7 import errors
from lb.l7.client_state import ClientState
from lb.l7.exchange import Exchange

log = logging.getLogger("lb.l7")

_LINGER = 1.0  # seconds to read and drop after an error response, before closing
_CLIENT_CLOSED = 460  # ELB's access log status for "the client closed first"


class Endings(ClientState):
    __slots__ = ()

    def _reject(self, status: int, why: str) -> None:
        """A request we will not serve: answer it in its turn, then close."""
        log.debug("%s: %d %s", self.peer, status, why)
        self.broken = True
        self.in_head = False
        ex = self.parsing
        self.parsing = None
        if ex is None:
            ex = Exchange(self)  # type: ignore[arg-type]
        ex.error = status
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
        ex = self.current
        client_idle = now - self.last_rx > idle
        if ex is None:
            if client_idle:
                if self.parsing is not None or self.served == 0:  # sent half a request, or nothing
                    self._reject(errors.REQUEST_TIMEOUT, "idle timeout")
                else:  # an idle keep-alive connection
                    self._close()
            return
        if client_idle and not ex.request_complete:
            status = errors.REQUEST_TIMEOUT
        elif (
            (ex.connecting is not None or ex.waiting is not None)
            and now - ex.since > connect_timeout
            or ex.upstream is not None
            and client_idle
            and now - ex.upstream.last_rx > idle
        ):
            status = errors.GATEWAY_TIMEOUT
        else:
            return
        log.debug("%s: %d on %s", self.peer, status, ex.target)
        self._fail_current(ex, status)

    def upstream_failed(self, ex: Exchange, status: int, why: str) -> None:
        """The target failed this exchange (502); answer or cut."""
        if ex is not self.current or self.dead:
            return
        log.debug("%s: %s (%d)", self.peer, why, status)
        self._fail_current(ex, status)

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
        if ex.waiting is not None:
            ex.pool.cancel_wait(ex.waiting)  # type: ignore[union-attr, arg-type]
            ex.waiting = None
        self._release(ex)

    def _abandon(self, ex: Exchange) -> None:
        """The client left mid-exchange."""
        ex.connecting = None  # not cancelled: the connection goes to the pool
        self._unhook(ex)
        if not ex.response_complete:
            ex.status = ex.status or _CLIENT_CLOSED
            self._account(ex)

    def _done_aborted(self, ex: Exchange) -> None:
        ex.close_after = True
        self.current = None
        self._account(ex)
        self.dead = True
        self.transport.abort()

    def _account(self, ex: Exchange) -> None:
        self.worker.stats.record(self.listener, ex.rule, ex.target, ex.status, ex.upstream_time)
        if self.worker.access_log:
            self._log(ex)

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

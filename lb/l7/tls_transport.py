"""HTTPS listeners' TLS on the socket itself: OpenSSL reads and writes the
connection's descriptor, as nginx's does.

asyncio's and uvloop's TLS (``create_server(ssl=...)``) runs OpenSSL on
memory BIOs: every flight of a handshake and every record after it is read
from the socket by the loop, copied into OpenSSL's input BIO, processed,
copied out of its output BIO and written, with the loop's TLS protocol
between each step. Here OpenSSL gets the socket's descriptor instead
(CPython's ``_ssl`` object made on a non-blocking socket: OpenSSL's socket
BIO, no memory BIO): one ``do_handshake()`` call reads the ClientHello and
writes the server's whole flight, one ``read()`` is one ``recv`` and the
decryption, one ``write()`` the encryption and the ``send``. The loop only
says when the descriptor is readable or writable (``add_reader``,
``add_writer``). tests/bench/https.py measured it: docs/architecture.md
("TLS") has the figures.

- :class:`TlsServer`: one listening socket (``SO_REUSEPORT``, as the
  workers' plain listeners), accepting in batches when it is readable; an
  accept that fails for want of descriptors stops accepting for a moment
  (a level-triggered listener would spin otherwise).
- :class:`TlsTransport`: one connection. Until its handshake is done it has
  no protocol, a deadline (``handshake_timeout``: a client that stalls or
  sends a ClientHello a byte at a time is closed at it) and counts as open
  with the worker (:class:`Handshakes`), which may close it to make room
  for new connections near the descriptor limit. Then it is an
  ``asyncio.Transport`` for the listener's protocol: writes go straight to
  OpenSSL, what the socket does not take waits for it to be writable
  (``pause_writing`` past the high-water mark); ``close`` sends the queue,
  then a close_notify; ``abort`` drops the queue. TLS has no half-close:
  ``can_write_eof`` is False.

SNI: the listening context's ``sni_callback`` is called with the transport
as the connection (``owner``), and sets ``transport.context`` as it would
an ``SSLObject``'s (lb.tls.SniContexts).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("lb.l7")

_READ_SIZE = 64 * 1024  # TLS records are 16 KiB at most: a read returns one
_ACCEPT_BATCH = 64  # connections accepted per readable event at most
_ACCEPT_PAUSE = 0.1  # seconds without accepting after running out of descriptors
_DEFER_ACCEPT = 5  # seconds a connection may wait for its first bytes before it is accepted anyway
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)

_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = range(4)


class Handshakes(Protocol):
    """What a TlsServer tells about connections in their handshake (the worker counts them as open)."""

    def handshake_started(self, transport: TlsTransport) -> None: ...

    def handshake_ended(self, transport: TlsTransport) -> None: ...


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking TCP socket listening on (host, port), SO_REUSEPORT (every worker binds it)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # The client speaks first in TLS: accept a connection once its ClientHello is there (as nginx's
        # `listen ... deferred`), so the first do_handshake() finds it, and connections that never say
        # a word cost no accept and no handshake state (the kernel drops them after the deadline).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, _DEFER_ACCEPT)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class TlsServer(asyncio.AbstractServer):
    """One HTTPS listening socket of a worker: accepts, and runs each connection's handshake."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext,
                 factory: Callable[[], asyncio.Protocol], handshake_timeout: float, handshakes: Handshakes) -> None:
        self.loop = loop
        self.sock = sock
        self.context = context
        self.factory = factory
        self.handshake_timeout = handshake_timeout
        self.handshakes = handshakes
        self._fd = sock.fileno()
        self._serving = True
        self._resume: asyncio.TimerHandle | None = None
        # Every connection's reads land here first (one loop, one read at a time), copied out as bytes.
        self.buffer = bytearray(_READ_SIZE)
        self.view = memoryview(self.buffer)
        loop.add_reader(self._fd, self._accept)

    @classmethod
    def listen(cls, loop: asyncio.AbstractEventLoop, host: str, port: int, backlog: int, context: ssl.SSLContext,
               factory: Callable[[], asyncio.Protocol], handshake_timeout: float,
               handshakes: Handshakes) -> TlsServer:
        return cls(loop, listening_socket(host, port, backlog), context, factory, handshake_timeout, handshakes)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self.sock,) if self._serving else ()

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_FDS:  # stop a moment: the listener would stay readable, the loop spin
                    log.warning("accepting on %s: %s; accepting again in %g s", self.sock.getsockname(),
                                exc.strerror, _ACCEPT_PAUSE)
                    self.loop.remove_reader(self._fd)
                    self._resume = self.loop.call_later(_ACCEPT_PAUSE, self._accept_again)
                    return
                continue  # ECONNABORTED and the like: that connection is gone, not the listener
            try:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                TlsTransport(self, conn, peer)
            except OSError:  # reset before we saw it
                conn.close()

    def _accept_again(self) -> None:
        self._resume = None
        if self._serving:
            self.loop.add_reader(self._fd, self._accept)

    def close(self) -> None:
        """Stop accepting (connections, and handshakes under way, go on)."""
        if not self._serving:
            return
        self._serving = False
        if self._resume is not None:
            self._resume.cancel()
        else:
            self.loop.remove_reader(self._fd)
        self.sock.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        pass  # serving from __init__

    async def serve_forever(self) -> None:
        raise NotImplementedError("the worker's loop runs the server")

    async def wait_closed(self) -> None:
        pass  # close() closed the socket


class TlsTransport(asyncio.Transport):
    """One TLS connection on its descriptor: its handshake, then a transport for its protocol."""

    __slots__ = ("__weakref__", "_server", "_loop", "_sock", "_fd", "_peer", "_local", "_tls", "_state",
                 "_protocol", "_timer", "_reading", "_paused", "_writer", "_inflight",
                 "_queue", "_queued", "_high", "_low", "_write_paused")

    def __init__(self, server: TlsServer, sock: socket.socket, peer: Any) -> None:
        super().__init__()
        self._server = server
        loop = self._loop = server.loop
        self._sock = sock
        self._fd = sock.fileno()
        self._peer = peer
        self._local: Any = None
        # OpenSSL on the descriptor. The SNI callback gets this transport (owner).
        self._tls: Any = server.context._wrap_socket(sock, True, None, owner=self)  # type: ignore[attr-defined]
        self._state = _HANDSHAKE
        self._protocol: asyncio.Protocol | None = None
        self._reading = True  # the reader registered (never while paused)
        self._paused = False  # the protocol paused reading
        self._writer = False  # the writer registered
        self._inflight: bytes | None = None  # a write OpenSSL has begun: retried with the same bytes
        self._queue: list[bytes] = []  # written after it
        self._queued = 0  # bytes in both
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = loop.call_later(server.handshake_timeout, self._expired)
        loop.add_reader(self._fd, self._readable)
        server.handshakes.handshake_started(self)  # may close it at once (no descriptor to spare)
        if self._state == _HANDSHAKE:
            self._handshake()  # the ClientHello may be there already

    # --- the SNI callback's view: the connection's context ---------------------------

    @property
    def context(self) -> ssl.SSLContext:
        return self._tls.context  # type: ignore[no-any-return]

    @context.setter
    def context(self, ctx: ssl.SSLContext) -> None:
        self._tls.context = ctx

    # --- the handshake ------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._want_write(False)
            return
        except ssl.SSLWantWriteError:
            self._want_write(True)
            return
        except (ssl.SSLError, OSError) as exc:  # not TLS, a refused version or cipher, reset, closed
            log.debug("TLS handshake with %s failed: %s", self._peer, exc)
            self._close_now(None)
            return
        self._want_write(False)
        self._handshake_over()
        self._state = _OPEN
        protocol = self._protocol = self._server.factory()
        try:
            protocol.connection_made(self)  # may set another protocol (HttpsProtocol by ALPN), or close
        except Exception as exc:  # a bug: this connection ends, not the worker (as uvloop's transports do)
            self._protocol_failed(exc)
            return
        if self._state == _OPEN and not self._paused:
            self._read()  # the request may have come with the client's Finished

    def _handshake_over(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._server.handshakes.handshake_ended(self)

    def _expired(self) -> None:
        self._timer = None
        self._server.handshakes.handshake_ended(self)
        log.debug("TLS handshake with %s: no handshake within %g s", self._peer, self._server.handshake_timeout)
        self._close_now(None)

    def in_handshake(self) -> bool:
        return self._state == _HANDSHAKE

    # --- readiness --------------------------------------------------------------------

    def _readable(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake()
        elif self._state == _OPEN:
            self._read()

    def _writable(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake()
        else:
            self._flush()

    def _want_write(self, on: bool) -> None:
        if on and not self._writer:
            self._loop.add_writer(self._fd, self._writable)
            self._writer = True
        elif not on and self._writer:
            self._loop.remove_writer(self._fd)
            self._writer = False

    # --- reading -------------------------------------------------------------------------

    def _read(self) -> None:
        tls, buffer = self._tls, self._server.buffer
        while True:
            try:
                n = tls.read(_READ_SIZE, buffer)
            except _WANT:
                return
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or closed without one
                n = 0
            except (ssl.SSLError, OSError) as exc:
                self._close_now(exc)
                return
            if not n:
                self._eof()
                return
            assert self._protocol is not None
            try:
                self._protocol.data_received(bytes(self._server.view[:n]))
            except Exception as exc:
                self._protocol_failed(exc)
                return
            # More decrypted bytes than the buffer held: OpenSSL has them, the socket may not say so.
            if self._state != _OPEN or self._paused or not tls.pending():
                return

    def _eof(self) -> None:
        assert self._protocol is not None
        try:
            self._protocol.eof_received()  # no half-close over TLS: whatever it answers, the connection ends
        except Exception as exc:
            self._protocol_failed(exc)
            return
        if self._state == _OPEN:
            self.close()

    def _protocol_failed(self, exc: Exception) -> None:
        log.error("TLS connection from %s: its protocol failed, connection closed", self._peer, exc_info=exc)
        self._close_now(exc)

    def pause_reading(self) -> None:
        if self._state == _OPEN and not self._paused:
            self._paused = True
            if self._reading:
                self._loop.remove_reader(self._fd)
                self._reading = False

    def resume_reading(self) -> None:
        if self._state == _OPEN and self._paused:
            self._paused = False
            self._loop.add_reader(self._fd, self._readable)
            self._reading = True
            if self._tls.pending():  # decrypted, waiting in OpenSSL: the socket will not say so
                self._loop.call_soon(self._readable)

    def is_reading(self) -> bool:
        return self._state == _OPEN and not self._paused

    # --- writing --------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state != _OPEN or not data:
            return  # closing or closed: dropped, as asyncio's transports do
        if self._inflight is None:
            try:
                self._tls.write(data)
                return
            except _WANT:
                self._inflight = bytes(data)
                self._queued += len(data)
                self._want_write(True)
            except (ssl.SSLError, OSError) as exc:
                self._close_now(exc)
                return
        else:
            self._queue.append(bytes(data))
            self._queued += len(data)
        if not self._write_paused and self._queued > self._high:
            self._write_paused = True
            assert self._protocol is not None
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _flush(self) -> None:
        tls = self._tls
        while self._inflight is not None:
            try:
                tls.write(self._inflight)
            except _WANT:
                return
            except (ssl.SSLError, OSError) as exc:
                self._close_now(exc)
                return
            if self._queue:
                self._inflight = b"".join(self._queue)
                self._queue.clear()
                self._queued = len(self._inflight)
            else:
                self._inflight = None
                self._queued = 0
        self._want_write(False)
        if self._write_paused:
            self._write_paused = False
            if self._state == _OPEN:
                assert self._protocol is not None
                self._protocol.resume_writing()
        if self._state == _CLOSING:
            self._shutdown()

    def get_write_buffer_size(self) -> int:
        return self._queued

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    # --- the end -------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._state != _OPEN

    def close(self) -> None:
        """What is queued goes out, then a close_notify; then connection_lost(None)."""
        if self._state == _HANDSHAKE:
            self._handshake_over()
            self._close_now(None)
        elif self._state == _OPEN:
            self._state = _CLOSING
            if self._reading:
                self._loop.remove_reader(self._fd)
                self._reading = False
            if self._inflight is None:
                self._shutdown()

    def abort(self) -> None:
        if self._state == _HANDSHAKE:
            self._handshake_over()
        self._close_now(None)

    def _shutdown(self) -> None:
        try:
            self._tls.shutdown()  # our close_notify; the client's is not waited for
        except (ssl.SSLError, OSError, ValueError):
            pass
        self._close_now(None)

    def _close_now(self, exc: Exception | None) -> None:
        if self._state == _CLOSED:
            return
        had_protocol = self._state != _HANDSHAKE
        if self._state == _HANDSHAKE:
            self._handshake_over()
        self._state = _CLOSED
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        self._want_write(False)
        self._inflight = None
        self._queue.clear()
        self._queued = 0
        self._sock.close()
        if had_protocol:
            assert self._protocol is not None
            self._loop.call_soon(self._protocol.connection_lost, exc)

    # --- the rest of asyncio.Transport -------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        if name == "sockname":
            if self._local is None and self._state != _CLOSED:
                try:
                    self._local = self._sock.getsockname()
                except OSError:
                    return default
            return self._local if self._local is not None else default
        if name == "ssl_object":
            return self._tls
        if name == "socket":
            return self._sock
        if name == "sslcontext":
            return self._tls.context
        if name == "cipher":
            return self._tls.cipher()
        if name == "peercert":
            return self._tls.getpeercert()
        if name == "compression":
            return self._tls.compression()
        return default

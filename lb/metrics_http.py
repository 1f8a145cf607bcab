"""The HTTP side of the Prometheus endpoint: one thread, bounded connections.

    server = ScrapeServer(("127.0.0.1", 9464), render)   # render(accept, accept_encoding) -> (type, headers, body)
    ...
    server.close()

prometheus_client's own server starts a thread per connection and never
times one out: 3,000 idle connections made 737 threads. This one is a
single thread around a selector. A connection must send its request head
within ``idle_timeout`` and take its answer within ``idle_timeout`` of the
last progress, or it is closed; at most ``max_connections`` are open, and a
new one beyond that closes the oldest connection still waiting for its
request head (an idle or slow client, never a scrape being answered). A
scrape is answered in this thread, one at a time, then the connection is
closed (``Connection: close``: Prometheus reconnects for every scrape
anyway when told to). Running out of file descriptors sheds the oldest idle
connection instead of spinning on the listener.

Only GET and HEAD of ``/metrics`` (and ``/``) are served; anything else is
404 or 405.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("lb.metrics")

# render(accept header, accept-encoding header) -> (content type, extra headers, body)
Render = Callable[[str, str], tuple[str, list[tuple[str, str]], bytes]]

MAX_HEAD = 8192  # a request head longer than this is refused
IDLE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
BACKLOG = 128
PATHS = ("/metrics", "/")


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None  # the answer being written; None while reading the head


class ScrapeServer:
    """Serves `render` on (host, port) from one daemon thread; close() stops it."""

    def __init__(self, address: tuple[str, int], render: Render, *, idle_timeout: float = IDLE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self._render = render
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(BACKLOG)
            self._listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            self._listener.close()
            raise
        host, port = self._listener.getsockname()[:2]
        self.address = (str(host), int(port))
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._conns: dict[socket.socket, _Conn] = {}  # oldest first
        self._closing = False
        self._paused_until = 0.0  # accepting paused after EMFILE with nothing to shed
        self._last_fd_warning = 0.0
        self._thread = threading.Thread(target=self._run, name="lb-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(10.0)

    # --- the loop ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closing:
                now = time.monotonic()
                if self._paused_until and now >= self._paused_until:
                    self._paused_until = 0.0
                    self._selector.register(self._listener, selectors.EVENT_READ)
                wake = [c.deadline for c in self._conns.values()] + [now + 1.0]
                if self._paused_until:
                    wake.append(self._paused_until)
                timeout = min(wake) - now
                for key, events in self._selector.select(max(0.0, timeout)):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        continue
                    else:
                        conn = self._conns.get(key.fileobj)  # type: ignore[call-overload]  # our sockets
                        if conn is not None:
                            self._serve(conn, events)
                self._expire(time.monotonic())
        except Exception:  # never silently: the endpoint would be gone
            log.exception("metrics endpoint failed")
        finally:
            for conn in list(self._conns.values()):
                self._drop(conn)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._out_of_files(exc)
                    return
                if exc.errno == errno.ECONNABORTED:
                    continue
                raise
            if len(self._conns) >= self._max_connections and not self._shed_oldest_idle():
                sock.close()  # every slot is answering a scrape
                continue
            sock.setblocking(False)
            self._conns[sock] = _Conn(sock, time.monotonic() + self._idle_timeout)
            self._selector.register(sock, selectors.EVENT_READ)

    def _out_of_files(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_fd_warning >= 10.0:
            self._last_fd_warning = now
            log.warning("metrics endpoint: cannot accept (%s): closing the oldest idle connection", exc.strerror)
        if not self._shed_oldest_idle():
            self._paused_until = now + 0.5  # the listener stays readable: do not spin on it
            self._selector.unregister(self._listener)

    def _shed_oldest_idle(self) -> bool:
        for conn in self._conns.values():
            if conn.out is None:
                self._drop(conn)
                return True
        return False

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # --- one connection --------------------------------------------------------------

    def _serve(self, conn: _Conn, events: int) -> None:
        try:
            if conn.out is None and events & selectors.EVENT_READ:
                self._read(conn)
            elif conn.out is not None and events & selectors.EVENT_WRITE:
                self._write(conn)
        except OSError:
            self._drop(conn)

    def _read(self, conn: _Conn) -> None:
        data = conn.sock.recv(MAX_HEAD)
        if not data:
            self._drop(conn)
            return
        conn.received += data
        end = conn.received.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.received) > MAX_HEAD:
                self._answer(conn, 431, "text/plain", [], b"request head too large\n", head_only=False)
            return
        self._answer(conn, *self._respond(bytes(conn.received[:end])))

    def _respond(self, head: bytes) -> tuple[int, str, list[tuple[str, str]], bytes, bool]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return 400, "text/plain", [], b"bad request\n", False
        method, target, _ = parts
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if target.split("?", 1)[0] not in PATHS:
            return 404, "text/plain", [], b"not found: try /metrics\n", method == "HEAD"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", [("Allow", "GET, HEAD")], b"method not allowed\n", False
        content_type, extra, body = self._render(headers.get("accept", ""), headers.get("accept-encoding", ""))
        return 200, content_type, extra, body, method == "HEAD"

    def _answer(self, conn: _Conn, status: int, content_type: str, extra: list[tuple[str, str]], body: bytes,
                head_only: bool) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}[status]
        lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
                 "Connection: close", *(f"{name}: {value}" for name, value in extra)]
        conn.out = memoryview(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))
        conn.deadline = time.monotonic() + self._idle_timeout
        self._selector.modify(conn.sock, selectors.EVENT_WRITE)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.out is not None
        sent = conn.sock.send(conn.out)
        if sent:
            conn.out = conn.out[sent:]
            conn.deadline = time.monotonic() + self._idle_timeout
        if not conn.out:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._drop(conn)

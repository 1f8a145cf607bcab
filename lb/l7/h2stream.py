"""One HTTP/2 stream: a request, forwarded over HTTP/1.1, and its response.

An :class:`H2Stream` is a :class:`~lb.l7.client.ClientProtocol` that
carries exactly one exchange: the request comes from the stream's HEADERS
and DATA (decoded by :mod:`lb.l7.h2client`) instead of httptools, and from
there everything is the HTTP/1.1 path: the rules, the actions, the pools,
the upstream connection, the timeouts, the access log. What differs is the
transport it answers on, a :class:`StreamTransport`: the upstream side and
the local answers (redirects, fixed responses, errors) write an HTTP/1.x
response to it as they would to a socket, and it turns that into the
stream's HEADERS and DATA frames. The exchange is marked HTTP/1.0
(``version11`` False), so the response body reaches it unchunked, ended by
``response_done``, with no interim responses.

Flow control, per stream:

- request body: the client may send only what the stream's window allows;
  the window is given back (WINDOW_UPDATE) once the bytes are passed on,
  and held while the stream's :class:`StreamGate` has a reason to pause
  (the target takes no more, or the body waits for a connection), so a
  slow target slows its client and no other stream.
- response body: DATA goes out as the client's windows allow; the rest
  waits in the stream, and past ``buffer_high_water`` the target's
  connection stops being read until the client opens its window again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from lb.l7 import errors
from lb.l7.client import ClientProtocol
from lb.l7.exchange import Exchange
from lb.l7.flow_control import ReadGate
from lb.l7.request_head import VALID_HOSTS

if TYPE_CHECKING:
    from lb.l7.h2client import H2ClientConnection

Headers = Iterable[tuple[bytes, bytes]]

# Response headers an HTTP/1.1 head has and an HTTP/2 one must not (RFC 9113 §8.2.2).
_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"))
_NO_BODY = frozenset((b"204", b"304"))
_HEAD, _BODY, _ENDED = range(3)

CANCEL = 0x8  # RFC 9113 error codes used here
INTERNAL_ERROR = 0x2
NO_ERROR = 0x0


class StreamGate(ReadGate):
    """A stream's reasons to stop taking request body: while any holds, the
    bytes received are not acknowledged, so the client's window closes."""

    __slots__ = ("_stream",)

    def __init__(self, stream: H2Stream) -> None:
        # Not ReadGate.__init__: there is no transport to pause, only a window to withhold.
        self._stream = stream
        self.reasons = 0

    def pause(self, reason: int) -> None:
        self.reasons |= reason

    def release(self) -> None:
        if self.reasons:
            self.reasons = 0
            self._stream.give_window()

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                self._stream.give_window()


class StreamTransport:
    """What a stream's exchange writes its HTTP/1.x response to: HEADERS and DATA out."""

    __slots__ = ("conn", "stream", "stream_id", "state", "head", "pending", "pending_size", "finishing",
                 "reset_after", "closing", "paused")

    def __init__(self, conn: H2ClientConnection, stream: H2Stream, stream_id: int) -> None:
        self.conn = conn
        self.stream = stream
        self.stream_id = stream_id
        self.state = _HEAD
        self.head = b""  # a response head not yet whole
        self.pending: list[bytes] = []  # body bytes the client's windows do not admit yet
        self.pending_size = 0
        self.finishing = False  # END_STREAM after the pending bytes
        self.reset_after = False  # ...then RST_STREAM (NO_ERROR): the request's body is not wanted
        self.closing = False  # reset or ended: write nothing more
        self.paused = False  # the target's connection is not read (pending over the high-water mark)

    # --- the transport the exchange sees -------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closing:
            return
        if self.state == _HEAD:
            head = self.head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self.head = head
                return
            self.head = b""
            self._send_head(head[:end])
            data = head[end + 4 :]
            if not data:
                return
        if self.state != _BODY:  # no body for this response (HEAD, 204, 304): dropped
            return
        self.pending.append(data)
        self.pending_size += len(data)
        self.conn.flush_soon(self)  # at the end of this loop iteration: the last DATA may carry END_STREAM

    def writelines(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self.write(line)

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:  # never called: can_write_eof() is False
        raise NotImplementedError

    def close(self) -> None:
        """The exchange is over: end the stream (what is written goes out first),
        or reset it if no response was begun."""
        if self.state == _HEAD and not self.closing:
            self.abort(CANCEL)
        else:
            self.finish()

    def abort(self, code: int = INTERNAL_ERROR) -> None:
        """The response cannot be completed: reset the stream."""
        if self.closing:
            return
        self.closing = True
        self.pending.clear()
        self.pending_size = 0
        self.conn.reset_stream(self.stream_id, code)

    def pause_reading(self) -> None:  # the stream's gate does the pausing (StreamGate)
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.conn.transport.get_extra_info(name, default)

    # --- HTTP/1.x → HTTP/2 ---------------------------------------------------------------

    def _send_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status = lines[0][9:12]
        headers = [(b":status", status)]
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name not in _HOP:
                headers.append((name, value.strip()))
        ends = self.stream.head_only or status in _NO_BODY
        self.state = _ENDED if ends else _BODY
        if ends:
            self.closing = True
        self.conn.send_headers(self.stream_id, headers, ends)

    def flush(self) -> None:
        """Send what the windows allow; END_STREAM once all is sent and the response is whole
        (on the last DATA frame, or on an empty one)."""
        if self.closing:
            return
        if self.pending:
            self.pending_size -= self.conn.send_data(self, self.pending, self.finishing and not self.reset_after)
            if self.closing:  # the last DATA carried END_STREAM
                return
        if self.pending:
            if not self.paused and self.pending_size > self.conn.config.buffer_high_water:
                self.paused = True
                self.stream.pause_writing()
            return
        if self.paused:
            self.paused = False
            self.stream.resume_writing()
        if self.finishing and not self.closing:
            self.closing = True
            self.conn.end_stream(self.stream_id, self.reset_after)

    def finish(self, reset_after: bool = False) -> None:
        if self.state == _ENDED:  # ended with its head (HEAD, 204, 304)
            if reset_after:
                self.conn.reset_stream(self.stream_id, NO_ERROR)
            else:
                self.conn.forget(self.stream_id)
            return
        if self.finishing or self.closing:
            return
        if self.state == _HEAD:  # nothing was written: not a response
            self.abort(INTERNAL_ERROR)
            return
        self.finishing = True
        self.reset_after = reset_after
        if self.pending:
            self.conn.flush_soon(self)
        else:
            self.flush()


class H2Stream(ClientProtocol):
    http2 = True

    __slots__ = ("conn", "stream_id", "out", "unacked", "head_only")

    def __init__(self, conn: H2ClientConnection, stream_id: int) -> None:
        super().__init__(conn.worker, conn.listener, True, conn.no_parser)
        self.conn = conn
        self.stream_id = stream_id
        self.unacked = 0  # request body bytes received and not yet given back to the client's window
        self.head_only = False
        self.out = StreamTransport(conn, self, stream_id)
        self.transport = self.out  # type: ignore[assignment]  # what the exchange writes to: a stream, not a socket
        self.gate = StreamGate(self)
        # The connection's, formatted once per connection.
        self.peer = conn.peer
        self.peer_ip = conn.peer_ip
        self.local_host = conn.local_host
        self.local_port = conn.local_port
        self.authority = conn.authority
        self.xff_line = conn.xff_line
        self.fwd_tail = conn.fwd_tail
        self.tls_cipher = conn.tls_cipher
        self.tls_protocol = conn.tls_protocol

    # --- the request ---------------------------------------------------------------------

    def request(self, headers: Headers, ended: bool) -> Exchange | None:
        """The stream's HEADERS (validated by h2: pseudo-headers first, names in
        lower case, no connection-specific header). Returns the exchange to
        start, or None if it was refused (answered already)."""
        ex = self.parsing = Exchange(self)
        ex.version11 = False  # the response reaches us unchunked (see the module's docstring)
        self.in_head = True
        method = path = authority = None
        try:
            for name, value in headers:
                if name[:1] == b":":
                    if name == b":method":
                        method = value
                    elif name == b":path":
                        path = value
                    elif name == b":authority":
                        authority = value
                    # :scheme: the listener's (https) is what the target is told
                    continue
                if name == b"host":
                    if authority is not None:  # :authority wins; a different Host is an attack
                        if value != authority:
                            raise errors.RequestRejected(errors.BAD_REQUEST, "Host differs from :authority")
                        continue
                    authority = value
                self.on_header(name, value)
            if authority is not None and ex.host is None:
                if authority in VALID_HOSTS:
                    ex.host = authority
                    ex.parts += (b"host", b": ", authority, b"\r\n")
                else:
                    self.on_header(b"host", authority)
            if method is None or path is None:  # CONNECT (h2 lets it through without :path): refused below
                method = method or b"CONNECT"
                path = path or b"/"
            self._head_complete(ex, method, path, ended)
        except errors.RequestRejected as exc:
            self._reject(exc.status, exc.why, exc.reason)
            return None
        return ex

    def _head_complete(self, ex: Exchange, method: bytes, path: bytes, ended: bool) -> None:
        self.in_head = False
        ex.method = method
        ex.url = path
        if len(path) > self.config.max_request_line:
            raise errors.RequestRejected(errors.BAD_REQUEST, "request line too long", errors.REQUEST_HEAD_TOO_LARGE)
        if b"#" in path:
            raise errors.RequestRejected(errors.BAD_REQUEST, "fragment in the request-target")
        if method == b"TRACE" or method == b"CONNECT":
            raise errors.RequestRejected(errors.METHOD_NOT_ALLOWED, method.decode("latin-1"))
        if ex.host is None:
            raise errors.RequestRejected(errors.BAD_REQUEST, "HTTP/2 request without :authority or Host")
        parts = ex.parts
        parts[0] = method
        parts[2] = path
        ex.head_only = self.head_only = method == b"HEAD"
        if ended:
            ex.has_body = False
            ex.request_complete = True
        elif not ex.has_body or ex.chunked:
            # DATA frames follow and no Content-Length says how many bytes:
            # chunked to the target (a Content-Length: 0 with DATA: h2 refuses it).
            ex.has_body = ex.chunked = True
        ex.req_bytes = len(path) + ex.header_bytes + len(method) + 13
        ex.t_start = time.perf_counter()  # as ClientProtocol's
        self.last = ex

    def start(self, ex: Exchange) -> None:
        """Route and forward (deferred by the connection to the end of a read,
        so that a stream opened and reset in one read never reaches a target)."""
        if not self.dead and self.current is None:
            self._start(ex)

    def body(self, data: bytes, flow_controlled: int) -> None:
        self.last_rx = self.clock.now
        self.unacked += flow_controlled
        if data:
            self.on_body(data)
        if not self.gate.reasons:
            self.give_window()

    def give_window(self) -> None:
        if self.unacked:
            size, self.unacked = self.unacked, 0
            self.conn.acknowledge(self.stream_id, size)

    # --- how it ends (ClientProtocol's endings, for one stream) ----------------------------------

    def _done(self, ex: Exchange) -> None:
        ex.release()
        self.current = None
        self.served += 1
        self._account(ex)
        self.dead = True
        # Answered before the whole body came (a local answer, an error): the
        # stream is reset (NO_ERROR) once the response is out, so the client
        # sends no more of it (RFC 9113 §8.1).
        self.out.finish(reset_after=not ex.request_complete)
        self.parsing = None
        self.conn.stream_done()

    def _linger(self) -> None:
        self.dead = self.broken = True
        self.parsing = None
        self.out.close()

    def reset_by_client(self) -> None:
        """RST_STREAM from the client, or the connection went away: as a client that left."""
        self.dead = True
        self.out.closing = True
        ex = self.current
        if ex is not None:
            self.current = None
            self._abandon(ex)
        self.parsing = None
        self.queue.clear()

    def shutdown(self) -> None:  # a graceful stop finishes the stream's exchange
        self.closing = True


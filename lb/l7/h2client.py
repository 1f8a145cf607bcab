"""HTTP/2 from clients: one connection, its streams, and the ALPN choice.

An HTTPS listener offers ``h2`` and ``http/1.1`` by ALPN (ALB's default).
:class:`HttpsProtocol` is the protocol of a TLS connection until its
handshake is done; it then hands the transport to a
:class:`~lb.l7.client.ClientProtocol` (HTTP/1.1, or no ALPN) or to an
:class:`H2ClientConnection`. The framing is the ``h2`` library's (RFC 9113:
frames, HPACK, stream states, flow-control windows, stream and connection
errors; :class:`_H2` makes a malformed request and a stream over the limit
the stream errors RFC 9113 asks for, where h2 ends the connection); each
stream's request goes the HTTP/1.1 way to the targets (:mod:`lb.l7.h2stream`),
so rules, actions, pools and timeouts are the same.

Limits, in the settings we send and in what we do:

- ``SETTINGS_MAX_CONCURRENT_STREAMS`` (L7Config.h2_max_streams, 128 as
  ALB): one more is refused with RST_STREAM REFUSED_STREAM, the connection
  goes on (:class:`_H2`; h2 alone would end the connection). A stream counts
  until its response is sent, flow control included.
- ``SETTINGS_MAX_HEADER_LIST_SIZE`` (L7Config.max_headers), enforced by the
  HPACK decoder from the first HEADERS on; a header block of more than 64
  CONTINUATION frames is a connection error (h2's bound on buffered
  fragments), so a CONTINUATION flood holds at most 64 frames.
- ``SETTINGS_INITIAL_WINDOW_SIZE`` (L7Config.h2_stream_window): what one
  stream's request body may have in flight. The connection's window is that
  times the stream limit, so streams held back by a slow target never starve
  the others of window.
- Floods: each frame that costs us work but carries no request (PING,
  SETTINGS, PRIORITY, WINDOW_UPDATE, an empty DATA, an unknown type) takes a
  credit, and a stream the client resets before its response is whole takes
  :data:`RESET_COST` (rapid reset, CVE-2023-44487); credits come back with
  time (:data:`FLOOD_RATE`) and with each response sent. Out of credit, the
  connection ends with GOAWAY ENHANCE_YOUR_CALM. Streams opened in one read
  are started only after the whole read is decoded, so a stream opened and
  reset in the same read never reaches a target.
- The client that does not read: while our transport's buffer is full, we
  stop reading the client too (no more ACKs to queue, no more requests), and
  every stream's response waits in the stream (its target's connection
  paused past ``buffer_high_water``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import httptools
from h2.config import H2Configuration
from h2.connection import H2Connection, _decode_headers
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import DenialOfServiceError, H2Error, ProtocolError, StreamClosedError, TooManyStreamsError
from h2.settings import SettingCodes, Settings
from h2.stream import StreamClosedBy
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

from lb.l7.client import ClientProtocol, WorkerView, connection_fields, tls_fields
from lb.l7.exchange import Exchange
from lb.l7.h2stream import H2Stream, StreamTransport

log = logging.getLogger("lb.l7")

FLOOD_BURST = 1000.0  # credits a connection starts with, and holds at most
FLOOD_RATE = 100.0  # credits back per second
RESET_COST = 10.0  # a stream reset by the client before its response was whole
RESPONSE_REFUND = 5.0  # a response sent whole


class _H2(H2Connection):
    # h2 remembers how each closed stream closed, to answer late frames on it
    # precisely: 65536 of them by default, a few MB for every long-lived
    # connection. A frame for a stream older than these gets RST_STREAM
    # (STREAM_CLOSED), which RFC 9113 §5.1 allows.
    MAX_CLOSED_STREAMS = 1024

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[Event]]:
        try:
            return super()._receive_headers_frame(frame)
        except TooManyStreamsError:
            stream_id = frame.stream_id
            if stream_id % 2 == 0 or stream_id <= self.highest_inbound_stream_id:
                raise  # not a new client stream: h2's connection error stands
        except DenialOfServiceError:
            raise  # a header list over the limit: the connection ends (ENHANCE_YOUR_CALM)
        except ProtocolError:
            # A malformed request on a stream h2 opened (an upper-case or
            # connection-specific header, a pseudo-header out of place): a
            # stream error (RFC 9113 §8.1.1), not h2's connection error.
            # Anything before the stream exists (HPACK, stream ids) stays one.
            stream = self.streams.get(frame.stream_id)
            if stream is None or stream.closed:
                raise
            self.reset_stream(frame.stream_id, ErrorCodes.PROTOCOL_ERROR)
            return [], []
        # Over SETTINGS_MAX_CONCURRENT_STREAMS: a stream error (RFC 9113 §5.1.2),
        # not h2's connection error. The stream is refused (REFUSED_STREAM: the
        # client may send it again) and the connection goes on. Its header block
        # is still decoded (HPACK's table is the connection's), and it is
        # remembered as reset by us, so its DATA is answered as a reset stream's
        # (h2 gives the connection's window back).
        _decode_headers(self.decoder, frame.data)
        self.highest_inbound_stream_id = stream_id
        self._closed_streams[stream_id] = StreamClosedBy.SEND_RST_STREAM
        return [RstStreamFrame(stream_id, error_code=ErrorCodes.REFUSED_STREAM)], []


class HttpsProtocol(asyncio.Protocol):
    """A TLS connection's protocol until the handshake is done: then HTTP/2 or HTTP/1.1, by ALPN."""

    __slots__ = ("worker", "listener")

    def __init__(self, worker: WorkerView, listener: str) -> None:
        self.worker = worker
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        protocol: asyncio.Protocol
        if alpn == "h2":
            protocol = H2ClientConnection(self.worker, self.listener)
        else:
            protocol = ClientProtocol(self.worker, self.listener, True)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class H2ClientConnection(asyncio.Protocol):
    __slots__ = (
        # Worker-wide.
        "worker",
        "loop",
        "clock",
        "config",
        "listener",
        # Per connection.
        "transport",
        "h2",
        "peer",
        "peer_ip",
        "local_host",
        "local_port",
        "authority",
        "xff_line",
        "fwd_tail",
        "tls_cipher",  # the handshake's, for the access log (lb.l7.client.tls_fields)
        "tls_protocol",
        "last_rx",
        "write_paused",
        "closing",  # GOAWAY sent or received: no new streams; close when the last one ends
        "dead",
        "credit",  # flood credits (see the module's docstring)
        "credit_at",
        # Streams.
        "streams",  # stream id → H2Stream, until its response is sent (or it is reset)
        "starting",  # streams whose request arrived in this read: started once it is decoded
        "blocked",  # stream id → its transport, with DATA waiting for window
        "dirty",  # transports with DATA to send at the end of this loop iteration
        "out_scheduled",  # _flush_out is scheduled
        "no_parser",  # the streams' httptools parser, never fed (ClientProtocol wants one)
    )

    def __init__(self, worker: WorkerView, listener: str) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.clock = worker.clock
        self.config = worker.config
        self.listener = listener
        self.transport: asyncio.Transport  # set by connection_made
        config = self.config
        self.h2 = _H2(H2Configuration(client_side=False, header_encoding=None,
                                               validate_outbound_headers=False, normalize_outbound_headers=False))
        self.h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: config.h2_max_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: config.h2_stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: config.max_headers,
            SettingCodes.ENABLE_PUSH: 0,
        })
        # From the first HEADERS on, before our SETTINGS are acknowledged.
        self.h2.decoder.max_header_list_size = config.max_headers
        self.peer = "-"
        self.peer_ip = ""
        self.local_host = "127.0.0.1"
        self.local_port = 0
        self.authority = b""
        self.xff_line = b""
        self.fwd_tail = b""
        self.tls_cipher = self.tls_protocol = "-"
        self.last_rx = self.clock.now
        self.write_paused = False
        self.closing = False
        self.dead = False
        self.credit = FLOOD_BURST
        self.credit_at = self.clock.now
        self.streams: dict[int, H2Stream] = {}
        self.starting: list[tuple[H2Stream, Exchange]] = []
        self.blocked: dict[int, StreamTransport] = {}
        self.dirty: dict[StreamTransport, None] = {}
        self.out_scheduled = False
        self.no_parser = httptools.HttpRequestParser(self)

    # --- what the worker sees (lb.l7.client.ClientConnection) ---------------------------

    @property
    def current(self) -> object | None:
        """Something in flight (for shedding): the streams, or None."""
        return self.streams or None

    tunnel = None
    upgrading = None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        fields = connection_fields(transport, "https")
        self.worker.opened(self)
        if fields is None:  # reset before we saw it (see ClientProtocol.connection_made)
            self.dead = True
            self.transport.abort()
            return
        (self.peer_ip, self.peer, self.local_host, self.local_port, self.authority, self.xff_line,
         self.fwd_tail) = fields
        self.tls_cipher, self.tls_protocol = tls_fields(transport)
        h2 = self.h2
        h2.initiate_connection()
        window = self.config.h2_stream_window * self.config.h2_max_streams
        if window > 65535:
            h2.increment_flow_control_window(min(window, 2**31 - 1) - 65535)
        self._write()
        if self.worker.closing:
            self.shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        self.worker.closed(self)
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        self.starting.clear()
        for stream in streams:
            stream.reset_by_client()

    def pause_writing(self) -> None:
        # The client does not read: queue nothing more for it (see the module's docstring).
        self.write_paused = True
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.transport.is_closing():
            self.transport.resume_reading()
        self._flush_blocked()

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.clock.now
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:  # a connection error: h2 queued the GOAWAY
            log.debug("%s: HTTP/2 connection error: %s", self.peer, exc)
            self._flush_out()
            self._close()
            return
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
            if self.dead:
                return
        starting = self.starting
        if starting:
            self.starting = []
            for stream, ex in starting:
                stream.start(ex)
        self._write()  # what the read produced (ACKs, WINDOW_UPDATEs, local answers), with whatever follows it

    def eof_received(self) -> bool:
        return False  # TLS: never called with data to finish; close

    # --- frames from the client -----------------------------------------------------------

    def _request(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        if self.closing:  # after our GOAWAY: not processed (the client may retry it elsewhere)
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = self.streams[stream_id] = H2Stream(self, stream_id)
        ex = stream.request(event.headers, event.stream_ended is not None)
        if ex is not None:
            self.starting.append((stream, ex))

    def _data(self, event: DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if not event.data and event.stream_ended is None:
            self._charge(1.0)  # an empty DATA frame: nothing but work
        if stream is None or stream.parsing is None:  # a stream we finished with: the window is the connection's
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        stream.body(event.data, event.flow_controlled_length)

    def _ended(self, event: StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream.on_message_complete()

    def _stream_reset(self, event: StreamReset) -> None:
        stream = self.streams.pop(event.stream_id, None)
        self.blocked.pop(event.stream_id, None)
        if stream is None:
            return
        if not stream.dead:  # reset before its response was whole: what rapid reset does
            self._charge(RESET_COST)
        stream.reset_by_client()

    def _window(self, event: WindowUpdated) -> None:
        self._charge(1.0)  # given back with the DATA frames it lets us send (send_data)
        if self.dead:
            return
        if event.stream_id == 0:
            self._flush_blocked()
        else:
            blocked = self.blocked.get(event.stream_id)
            if blocked is not None:
                blocked.flush()

    def _settings(self, event: RemoteSettingsChanged) -> None:
        self._charge(1.0)
        if not self.dead and SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._flush_blocked()

    def _control(self, event: Event) -> None:
        self._charge(1.0)  # PING (h2 answers it), PRIORITY, unknown frames

    def _goaway(self, event: ConnectionTerminated) -> None:
        # The client is done with the connection. h2 sends nothing after a
        # GOAWAY received, so the streams in flight end here too (as the
        # client's leaving): their targets' connections are dropped.
        self._close()

    # --- floods ---------------------------------------------------------------------------

    def _charge(self, cost: float) -> None:
        now = self.clock.now
        credit = min(FLOOD_BURST, self.credit + (now - self.credit_at) * FLOOD_RATE) - cost
        self.credit_at = now
        self.credit = credit
        if credit < 0 and not self.dead:
            log.info("%s: HTTP/2 flood (control frames or resets); closing with ENHANCE_YOUR_CALM", self.peer)
            self.worker.h2_calmed += 1
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=self.h2.highest_inbound_stream_id)
            self._flush_out()
            self._close()

    # --- what streams call ------------------------------------------------------------------

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.dead:
            return
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end)
        except H2Error as exc:  # reset by the client meanwhile, or a header h2 will not send
            log.debug("%s: stream %d: response head not sent: %s", self.peer, stream_id, exc)
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.out.closing = True  # nothing more of this response
            self.reset_stream(stream_id, ErrorCodes.INTERNAL_ERROR)
            return
        self._write()

    def send_data(self, transport: StreamTransport, pending: list[bytes], end: bool) -> int:
        """Send from ``pending`` (taking what goes) as the windows allow; the bytes
        sent. ``end``: the response is whole, the last DATA ends the stream."""
        stream_id = transport.stream_id
        if self.write_paused or self.dead or stream_id not in self.streams:
            if not self.dead and stream_id in self.streams:
                self.blocked[stream_id] = transport
            return 0
        h2 = self.h2
        window = h2.local_flow_control_window(stream_id)
        frame = h2.max_outbound_frame_size
        sent = frames = 0
        try:
            while pending and window > 0:
                chunk = pending[0]
                size = min(window, frame)
                if len(chunk) > size:
                    piece = chunk[:size]
                    pending[0] = chunk[size:]
                else:
                    piece = chunk
                    del pending[0]
                window -= len(piece)
                sent += len(piece)
                frames += 1
                if end and not pending:
                    h2.send_data(stream_id, piece, end_stream=True)
                    transport.closing = True
                    self.forget(stream_id)
                else:
                    h2.send_data(stream_id, piece)
        except H2Error as exc:  # the client reset the stream meanwhile (or the connection is ending)
            log.debug("%s: stream %d: DATA not sent: %s", self.peer, stream_id, exc)
            transport.closing = True
            pending.clear()
            self.forget(stream_id)
            return sent
        if pending:
            self.blocked[stream_id] = transport
        else:
            self.blocked.pop(stream_id, None)
        if frames:  # a client reading a big response sends WINDOW_UPDATEs: they are not a flood
            self.credit = min(FLOOD_BURST, self.credit + frames)
        self._write()
        return sent

    def flush_soon(self, transport: StreamTransport) -> None:
        """Send ``transport``'s DATA at the end of this loop iteration."""
        self.dirty[transport] = None
        self._write()

    def end_stream(self, stream_id: int, reset_after: bool) -> None:
        if self.dead:
            return
        try:
            self.h2.end_stream(stream_id)
            if reset_after:
                self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        except H2Error as exc:  # reset by the client meanwhile
            log.debug("%s: stream %d: not ended: %s", self.peer, stream_id, exc)
        self.forget(stream_id)
        self._write()

    def reset_stream(self, stream_id: int, code: int) -> None:
        self._reset(stream_id, code)
        self.forget(stream_id)
        self._write()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if self.dead:
            return
        self.h2.acknowledge_received_data(size, stream_id)
        self._write()

    def stream_done(self) -> None:
        """A stream's exchange is over (logged): credit for a response."""
        self.credit = min(FLOOD_BURST, self.credit + RESPONSE_REFUND)

    # --- the worker's sweep and graceful stop --------------------------------------------------

    def check_idle(self, now: float, idle: float, connect_timeout: float) -> None:
        if self.dead:
            return
        for stream in list(self.streams.values()):
            stream.check_idle(now, idle, connect_timeout)
        if now - self.last_rx > idle and all(stream.dead for stream in self.streams.values()):
            # Nothing from the client for the idle timeout and nothing it waits
            # for from a target: idle, or responses it does not make room for.
            self._flush_out()  # what the streams just answered (a 408) first
            self.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=self.h2.highest_inbound_stream_id)
            self._close()

    def shutdown(self) -> None:
        """Graceful stop: GOAWAY, finish the streams in flight, then close."""
        if self.dead:
            return
        if not self.closing:
            self.closing = True
            # Written by us, not h2's close_connection(): h2 would send nothing
            # more after it, and the streams in flight are to finish.
            self._flush_out()
            goaway = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=0)
            self.transport.write(goaway.serialize())
        for stream in self.streams.values():
            stream.shutdown()
        if not self.streams:
            self._close()

    # --- internals --------------------------------------------------------------------------------

    def _reset(self, stream_id: int, code: int) -> None:
        if self.dead:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except StreamClosedError:
            pass
        except H2Error as exc:  # the connection is closing already
            log.debug("%s: stream %d: not reset: %s", self.peer, stream_id, exc)

    def forget(self, stream_id: int) -> None:
        """The stream's response is sent (or it was reset): no more frames for it."""
        self.streams.pop(stream_id, None)
        self.blocked.pop(stream_id, None)
        if self.closing and not self.streams:
            self._close()

    def _flush_blocked(self) -> None:
        for transport in list(self.blocked.values()):
            if self.write_paused:
                return
            transport.flush()

    def _write(self) -> None:
        """Write what h2 has to send at the end of this loop iteration: the
        frames of every stream answered meanwhile go out in one TLS write."""
        if not self.out_scheduled:
            self.out_scheduled = True
            self.loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        dirty = self.dirty
        if dirty:  # (their send_data finds the write scheduled still: no second callback)
            self.dirty = {}
            for transport in dirty:
                transport.flush()
        self.out_scheduled = False
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        """Close after what h2 has to send (the last stream's end, a GOAWAY)."""
        self.dead = True
        data = self.h2.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)
        self.transport.close()


_HANDLERS: dict[type[Event], Callable[[H2ClientConnection, Any], None]] = {
    RequestReceived: H2ClientConnection._request,
    DataReceived: H2ClientConnection._data,
    StreamEnded: H2ClientConnection._ended,
    StreamReset: H2ClientConnection._stream_reset,
    WindowUpdated: H2ClientConnection._window,
    RemoteSettingsChanged: H2ClientConnection._settings,
    PingReceived: H2ClientConnection._control,
    PriorityUpdated: H2ClientConnection._control,
    UnknownFrameReceived: H2ClientConnection._control,
    ConnectionTerminated: H2ClientConnection._goaway,
}

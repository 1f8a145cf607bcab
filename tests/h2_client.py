"""An HTTP/2 test client (the ``h2`` library over asyncio TLS), with the
request API of :class:`tests.l7_backends.Client`, so that tests parametrized
over HTTP, HTTPS and HTTP/2 take either.

Many requests may be in flight at once on one connection (``request`` is a
coroutine per stream); request bodies are sent as the server's windows
allow, response bodies acknowledged as they arrive (or not: ``read_window``
False keeps the client's windows shut, to test the server's side of flow
control). ``send_raw`` writes frames as they are, for the abuse tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

from tests.l7_backends import HOST, Headers, Response

# HTTP/1.1 headers a client does not send over HTTP/2 (RFC 9113 §8.2.2).
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host"}


class StreamClosed(Exception):
    """The server reset the stream (``code``) or ended the connection."""

    def __init__(self, code: int) -> None:
        super().__init__(f"stream reset with error code {code}")
        self.code = code


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done: asyncio.Future[None] = loop.create_future()
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())  # a reset nobody awaits is no error


class H2Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_window: bool,
                 settings: dict[SettingCodes, int] | None) -> None:
        self.reader = reader
        self.writer = writer
        self.read_window = read_window
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)  # type: ignore[arg-type]
        self.streams: dict[int, _Stream] = {}
        self.held: set[int] = set()  # streams whose window is not given back (the connection's is)
        self.window_open = asyncio.Event()
        self.terminated: ConnectionTerminated | None = None
        self.closed = asyncio.get_running_loop().create_future()  # the server closed the connection
        self.received = 0  # bytes read from the server
        self._flush()
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext, server_hostname: str = "example.com",
                   read_window: bool = True, settings: dict[SettingCodes, int] | None = None) -> H2Client:
        """Connect with ``ctx`` (which must offer ALPN h2); fails unless h2 is chosen."""
        reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname=server_hostname,
                                                       limit=1 << 20)
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        assert alpn == "h2", alpn
        return cls(reader, writer, read_window, settings)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(Exception):
            self.conn.close_connection()
            self._flush()
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> H2Client:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    break
                self.received += len(data)
                for event in self.conn.receive_data(data):
                    self._event(event)
                self._flush()
        except (ConnectionError, ssl.SSLError, ProtocolError):  # h2 takes nothing after a GOAWAY
            pass
        finally:
            for stream in self.streams.values():
                if not stream.done.done():
                    stream.done.set_exception(StreamClosed(-1))
            if not self.closed.done():
                self.closed.set_result(None)

    def _event(self, event: Any) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, (ResponseReceived, TrailersReceived)) and stream is not None:
            stream.headers += event.headers
        elif isinstance(event, DataReceived):
            if stream is not None:
                stream.body.append(event.data)
            if event.stream_id in self.held:
                self.conn.increment_flow_control_window(event.flow_controlled_length)  # the connection's only
            elif self.read_window:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded) and stream is not None:
            if not stream.done.done():
                stream.done.set_result(None)
        elif isinstance(event, StreamReset) and stream is not None:
            if not stream.done.done():
                stream.done.set_exception(StreamClosed(event.error_code))
        elif isinstance(event, WindowUpdated):
            self.window_open.set()
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event

    # --- requests ------------------------------------------------------------------------

    def start(self, method: str = "GET", path: str = "/", headers: Headers | None = None,
              host: str = "example.com", end_stream: bool = True) -> int:
        """Send a request's HEADERS; its stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.streams[stream_id] = _Stream(asyncio.get_running_loop())
        given = [(name.lower(), value) for name, value in
                 (headers.items() if isinstance(headers, dict) else headers or ())]
        dropped = set(_HOP)
        for name, value in given:
            if name == "connection":  # what Connection names goes too, as a gateway does
                dropped.update(token.strip().lower() for token in value.split(","))
        fields = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", host.encode()),
                  (b":path", path.encode())]
        fields += [(n.encode(), v.encode("latin-1")) for n, v in given if n not in dropped]
        self.conn.send_headers(stream_id, fields, end_stream=end_stream)
        self._flush()
        return stream_id

    async def send_body(self, stream_id: int, body: bytes) -> None:
        """Send ``body`` as the windows allow, then END_STREAM."""
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            self._flush()
            await self.writer.drain()
        self.conn.end_stream(stream_id)
        self._flush()

    async def response_of(self, stream_id: int, timeout: float = 10.0) -> Response:
        stream = self.streams[stream_id]
        async with asyncio.timeout(timeout):
            await stream.done
        del self.streams[stream_id]
        status = 0
        headers = []
        for name, value in stream.headers:
            if name == b":status":
                status = int(value)
            else:
                headers.append((name, value))
        return Response(status, b"", headers, b"".join(stream.body), "2")

    async def request(self, method: str = "GET", path: str = "/", headers: Headers | None = None,
                      body: bytes = b"", host: str = "example.com") -> Response:
        headers = list(headers.items() if isinstance(headers, dict) else headers or ())
        if body and not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("content-length", str(len(body))))
        stream_id = self.start(method, path, headers, host, end_stream=not body)
        if body:
            await self.send_body(stream_id, body)
        return await self.response_of(stream_id)

"""Messages between the daemon and an L7 worker process, on the event loop.

A stream socketpair carries pickled tuples, each framed by a 4-byte length.
Both ends are :class:`Channel` protocols of their own loop: a message is
handed to ``on_message`` as soon as it is whole, and :meth:`Channel.send`
never blocks (the transport buffers what the peer has not read yet: a
stopped worker cannot stall the daemon). ``on_close`` runs once, when the
peer is gone (its process exited) or the channel was closed.

Both ends are ours, so unpickling what arrives is safe.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

HEADER = struct.Struct("!I")
MAX_MESSAGE = 256 * 1024 * 1024  # a routing table is far smaller; more means a broken stream


class ChannelClosed(ConnectionError):
    """The other end is gone."""


class Channel(asyncio.Protocol):
    def __init__(self, on_message: Callable[[Any], None], on_close: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_close: Callable[[], None] | None = on_close
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.closed = False

    def send(self, message: Any) -> None:
        if self.closed or self._transport is None:
            raise ChannelClosed("the channel is closed")
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._transport.write(HEADER.pack(len(payload)) + payload)

    def close(self) -> None:
        """At once: what is unsent is dropped (for a peer that is gone or going)."""
        if self._transport is not None:
            self._transport.abort()
        self._closed()

    async def flush_and_close(self, timeout: float = 1.0) -> None:
        """Close once what was sent has been written (for at most `timeout` s)."""
        if self._transport is None or self.closed:
            return
        self._transport.close()
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.closed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        self.close()

    def buffered(self) -> int:
        """Bytes sent but not yet taken by the peer's socket."""
        return 0 if self._transport is None else self._transport.get_write_buffer_size()

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            if size > MAX_MESSAGE:
                self.close()
                return
            end = start + HEADER.size + size
            if len(buffer) < end:
                break
            message = pickle.loads(buffer[start + HEADER.size:end])
            start = end
            if self.closed:
                return
            self._on_message(message)
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    def _closed(self) -> None:
        self.closed = True
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


async def open_channel(sock: socket.socket, on_message: Callable[[Any], None],
                       on_close: Callable[[], None]) -> Channel:
    """A :class:`Channel` over ``sock`` (one end of a socketpair), on the running loop."""
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(lambda: Channel(on_message, on_close), sock=sock)
    return channel

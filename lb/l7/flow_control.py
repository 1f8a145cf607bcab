"""Backpressure: who may stop a transport from reading, and when it resumes.

A client connection stops reading for several independent reasons (its
upstream cannot take more body, a body is buffered waiting for an upstream,
too many pipelined requests are queued, an upgrade is pending). Each reason
is a bit; the transport is paused while any bit is set and resumed when the
last one clears, so one party's resume never undoes another's pause.
"""

from __future__ import annotations

import asyncio

# Reasons to stop reading a client connection.
UPSTREAM_FULL = 1  # the upstream transport's write buffer is over its high-water mark
BUFFERED = 2  # request body held for an upstream that is not ready yet
PIPELINE = 4  # too many parsed requests are waiting behind the current one
UPGRADING = 8  # an Upgrade request waits for the target's 101
WRITE_FULL = 16  # our own write buffer to the client is full: read no more requests


class ReadGate:
    """Pause a transport's reading while any reason holds."""

    __slots__ = ("_transport", "reasons")

    def __init__(self, transport: asyncio.ReadTransport) -> None:
        self._transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            transport = self._transport
            if not transport.is_closing():
                transport.pause_reading()
        self.reasons |= reason

    def release(self) -> None:
        """Drop every reason: read again (a connection that only drains now)."""
        if self.reasons:
            self.reasons = 0
            if not self._transport.is_closing():
                self._transport.resume_reading()

    def resume(self, reason: int) -> None:
        if self.reasons & reason:
            self.reasons &= ~reason
            if not self.reasons:
                transport = self._transport
                if not transport.is_closing():
                    transport.resume_reading()

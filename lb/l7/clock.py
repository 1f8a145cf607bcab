"""A coarse clock for idle timestamps.

Every data_received stamps its connection with "now"; reading an attribute
that the worker's sweep updates a few times a second costs less than a call
to ``loop.time()``, and idle timeouts are measured in seconds anyway. Exact
durations (access log, latency histogram) still use ``loop.time()``.
"""

from __future__ import annotations


class Clock:
    __slots__ = ("now",)

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

"""Per-worker request counters and the access log line.

Kept tiny on purpose: one dict increment and one bisect per request. The
metrics exporter reads :meth:`WorkerStats.snapshot` (plain, picklable data)
from each worker and sums them.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from typing import Any

# Upper bounds of the upstream latency histogram, seconds (Prometheus style:
# a last, implicit +Inf bucket).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

access_logger = logging.getLogger("lb.access")


class WorkerStats:
    """Requests by (listener, rule, target, status); upstream latency histogram."""

    __slots__ = ("requests", "latency_counts", "latency_sum", "connections")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int | None, str, int], int] = {}
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.connections = 0  # client connections open now

    def record(self, listener: str, rule: int | None, target: str, status: int, upstream: float) -> None:
        key = (listener, rule, target, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if upstream >= 0.0:
            self.latency_counts[bisect_left(LATENCY_BUCKETS, upstream)] += 1
            self.latency_sum += upstream

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": [(*key, count) for key, count in self.requests.items()],
            "upstream_latency": {
                "buckets": LATENCY_BUCKETS,
                "counts": list(self.latency_counts),  # per bucket, not cumulative; last is +Inf
                "sum": self.latency_sum,
            },
            "connections": self.connections,
        }


class _IsoClock:
    """ISO 8601 UTC timestamps with milliseconds; the seconds part cached."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"


_iso = _IsoClock()


def log_access(
    client: str,
    listener: str,
    rule: int | None,
    target: str,
    status: int,
    request_bytes: int,
    response_bytes: int,
    total: float,
    upstream: float,
) -> None:
    """One "lb.access" line; the caller checks that INFO is enabled first.

    ``time client listener rule target status req_bytes resp_bytes total_ms upstream_ms``
    with ``default`` for the default rule, ``-`` for no target or no upstream time.
    """
    access_logger.info(
        "%s %s %s %s %s %d %d %d %.3f %s",
        _iso.now(),
        client,
        listener,
        "default" if rule is None else rule,
        target,
        status,
        request_bytes,
        response_bytes,
        total * 1000.0,
        "-" if upstream < 0.0 else "%.3f" % (upstream * 1000.0),
    )

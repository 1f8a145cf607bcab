"""Per-worker request counters.

Kept tiny on purpose: one dict increment per request, and one bisect for
those that reached a target. The metrics exporter reads
:meth:`WorkerStats.snapshot` (plain, picklable data) from each worker and
sums them. (The access log is :mod:`lb.l7.access_log`.)
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

# Upper bounds of the upstream latency histogram, seconds (Prometheus style:
# a last, implicit +Inf bucket).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SUM = len(LATENCY_BUCKETS) + 1  # a histogram's list: the count per bucket, then the sum

RequestKey = tuple[str, int | None, str, str, int, bool]  # listener, rule, group, target, status, by lb


class WorkerStats:
    """Requests by (listener, rule, group, target, status, whether lb made the
    status); the upstream latency histogram by (group, target)."""

    __slots__ = ("requests", "latency", "connections")

    def __init__(self) -> None:
        self.requests: dict[RequestKey, int] = {}
        # (group, target) → [count per bucket..., sum of the seconds]
        self.latency: dict[tuple[str, str], list[float]] = {}
        self.connections = 0  # client connections open now

    def record(self, listener: str, rule: int | None, group: str, target: str, status: int, by_lb: bool,
               upstream: float) -> None:
        """One exchange: ``by_lb`` when the status is lb's own (an answer lb made,
        or 460), not a target's; ``upstream`` is the time to the target's response
        head, negative for none."""
        key = (listener, rule, group, target, status, by_lb)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        if upstream >= 0.0:
            histogram = self.latency.get((group, target))
            if histogram is None:
                histogram = self.latency[(group, target)] = [0.0] * (_SUM + 1)
            histogram[bisect_left(LATENCY_BUCKETS, upstream)] += 1
            histogram[_SUM] += upstream

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": [(*key, count) for key, count in self.requests.items()],
            "upstream_latency": {
                "buckets": LATENCY_BUCKETS,
                # (group, target, counts per bucket (not cumulative; the last is +Inf), sum)
                "series": [(group, target, [int(c) for c in h[:_SUM]], h[_SUM])
                           for (group, target), h in self.latency.items()],
            },
            "connections": self.connections,
        }

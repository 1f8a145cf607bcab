"""The L7 proxy's Python per request, without sockets: µs per keep-alive GET.

Usage:
    .venv/bin/python tests/bench/l7_path.py [--requests 200000] [--rounds 5] [--profile]

One client connection and one pooled upstream connection of a worker that
is never started, on transports that drop what they are given: each request
is ``data_received`` of wrk's request on the client side, then of nginx's
response (5 header fields, a 43-byte body) on the upstream side, through
everything `lb up` runs for it (parsing, routing, the forwarded head, the
relayed response, the counters) but the system calls and uvloop. With the
access log off, then on (text, to a file in /dev/shm, or the temporary
directory), interleaved, ``--rounds`` times; the table shows the best round
of each (the least disturbed by the rest of the machine). Time is the
process's CPU time (``time.process_time``), not the wall clock: on a shared
machine the time another process holds the CPU does not count. ``--profile`` runs
cProfile over one more round of each instead (its own overhead inflates every
figure).

What `tests/bench/l7_proxy.py` measures end to end is this plus the kernel's
loopback TCP and uvloop; this one isolates the part a change to lb/l7 moves.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ipaddress
import os
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any

from lb import model as m
from lb.l7.client import ClientProtocol
from lb.l7.config import L7Config
from lb.l7.table import GroupTargets, RoutingTable
from lb.l7.upstream import UpstreamConnection
from lb.l7.worker import Worker

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"  # wrk's
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 02 Dec 2025 08:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 43\r\nConnection: keep-alive\r\n\r\n"
    b"hello from the backend, a small fixed body\n"
)  # the bench backend's (nginx)


class NullTransport(asyncio.Transport):
    """A connected stream that takes every write and keeps nothing."""

    def __init__(self, peer: tuple[str, int], local: tuple[str, int]) -> None:
        super().__init__()
        self._extra = {"peername": peer, "sockname": local}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def write(self, data: Any) -> None:
        pass

    def writelines(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def table(log: str | None) -> RoutingTable:
    listener = m.Listener("web", m.Protocol.HTTP, ipaddress.ip_address("127.0.0.1"), 8080,
                          m.ForwardAction((m.WeightedTargetGroup("g"),)))
    group = GroupTargets(m.TargetGroup("g", m.Protocol.HTTP, 80), (("10.0.0.1", 80, 1),))
    access_log = m.AccessLog(True, log) if log is not None else m.AccessLog()
    return RoutingTable((listener,), (group,), access_log=access_log)


def measure(requests: int, log: str | None, profile: bool = False) -> float:
    """µs per request."""
    loop = asyncio.new_event_loop()

    async def run() -> float:
        routes = table(log)
        worker = Worker(routes, L7Config(), loop, b"k" * 32)
        worker._set_access_log(routes.access_log)
        pool = worker.pools.get("10.0.0.1", 80)
        upstream = UpstreamConnection(pool)
        upstream.connection_made(NullTransport(("10.0.0.1", 80), ("10.0.0.2", 40000)))
        pool.connections += 1
        pool.idle.append(upstream)
        client = ClientProtocol(worker, "web")
        client.connection_made(NullTransport(("127.0.0.1", 50000), ("127.0.0.1", 8080)))
        request, response = client.data_received, upstream.data_received
        for _ in range(2000):  # warm up
            request(REQUEST)
            response(RESPONSE)
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        start = time.process_time()
        for _ in range(requests):
            request(REQUEST)
            response(RESPONSE)
        elapsed = time.process_time() - start
        if profiler is not None:
            profiler.disable()
            print(f"\naccess log {'on' if log else 'off'}:")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        assert worker.stats.requests, "no request went through"
        worker._set_access_log(m.AccessLog())
        return elapsed / requests * 1e6

    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    with tempfile.TemporaryDirectory(dir=directory, prefix="lb-path-") as tmp:
        log = str(Path(tmp) / "access.log")
        if args.profile:
            measure(args.requests // 4, None, profile=True)
            measure(args.requests // 4, log, profile=True)
            return
        print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        rounds: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            rounds["off"].append(measure(args.requests, None))
            rounds["on"].append(measure(args.requests, log))
        print(f"{args.requests:,} keep-alive GETs per round, best of {args.rounds} rounds:")
        for name, figures in rounds.items():
            spread = " / ".join(f"{f:.2f}" for f in figures)
            print(f"  access log {name:<3}  {min(figures):5.2f} µs per request   (rounds: {spread})")
        print(f"  the access log's cost: {min(rounds['on']) - min(rounds['off']):.2f} µs per request")


if __name__ == "__main__":
    main()

"""What HTTP/2's framing costs a request, without sockets: µs per GET, h2 against HTTP/1.1.

Usage:
    .venv/bin/python tests/bench/h2_path.py [--requests 100000] [--rounds 5] [--profile]

The same worker, routes and pooled upstream connections as
``tests/bench/l7_path.py`` (transports that drop what they are given, no
system call, no TLS), and two clients of it:

- HTTP/1.1: wrk's keep-alive GET, ``data_received`` on a ClientProtocol;
- HTTP/2: an H2ClientConnection fed h2load's pattern, 100 streams a read
  (each a HEADERS frame with END_STREAM, HPACK-encoded beforehand), then the
  100 responses from the upstream side and one loop iteration, in which the
  connection sends their HEADERS and DATA frames (h2's framing and HPACK).

Both answer nginx's response (5 header fields, a 43-byte body). The
difference of the two per-request figures is what h2 (the library and
lb.l7.h2client/h2stream around it) adds to a request, with the proxying
itself the same. The best round of each is shown. ``--profile`` prints
cProfile's top functions of one h2 round instead.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

from hpack import Encoder
from hyperframe.frame import HeadersFrame, SettingsFrame, WindowUpdateFrame

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lb.l7.client import ClientProtocol  # noqa: E402
from lb.l7.config import L7Config  # noqa: E402
from lb.l7.h2client import H2ClientConnection  # noqa: E402
from lb.l7.upstream import UpstreamConnection  # noqa: E402
from lb.l7.worker import Worker  # noqa: E402
from tests.bench.l7_path import REQUEST, RESPONSE, NullTransport, table  # noqa: E402

STREAMS = 100  # a read's worth of new streams (h2load -m100)
# The client's preface, and a connection window it never has to refill (h2load's is 1 GiB).
PREFACE = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize()
           + WindowUpdateFrame(0, window_increment=2**31 - 1 - 65535).serialize())


def h2_reads(requests: int) -> list[bytes]:
    """``requests`` GETs as HEADERS frames, STREAMS to a read, HPACK-encoded in order."""
    encoder = Encoder()
    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"127.0.0.1:8443"), (b":path", b"/"),
              (b"user-agent", b"h2load nghttp2/1.52.0")]
    reads = []
    for first in range(0, requests, STREAMS):
        frames = [HeadersFrame(1 + 2 * n, encoder.encode(fields), flags=["END_HEADERS", "END_STREAM"]).serialize()
                  for n in range(first, min(first + STREAMS, requests))]
        reads.append(b"".join(frames))
    return reads


def served(worker: Worker, status: int) -> int:
    """Requests the worker answered with ``status`` from a target."""
    return sum(n for key, n in worker.stats.requests.items() if key[4] == status and not key[5])


def setup(loop: asyncio.AbstractEventLoop) -> tuple[Worker, list[UpstreamConnection]]:
    worker = Worker(table(None), L7Config(), loop, b"k" * 32)
    pool = worker.pools.get("10.0.0.1", 80)
    upstreams = []
    for n in range(STREAMS):
        upstream = UpstreamConnection(pool)
        upstream.connection_made(NullTransport(("10.0.0.1", 80), ("10.0.0.2", 40000 + n)))
        upstream.poller = None  # NullTransport has no socket to poll
        pool.connections += 1
        pool.idle.append(upstream)
        upstreams.append(upstream)
    return worker, upstreams


def measure_h1(requests: int) -> float:
    loop = asyncio.new_event_loop()

    async def run() -> float:
        worker, upstreams = setup(loop)
        client = ClientProtocol(worker, "web", True)
        client.connection_made(NullTransport(("127.0.0.1", 50000), ("127.0.0.1", 8443)))
        request = client.data_received
        for _ in range(2000):  # warm up
            request(REQUEST)
            upstreams[-1].data_received(RESPONSE)
        start = time.perf_counter()
        for _ in range(requests):
            request(REQUEST)
            upstreams[-1].data_received(RESPONSE)  # LIFO: the warmest, taken and given back
        elapsed = time.perf_counter() - start
        assert served(worker, 200) >= requests
        return elapsed / requests * 1e6

    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def measure_h2(requests: int, profile: bool = False) -> float:
    loop = asyncio.new_event_loop()
    reads = h2_reads(requests + 2000)
    warm, timed = reads[: 2000 // STREAMS], reads[2000 // STREAMS :]

    async def run() -> float:
        worker, upstreams = setup(loop)
        conn = H2ClientConnection(worker, "web")
        conn.connection_made(NullTransport(("127.0.0.1", 50000), ("127.0.0.1", 8443)))
        conn.data_received(PREFACE)

        async def batch(data: bytes) -> None:
            conn.data_received(data)  # 100 streams, each forwarded on a pooled connection
            for upstream in upstreams:  # every one of them took a request (the pool is LIFO and full)
                if upstream.ex is not None:
                    upstream.data_received(RESPONSE)
            await asyncio.sleep(0)  # the iteration's end: the frames go out

        for data in warm:
            await batch(data)
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        for data in timed:
            await batch(data)
        elapsed = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        assert served(worker, 200) >= requests and not conn.streams, (worker.stats.requests, len(conn.streams))
        return elapsed / requests * 1e6

    try:
        return loop.run_until_complete(run())
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.profile:
        measure_h2(args.requests // 4, profile=True)
        return
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rounds: dict[str, list[float]] = {"HTTP/1.1": [], "HTTP/2": []}
    for _ in range(args.rounds):
        rounds["HTTP/1.1"].append(measure_h1(args.requests))
        rounds["HTTP/2"].append(measure_h2(args.requests))
    print(f"{args.requests:,} GETs per round, best of {args.rounds} rounds, no sockets, no TLS:")
    for name, figures in rounds.items():
        spread = " / ".join(f"{f:.2f}" for f in figures)
        print(f"  {name:<9} {min(figures):6.2f} µs per request   (rounds: {spread})")
    h1, h2 = min(rounds["HTTP/1.1"]), min(rounds["HTTP/2"])
    print(f"  HTTP/2's framing adds {h2 - h1:.2f} µs a request ({h2 / h1:.1f}× the HTTP/1.1 path)")


if __name__ == "__main__":
    main()

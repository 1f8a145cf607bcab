"""L7 proxy throughput and latency: lb against nginx and HAProxy, on loopback.

Usage:
    .venv/bin/python tests/bench/l7_proxy.py [--duration 10] [--workers 1 2] [--profile]
    .venv/bin/python tests/bench/l7_proxy.py --quick          # 3 s runs, 1 worker

Needs wrk, nginx and haproxy from Debian (``deploy/install.sh --bench``).
Starts, on 127.0.0.1 only and on free ports, in a temporary directory:
  - the backend: nginx (``--backend-workers``, default 1) answering every
    request with a fixed small body;
  - for each worker count: nginx as a reverse proxy (keep-alive upstream),
    HAProxy (as many threads), and lb's L7Server (as many worker processes),
    each adding X-Forwarded-For like lb does;
and runs ``wrk -t2 -c64 -d<duration>s --latency`` against the backend
directly and through each proxy, after a short warm-up. Prints requests/s,
p50 and p99 latency, and the ratios against nginx-as-proxy with the same
number of workers (the goal: lb ≥ 1.0× nginx requests/s, p99 ≤ 1.5×).
Access logs are off everywhere. Everything started is stopped in ``finally``.

``--profile`` then runs one lb worker under cProfile (in a child process)
while wrk loads it, and prints where the time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lb.l7.table import RoutingTable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
BODY = "hello from the backend, a small fixed body\n"


@dataclass
class Result:
    name: str
    workers: int | None
    rps: float
    p50_ms: float
    p99_ms: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {HOST}:{port}")


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def _field(pattern: str, out: str) -> str:
    """The first group of ``pattern`` in wrk's output."""
    match = re.search(pattern, out)
    if match is None:
        raise ValueError(f"no {pattern!r} in wrk's output:\n{out}")
    return match.group(1)


def wrk(port: int, duration: float, connections: int = 64, threads: int = 2) -> tuple[float, float, float]:
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", f"http://{HOST}:{port}/"],
        check=True,
        capture_output=True,
        text=True,
        timeout=duration + 30,
    ).stdout
    rps = float(_field(r"Requests/sec:\s+([\d.]+)", out))
    p50 = _ms(_field(r"\s50%\s+(\S+)", out))
    p99 = _ms(_field(r"\s99%\s+(\S+)", out))
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  wrk on :{port} reported errors:\n{out}", file=sys.stderr)
    return rps, p50, p99


# --- the contenders -----------------------------------------------------------


NGINX_COMMON = """
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log warn;
worker_processes {workers};
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/{name}-body;
    proxy_temp_path {dir}/{name}-proxy;
    fastcgi_temp_path {dir}/{name}-fastcgi;
    uwsgi_temp_path {dir}/{name}-uwsgi;
    scgi_temp_path {dir}/{name}-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    {body}
}}
"""

BACKEND_SERVER = """
    server {{
        listen {host}:{port} reuseport;
        location / {{ default_type text/plain; return 200 "{text}"; }}
    }}
"""

PROXY_SERVER = """
    upstream backend {{ server {host}:{backend}; keepalive 128; keepalive_requests 1000000; }}
    server {{
        listen {host}:{port} reuseport;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Port $server_port;
            proxy_buffering on;
        }}
    }}
"""

HAPROXY = """
global
    nbthread {workers}
    maxconn 5000
defaults
    mode http
    timeout connect 10s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend fe
    bind {host}:{port}
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Port %[dst_port]
    default_backend be
backend be
    server s1 {host}:{backend}
"""


class Stack(contextlib.ExitStack):
    def process(self, args: list[str], name: str, logdir: Path) -> subprocess.Popen[bytes]:
        log = self.enter_context(open(logdir / f"{name}.out", "wb"))  # noqa: SIM115 (closed by the stack)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def stop() -> None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

        self.callback(stop)
        return proc


def start_nginx(stack: Stack, tmp: Path, name: str, workers: int, body: str) -> None:
    conf = tmp / f"{name}.conf"
    conf.write_text(NGINX_COMMON.format(dir=tmp, name=name, workers=workers, body=body))
    stack.process(["nginx", "-p", str(tmp), "-c", str(conf)], name, tmp)


def start_haproxy(stack: Stack, tmp: Path, workers: int, port: int, backend: int) -> None:
    conf = tmp / "haproxy.cfg"
    conf.write_text(HAPROXY.format(workers=workers, host=HOST, port=port, backend=backend))
    stack.process(["haproxy", "-db", "-f", str(conf)], "haproxy", tmp)


def lb_table(port: int, backend: int) -> RoutingTable:
    from lb import model as m
    from lb.l7.table import GroupTargets, RoutingTable

    group = m.TargetGroup("backend", m.Protocol.HTTP, backend)
    listener = m.Listener(
        "bench", m.Protocol.HTTP, ipaddress.ip_address(HOST), port, m.ForwardAction((m.WeightedTargetGroup("backend"),))
    )
    return RoutingTable((listener,), (GroupTargets(group, ((HOST, backend, 1),)),), idle_timeout=60)


@contextlib.contextmanager
def start_lb(workers: int, port: int, backend: int) -> Iterator[None]:
    """lb's L7Server, supervising its workers from an event loop of its own thread."""
    import asyncio
    import threading

    from lb.l7.config import L7Config
    from lb.l7.server import L7Server

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = L7Server(L7Config(workers=workers))
    try:
        asyncio.run_coroutine_threadsafe(server.start(lb_table(port, backend)), loop).result(60)
        try:
            yield
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# --- profiling ----------------------------------------------------------------


def profiled_worker(port: int, backend: int, out: str) -> None:
    """Child process: one lb worker in this process, under cProfile, until SIGTERM."""
    import asyncio
    import cProfile

    import uvloop

    from lb.l7.server import serve

    async def main() -> None:
        worker = await serve(lb_table(port, backend))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await worker.stop(0.5)

    profiler = cProfile.Profile()
    profiler.enable()
    uvloop.run(main())
    profiler.disable()
    profiler.dump_stats(out)


def profile(tmp: Path, backend: int, duration: float) -> None:
    import pstats

    port = free_port()
    out = tmp / "lb.prof"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--profiled-worker", str(port), str(backend), str(out)],
        start_new_session=True,
    )
    try:
        wait_port(port)
        rps, _, _ = wrk(port, duration)
        print(f"\nlb, 1 worker under cProfile: {rps:,.0f} req/s (profiling slows it down)")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(25)


# --- main -----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk before each measured run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="proxy worker counts (default 1 2)")
    parser.add_argument("--backend-workers", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=["direct", "nginx", "haproxy", "lb"], help="run only these")
    parser.add_argument("--profile", action="store_true", help="also profile one lb worker with cProfile")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 worker, 1 s warm-up")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of every contender, interleaved; the table shows medians"
    )
    parser.add_argument("--profiled-worker", nargs=3, metavar=("PORT", "BACKEND", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profiled_worker:
        port, backend, out = args.profiled_worker
        profiled_worker(int(port), int(backend), out)
        return
    if args.quick:
        args.duration, args.workers, args.warmup = 3.0, [1], 1.0
    missing = [tool for tool in ("wrk", "nginx", "haproxy") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run deploy/install.sh --bench")
    wanted = set(args.only or ["direct", "nginx", "haproxy", "lb"])

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as tmpdir, Stack() as stack:
        tmp = Path(tmpdir)
        backend = free_port()
        start_nginx(
            stack,
            tmp,
            "backend",
            args.backend_workers,
            BACKEND_SERVER.format(host=HOST, port=backend, text=BODY.strip()),
        )
        wait_port(backend)

        def measure(name: str, workers: int | None, port: int) -> None:
            wait_port(port)
            if args.warmup:
                wrk(port, args.warmup)
            rps, p50, p99 = wrk(port, args.duration)
            results.append(Result(name, workers, rps, p50, p99))
            print(
                f"  {name:<14} workers={workers or '-'}  {rps:>10,.0f} req/s  p50 {p50:7.3f} ms  p99 {p99:7.3f} ms",
                flush=True,
            )

        print(
            f"wrk -t2 -c64 -d{args.duration:g}s --latency, backend nginx ({args.backend_workers} worker) on {HOST}, "
            f"{args.repeat} round(s), contenders interleaved"
        )
        for round_ in range(args.repeat):
            if args.repeat > 1:
                print(f"round {round_ + 1}/{args.repeat}")
            if "direct" in wanted:
                measure("direct", None, backend)
            for workers in args.workers:
                if "nginx" in wanted:
                    with Stack() as inner:
                        port = free_port()
                        conf = PROXY_SERVER.format(host=HOST, port=port, backend=backend)
                        start_nginx(inner, tmp, f"proxy{workers}", workers, conf)
                        measure("nginx proxy", workers, port)
                if "haproxy" in wanted:
                    with Stack() as inner:
                        port = free_port()
                        start_haproxy(inner, tmp, workers, port, backend)
                        measure("haproxy", workers, port)
                if "lb" in wanted:
                    port = free_port()
                    with start_lb(workers, port, backend):
                        measure("lb", workers, port)
        if args.profile:
            profile(tmp, backend, args.duration)

    print_table(results)


def median_of(results: list[Result]) -> list[Result]:
    """One row per (name, workers): the median of each figure over the rounds."""
    groups: dict[tuple[str, int | None], list[Result]] = {}
    for r in results:
        groups.setdefault((r.name, r.workers), []).append(r)
    return [
        Result(
            name,
            workers,
            statistics.median(r.rps for r in rows),
            statistics.median(r.p50_ms for r in rows),
            statistics.median(r.p99_ms for r in rows),
        )
        for (name, workers), rows in groups.items()
    ]


def print_table(results: list[Result]) -> None:
    rounds = {
        key: [r.rps for r in results if (r.name, r.workers) == key] for key in {(r.name, r.workers) for r in results}
    }
    rows = median_of(results)
    nginx = {r.workers: r for r in rows if r.name == "nginx proxy"}
    print("\n| target | workers | req/s | p50 ms | p99 ms | req/s vs nginx | p99 vs nginx | req/s per round |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = nginx.get(r.workers)
        ratio = f"{r.rps / ref.rps:.2f}x" if ref else "-"
        p99 = f"{r.p99_ms / ref.p99_ms:.2f}x" if ref else "-"
        spread = " / ".join(f"{x / 1000:.1f}k" for x in rounds[(r.name, r.workers)])
        print(
            f"| {r.name} | {r.workers or '-'} | {r.rps:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | {ratio} | {p99} | {spread} |"
        )
    for r in rows:
        if r.name != "lb" or r.workers not in nginx:
            continue
        ref = nginx[r.workers]
        met = r.rps >= ref.rps and r.p99_ms <= 1.5 * ref.p99_ms
        print(
            f"goal (workers={r.workers}): lb {r.rps / ref.rps:.2f}x nginx req/s, p99 {r.p99_ms / ref.p99_ms:.2f}x "
            f"→ {'met' if met else 'not met'}"
        )


if __name__ == "__main__":
    main()

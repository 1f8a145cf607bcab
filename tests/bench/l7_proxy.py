"""L7 proxy throughput and latency: `lb up` as users run it, against nginx, on loopback.

Usage (as root: `lb up` needs it):
    .venv/bin/python tests/bench/l7_proxy.py [--duration 10] [--workers 1 2] [--repeat 3] [--profile]
                                             [--compare-pure]
    .venv/bin/python tests/bench/l7_proxy.py --quick          # 3 s runs, 1 worker, 1 round

Needs wrk, nginx and haproxy from Debian and py-spy in the venv
(``deploy/install.sh --bench``). Starts, on 127.0.0.1 only, on free ports,
in a temporary directory:

  - the backend: nginx (``--backend-workers``, default 1) answering every
    request with a fixed small body, its access log off;
  - for each worker count, as contenders, all proxying to that backend:
    - ``lb log``: ``python -m lb up -c FILE`` with a config whose one HTTP
      listener is on 127.0.0.1 and whose target group is the backend
      (``workers = N``; no TCP/UDP listener, so no XDP), its access log on:
      ``access_log = { enabled = true, path = <a file>, format = "text" }``
      (ALB's fields, buffered by each worker, written every 64 KiB or half
      second);
    - ``lb``: the same with its access log off (the default);
    - ``nginx log``: nginx as a reverse proxy (keep-alive upstream, N
      worker processes, X-Forwarded-* set like lb does), ``access_log`` to a
      file (the default "combined" format, unbuffered);
    - ``nginx``: the same with ``access_log off``;
    - ``lb pure``, ``lb log pure`` (with ``--compare-pure``): the same two
      with ``LB_PURE_PYTHON=1``, their L7 modules in plain Python rather than
      the mypyc build deploy/install.sh makes (lb.l7.native); a table then
      compares the two;
    - ``haproxy`` (only with ``--only``): N threads, no log.

Every contender runs for the whole benchmark; each round measures every one
with ``wrk -t2 -c64 -d<duration>s --latency`` after a short warm-up, the
order rotated from round to round, so that a burst of load from elsewhere on
a shared machine hits them alike. The table shows the median of the rounds
and the ratios of lb to nginx with the same worker count, req/s and p99:
lb's log on against nginx's log on, lb's log off against nginx's log off
(the goals: at least 1.0x the requests/s, at most 1.5x the p99). Each run
also reads the CPU time (user + system, /proc) of the contender's processes
(its session: lb's daemon and workers, nginx's master and workers) before and
after, and divides by the requests: "CPU µs/req", and its ratio lb/nginx, a
figure that the rest of a shared machine's load moves far less than
requests/s (the backend's and wrk's CPU are not in it). The load
average is printed before and after. Everything started is stopped in ``finally``
(``lb down`` then removes lb's state file).

``--profile`` then samples the 1-worker lb with its log on (its daemon and
worker processes) with py-spy while wrk loads it, and prints the functions
where the workers spend their time (own samples, and with their callees);
``--profile-native`` adds the C frames (uvloop, httptools, the kernel calls).
With the mypyc build in use (lb.l7.native) the L7 modules are C: only
``--profile-native`` sees them (as ``CPyDef_<module>___<Class>___<method>``);
run with ``LB_PURE_PYTHON=1`` to profile them as Python.
"""

from __future__ import annotations

import argparse
import contextlib
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
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
BODY = "hello from the backend, a small fixed body\n"
PY_SPY = Path(sys.executable).with_name("py-spy")


@dataclass
class Result:
    name: str
    workers: int | None
    rps: float
    p50_ms: float
    p99_ms: float
    round: int = 0
    cpu_us: float = 0.0  # CPU time of the contender's processes per request (0: not measured)
    sys_us: float = 0.0  # the part of it in the kernel


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


def wait_ok(port: int, timeout: float = 30.0) -> None:
    """Until GET / answers 200 (lb: its target has passed its first health check)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=2) as response:
                if response.status == 200:
                    return
                last = response.status
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{HOST}:{port} does not answer 200: {last}")


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


def wrk(port: int, duration: float, connections: int = 64, threads: int = 2) -> tuple[float, float, float, int]:
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
    requests = int(_field(r"(\d+) requests in", out))
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  wrk on :{port} reported errors:\n{out}", file=sys.stderr)
    return rps, p50, p99, requests


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(session: int) -> tuple[float, float]:
    """User + system and system CPU time of the live processes of a session (a contender's
    master, workers and helpers: each contender is started in a session of its own)."""
    ticks = system = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == session:  # after the name: state, ppid, pgrp, session, ..., utime, stime
            ticks += int(fields[11]) + int(fields[12])
            system += int(fields[12])
    return ticks / _TICK, system / _TICK


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


# --- the contenders -----------------------------------------------------------


NGINX_COMMON = """
daemon off;
pid {dir}/{name}.pid;
error_log {dir}/{name}-error.log warn;
worker_processes {workers};
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log {access_log};
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

# `lb up`'s config: one HTTP listener on loopback, the backend as its one
# target. Health checks at ELB's defaults (every 30 s).
LB_CONFIG = """
[load_balancer]
name = "{name}"
workers = {workers}
admin_socket = "/run/lb/{name}.sock"
metrics_address = "{host}:{metrics}"
access_log = {{ enabled = {log}, path = "{log_path}", format = "text" }}

[[listeners]]
name = "http"
protocol = "HTTP"
address = "{host}"
port = {port}
default_action = {{ type = "forward", target_group = "backend" }}

[[target_groups]]
name = "backend"
protocol = "HTTP"
port = {backend}
targets = [{{ id = "{host}" }}]
"""


class Stack(contextlib.ExitStack):
    def process(
        self, args: list[str], name: str, logdir: Path, stop_timeout: float = 5.0, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.enter_context(open(logdir / f"{name}.out", "wb"))  # noqa: SIM115 (closed by the stack)
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                                env=env)

        def stop() -> None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(stop_timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

        self.callback(stop)
        return proc


def start_nginx(stack: Stack, tmp: Path, name: str, workers: int, body: str, access_log: str = "off") -> int:
    """Returns the master's pid (its session's id)."""
    conf = tmp / f"{name}.conf"
    conf.write_text(NGINX_COMMON.format(dir=tmp, name=name, workers=workers, body=body, access_log=access_log))
    return stack.process(["nginx", "-p", str(tmp), "-c", str(conf)], name, tmp).pid


def start_haproxy(stack: Stack, tmp: Path, workers: int, port: int, backend: int) -> int:
    conf = tmp / f"haproxy{workers}.cfg"
    conf.write_text(HAPROXY.format(workers=workers, host=HOST, port=port, backend=backend))
    return stack.process(["haproxy", "-db", "-f", str(conf)], f"haproxy{workers}", tmp)


def start_lb(stack: Stack, tmp: Path, workers: int, port: int, backend: int, log: bool, pure: bool = False) -> int:
    """`python -m lb up -c FILE`, its access log (if ``log``) to lb-<N>w-access.log,
    its stderr to lb[log]-<N>w.out; returns its pid. ``pure``: with LB_PURE_PYTHON=1,
    so without the modules mypyc compiled (lb.l7.native)."""
    tag = f"{'log' if log else 'nolog'}-{workers}w{'-pure' if pure else ''}"
    name = f"l7b-{tag}-{os.getpid()}"
    conf = tmp / f"{name}.toml"
    conf.write_text(
        LB_CONFIG.format(name=name, workers=workers, host=HOST, port=port, backend=backend, metrics=free_port(),
                         log="true" if log else "false", log_path=tmp / f"lb-{tag}-access.log")
    )
    # lb down after lb up has stopped (callbacks run last in, first out): its state file goes.
    stack.callback(
        subprocess.run,
        [sys.executable, "-m", "lb", "down", "-c", str(conf)],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    # SIGTERM: the workers finish in-flight requests (wrk has gone: none).
    env = {**os.environ, "LB_PURE_PYTHON": "1"} if pure else None
    proc = stack.process([sys.executable, "-m", "lb", "up", "-c", str(conf)], f"lb-{tag}", tmp, 40.0, env)
    return proc.pid


# --- profiling ----------------------------------------------------------------


def profile(pid: int, port: int, duration: float, tmp: Path, native: bool = False) -> None:
    """py-spy on `lb up` (pid) and its workers while wrk loads it; top functions of the workers."""
    out = tmp / "lb-profile.txt"
    spy = subprocess.Popen(
        [str(PY_SPY), "record", "--pid", str(pid), "--subprocesses", "--duration", f"{duration:g}",
         "--rate", "250", "--function", "--format", "raw", "--output", str(out),
         *(["--native"] if native else ["--nonblocking"])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    time.sleep(0.5)
    rps, _, _, _ = wrk(port, duration)
    _, err = spy.communicate(timeout=duration + 30)
    how = "native frames too" if native else "non-blocking"
    print(f"\nlb up, 1 worker, access log on, under py-spy (250 Hz, {how}): {rps:,.0f} req/s")
    if not out.exists():
        print(f"py-spy wrote nothing:\n{err}")
        return
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if "spawn_main" not in stack or not frames:  # the daemon's own process: not the workers
            continue
        count = int(count_text)
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    print(f"{total} samples in the worker processes (py-spy sees Python frames: time in C counts for its caller;")
    print("the event loop's own, Runner.run, is mostly uvloop's I/O)")
    print("\nown samples (the function itself):")
    for frame, count in own.most_common(25):
        print(f"  {100 * count / total:5.1f}%  {frame}")
    print("\nwith callees (frames of the event loop and the process start left out):")
    shown = 0
    for frame, count in inclusive.most_common():
        if any(skip in frame for skip in ("spawn", "process.py", "runners.py", "uvloop/__init__", "<module>",
                                          "_worker_main")):  # fmt: skip
            continue
        print(f"  {100 * count / total:5.1f}%  {frame}")
        shown += 1
        if shown == 25:
            break


# --- main -----------------------------------------------------------------------

CONTENDERS = ("direct", "nginx", "nginx log", "lb", "lb log", "lb pure", "lb log pure", "haproxy")
OPTIONAL = {"haproxy", "lb pure", "lb log pure"}  # only with --only (or --compare-pure)


@contextlib.contextmanager
def contenders(
    tmp: Path, backend: int, workers: list[int], wanted: set[str]
) -> Iterator[tuple[dict[tuple[str, int], int], dict[int, int], dict[tuple[str, int], int]]]:
    """Start every contender for every worker count; yields {(name, workers): port},
    {workers: the pid of `lb up` with its log on}, {(name, workers): its session}."""
    with Stack() as stack:
        ports: dict[tuple[str, int], int] = {}
        lb_pids: dict[int, int] = {}
        sessions: dict[tuple[str, int], int] = {}
        for n in workers:
            if "nginx" in wanted:
                ports["nginx", n] = free_port()
                body = PROXY_SERVER.format(host=HOST, port=ports["nginx", n], backend=backend)
                sessions["nginx", n] = start_nginx(stack, tmp, f"proxy{n}", n, body)
            if "nginx log" in wanted:
                ports["nginx log", n] = free_port()
                body = PROXY_SERVER.format(host=HOST, port=ports["nginx log", n], backend=backend)
                sessions["nginx log", n] = start_nginx(stack, tmp, f"proxylog{n}", n, body,
                                                       access_log=f"{tmp}/proxylog{n}-access.log")
            if "haproxy" in wanted:
                ports["haproxy", n] = free_port()
                sessions["haproxy", n] = start_haproxy(stack, tmp, n, ports["haproxy", n], backend)
            if "lb" in wanted:
                ports["lb", n] = free_port()
                sessions["lb", n] = start_lb(stack, tmp, n, ports["lb", n], backend, log=False)
            if "lb log" in wanted:
                ports["lb log", n] = free_port()
                lb_pids[n] = sessions["lb log", n] = start_lb(stack, tmp, n, ports["lb log", n], backend, log=True)
            for name, log in (("lb pure", False), ("lb log pure", True)):
                if name in wanted:
                    ports[name, n] = free_port()
                    sessions[name, n] = start_lb(stack, tmp, n, ports[name, n], backend, log=log, pure=True)
        for port in ports.values():
            wait_port(port, 30.0)
            wait_ok(port)
        yield ports, lb_pids, sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk before each measured run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="proxy worker counts (default 1 2)")
    parser.add_argument("--backend-workers", type=int, default=1)
    parser.add_argument(
        "--only", nargs="+", choices=CONTENDERS, help="run only these (default: all but haproxy)"
    )
    parser.add_argument("--compare-pure", action="store_true",
                        help="also lb with LB_PURE_PYTHON=1 (its L7 modules not compiled), log on and off")
    parser.add_argument("--profile", action="store_true", help="also profile the 1-worker lb (log on) with py-spy")
    parser.add_argument("--profile-native", action="store_true", help="the same, with C frames (py-spy --native)")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 worker, 1 s warm-up, 1 round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, contenders interleaved; the table shows medians")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.workers, args.warmup, args.repeat = 3.0, [1], 1.0, 1
    missing = [tool for tool in ("wrk", "nginx", "haproxy") if shutil.which(tool) is None]
    args.profile = args.profile or args.profile_native
    if args.profile and not PY_SPY.exists():
        missing.append("py-spy")
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run deploy/install.sh --bench")
    wanted = set(args.only or [c for c in CONTENDERS if c not in OPTIONAL])
    if args.compare_pure:
        wanted |= {"lb pure", "lb log pure"}
    if args.profile:
        wanted.add("lb log")
        if 1 not in args.workers:
            args.workers.append(1)
    if wanted & {"lb", "lb log", "lb pure", "lb log pure"} and os.geteuid() != 0:
        sys.exit("lb up needs root: run this as root (or --only nginx 'nginx log' haproxy direct)")

    results: list[Result] = []
    print(f"load average at the start: {load()}")
    compiled = subprocess.run([sys.executable, "-c", "import lb.l7; print(lb.l7.NOT_COMPILED or 'yes')"],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "LB_PURE_PYTHON": ""})
    print(f"lb's L7 hot path compiled by mypyc (lb.l7.native): {compiled.stdout.strip() or compiled.stderr}")
    with tempfile.TemporaryDirectory(prefix="lb-bench-") as tmpdir, Stack() as stack:
        tmp = Path(tmpdir)
        backend = free_port()
        body = BACKEND_SERVER.format(host=HOST, port=backend, text=BODY.strip())
        backend_session = start_nginx(stack, tmp, "backend", args.backend_workers, body)
        wait_port(backend)

        def measure(name: str, workers: int | None, port: int, round_: int) -> None:
            if args.warmup:
                wrk(port, args.warmup)
            session = sessions.get((name, workers or 0), backend_session)
            cpu, system = cpu_seconds(session)
            rps, p50, p99, requests = wrk(port, args.duration)
            cpu_after, system_after = cpu_seconds(session)
            cpu_us, sys_us = (cpu_after - cpu) / requests * 1e6, (system_after - system) / requests * 1e6
            results.append(Result(name, workers, rps, p50, p99, round_, cpu_us, sys_us))
            print(
                f"  {name:<11} workers={workers or '-'}  {rps:>10,.0f} req/s  p50 {p50:7.3f} ms  p99 {p99:7.3f} ms"
                f"  CPU {cpu_us:5.1f} µs/req ({sys_us:4.1f} in the kernel)",
                flush=True,
            )

        print(
            f"wrk -t2 -c64 -d{args.duration:g}s --latency, backend nginx ({args.backend_workers} worker) on {HOST}, "
            f"{args.repeat} round(s), contenders interleaved"
        )
        with contenders(tmp, backend, args.workers, wanted) as (ports, lb_pids, sessions):
            runs = [(name, n, port) for (name, n), port in ports.items()]
            if "direct" in wanted:
                runs.insert(0, ("direct", 0, backend))
            for round_ in range(args.repeat):
                print(f"round {round_ + 1}/{args.repeat} (load {load()})")
                shift = round_ % len(runs)
                for name, n, port in runs[shift:] + runs[:shift]:
                    measure(name, n or None, port, round_)
            if args.profile:
                profile(lb_pids[1], ports["lb log", 1], args.duration, tmp, args.profile_native)
        for path in sorted(tmp.glob("*access.log")) + sorted(tmp.glob("lb-*.out")):
            print(f"log {path.name}: {path.stat().st_size / 1e6:,.1f} MB")
    print(f"load average at the end: {load()}")
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
            cpu_us=statistics.median(r.cpu_us for r in rows),
            sys_us=statistics.median(r.sys_us for r in rows),
        )
        for (name, workers), rows in sorted(groups.items(), key=lambda item: (item[0][1] or 0, item[0][0]))
    ]


def print_table(results: list[Result]) -> None:
    rounds = {
        key: [r.rps for r in results if (r.name, r.workers) == key] for key in {(r.name, r.workers) for r in results}
    }
    rows = median_of(results)
    ref = {(r.name, r.workers): r for r in rows}
    print("\n| target | workers | req/s | p50 ms | p99 ms | CPU µs/req (kernel) | req/s per round |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        spread = " / ".join(f"{x / 1000:.1f}k" for x in rounds[(r.name, r.workers)])
        print(f"| {r.name} | {r.workers or '-'} | {r.rps:,.0f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} | {r.cpu_us:.1f} ({r.sys_us:.1f}) "
              f"| {spread} |")
    by_round = {(r.name, r.workers, r.round): r for r in results}

    def paired(r: Result, other: str, figure: str) -> str:
        """The median over rounds of lb's figure over nginx's in the same round (neighbouring runs)."""
        ratios = [
            getattr(mine, figure) / getattr(theirs, figure)
            for (name, workers, round_), mine in by_round.items()
            if name == r.name and workers == r.workers
            for theirs in [by_round.get((other, workers, round_))]
            if theirs is not None
        ]
        return f"{statistics.median(ratios):.2f}x" if ratios else "-"

    print("\nlb up against nginx with the same worker count, access logs on against on, off against off")
    print("(goals: req/s >= 1.0x, p99 <= 1.5x): ratio of the medians, and (in brackets) the median of each")
    print("round's ratio; CPU: the CPU time of lb's processes per request over nginx's (a figure that")
    print("the rest of a shared machine's load disturbs less than requests/s)")
    print("| workers | lb | against | lb/nginx req/s | lb/nginx p99 | lb/nginx CPU per request |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        other, label = {"lb log": ("nginx log", "nginx, access_log to a file"),
                        "lb log pure": ("nginx log", "nginx, access_log to a file"),
                        "lb pure": ("nginx", "nginx, access_log off"),
                        "lb": ("nginx", "nginx, access_log off")}.get(r.name, ("", ""))
        nginx = ref.get((other, r.workers))
        if nginx is not None:
            print(
                f"| {r.workers} | {'log on' if 'log' in r.name else 'log off'}{' pure' if 'pure' in r.name else ''} "
                f"| {label} "
                f"| {r.rps / nginx.rps:.2f}x ({paired(r, other, 'rps')}) "
                f"| {r.p99_ms / nginx.p99_ms:.2f}x ({paired(r, other, 'p99_ms')}) "
                f"| {r.cpu_us / nginx.cpu_us:.2f}x ({paired(r, other, 'cpu_us')}) |"
            )
    pure = [(r, ref[(r.name + " pure", r.workers)]) for r in rows if (r.name + " pure", r.workers) in ref]
    if pure:
        print("\nlb with its L7 hot path compiled (mypyc) against the same in plain Python (LB_PURE_PYTHON=1)")
        print("| workers | lb | compiled/pure req/s | compiled/pure p99 | compiled/pure CPU per request |")
        print("|---|---|---|---|---|")
        for r, p in pure:
            print(f"| {r.workers} | {'log on' if r.name == 'lb log' else 'log off'} "
                  f"| {r.rps / p.rps:.2f}x ({paired(r, p.name, 'rps')}) "
                  f"| {r.p99_ms / p.p99_ms:.2f}x ({paired(r, p.name, 'p99_ms')}) "
                  f"| {r.cpu_us / p.cpu_us:.2f}x ({paired(r, p.name, 'cpu_us')}) |")


if __name__ == "__main__":
    main()

"""HTTPS listeners: `lb up` against nginx, the same certificate and worker count, on loopback.

Usage (as root: `lb up` needs it):
    .venv/bin/python tests/bench/https.py [--duration 10] [--workers 1 2] [--rounds 3]
    .venv/bin/python tests/bench/https.py --quick          # 3 s runs, 1 worker, 1 round

Needs wrk, nginx and h2load from Debian (``deploy/install.sh --bench``).
Starts, on 127.0.0.1 only and on free ports, in a temporary directory:
  - the backend: nginx over plain HTTP answering a small fixed body;
  - for each worker count, alternated for ``--rounds``: nginx terminating TLS
    as a reverse proxy (keep-alive upstream, the forwarded headers lb adds),
    and ``python -m lb up -c FILE`` with a config as a user writes it (one
    HTTPS listener, the certificate's files, the backend as its target),
    both with one ECDSA P-256 certificate made here and ELB's default
    policy's versions and ciphers (TLS 1.2 and 1.3);
then measures, after a short warm-up:
  - new TLS handshakes/s: ``wrk -t2 -c64 -H 'Connection: close'``, so each
    request is a new connection and a full handshake (wrk keeps its session
    across reconnections and would resume it: nginx's session cache and
    tickets are off, and lb's resumption too, ``tls_session_resumption = false``);
  - keep-alive requests/s over TLS: ``wrk -t2 -c64``;
  - HTTP/2 requests/s: ``h2load -t2 -c4 -m100`` (4 connections of 100
    concurrent streams each, ALPN h2; Debian's nghttp2-client);
and, for each, the CPU time per request of the contender's processes (from
/proc, each contender in a session of its own) and of the client. Prints the
rates and their ratio lb / nginx (goals: handshakes ≥ 0.9×, keep-alive ≥
0.8×; h2 printed with its ratio), and the ratio per CPU-second (nginx's CPU
per request over lb's): on a small machine the client needs more CPU per
handshake than either server (wrk verifies the server's ECDSA signature and
makes its own key share, in OpenSSL 3 as well), so the handshake rate is
the client's and the machine's as much as the server's, while the CPU per
handshake is the server's own. Also what HTTP/2's framing costs a request:
the CPU of an h2 request less that of a keep-alive HTTP/1.1 one (both over
TLS). Everything started is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
BODY = "hello from the backend, a small fixed body\n"


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


def wrk(url: str, duration: float, close: bool) -> float:
    args = ["wrk", "-t2", "-c64", f"-d{duration:g}s"]
    if close:
        args += ["-H", "Connection: close"]
    out = subprocess.run([*args, url], check=True, capture_output=True, text=True, timeout=duration + 30).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"wrk printed no rate:\n{out}")
    if "Non-2xx" in out:
        print(f"  wrk on {url} reported non-2xx answers:\n{out}", file=sys.stderr)
    return float(found.group(1))


def h2load(url: str, duration: float, warmup: float) -> float:
    args = ["h2load", "-t2", "-c4", "-m100", f"-D{duration:g}", f"--warm-up-time={warmup:g}", url]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=duration + warmup + 30).stdout
    found = re.search(r"finished in [^,]+, ([\d.]+) req/s", out)
    failed = re.search(r"requests: .* (\d+) failed", out)
    if found is None:
        raise RuntimeError(f"h2load printed no rate:\n{out}")
    if failed is not None and int(failed.group(1)):
        print(f"  h2load on {url} reported failed requests:\n{out}", file=sys.stderr)
    if "h2" not in re.findall(r"Application protocol: (\S+)", out):
        raise RuntimeError(f"h2load did not speak h2 to {url}:\n{out}")
    return float(found.group(1))


def make_certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for localhost, for both contenders."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


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

TLS_PROXY_SERVER = """
    upstream backend {{ server {host}:{backend}; keepalive 128; keepalive_requests 1000000; }}
    server {{
        listen {host}:{port} ssl http2 reuseport;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_prefer_server_ciphers on;
        ssl_session_cache off;
        ssl_session_tickets off;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Port $server_port;
        }}
    }}
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


def start_nginx(stack: Stack, tmp: Path, name: str, workers: int, body: str) -> int:
    """Returns the master's pid (its session's id)."""
    conf = tmp / f"{name}.conf"
    conf.write_text(NGINX_COMMON.format(dir=tmp, name=name, workers=workers, body=body))
    return stack.process(["nginx", "-p", str(tmp), "-c", str(conf)], name, tmp).pid


# `lb up`'s config, as a user writes it: one HTTPS listener on loopback with
# the certificate's files, the backend its one target. Session tickets off
# (wrk would resume: full handshakes only, as nginx's are), access log off
# (nginx's too).
LB_CONFIG = """
[load_balancer]
name = "{name}"
workers = {workers}
admin_socket = "/run/lb/{name}.sock"
metrics_address = "{host}:{metrics}"
tls_session_resumption = false

[[listeners]]
name = "https"
protocol = "HTTPS"
address = "{host}"
port = {port}
default_certificate = {{ certificate = "{cert}", key = "{key}" }}
default_action = {{ type = "forward", target_group = "backend" }}

[[target_groups]]
name = "backend"
protocol = "HTTP"
port = {backend}
targets = [{{ id = "{host}" }}]
"""


def start_lb(stack: Stack, tmp: Path, workers: int, port: int, backend: int, cert: Path, key: Path) -> int:
    """`python -m lb up -c FILE` with one HTTPS listener; returns its pid (its session's id)."""
    name = f"lbhttps-{workers}w-{os.getpid()}"
    conf = tmp / f"{name}.toml"
    conf.write_text(LB_CONFIG.format(name=name, workers=workers, host=HOST, port=port, backend=backend,
                                     metrics=free_port(), cert=cert, key=key))
    # lb down after lb up has stopped (callbacks run last in, first out): its state file goes.
    stack.callback(subprocess.run, [sys.executable, "-m", "lb", "down", "-c", str(conf)], cwd=ROOT,
                   capture_output=True, check=False)
    return stack.process([sys.executable, "-m", "lb", "up", "-c", str(conf)], name, tmp).pid


def wait_https(port: int, timeout: float = 30.0) -> None:
    """Until the listener answers a request through to the backend (lb up binds, then health checks)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), 2) as raw, ctx.wrap_socket(raw) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no 200 over TLS from {HOST}:{port}")


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(session: int) -> float:
    """User + system CPU time of the live processes of a session (a contender's
    master and workers: each contender is started in a session of its own)."""
    ticks = 0
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
    return ticks / _TICK


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


FIGURES = ("handshakes/s", "keep-alive req/s", "h2 req/s")


# Per figure: the rate, the contender's CPU-µs per request (all its processes),
# and the client's CPU-µs per request (wrk's or h2load's).
Figure = tuple[float, float, float]


def measure(url: str, duration: float, warmup: float, session: int) -> dict[str, Figure]:
    figures = {}
    runs: list[tuple[str, Callable[[], float]]] = [
        ("handshakes/s", lambda: wrk(url, duration, True)),
        ("keep-alive req/s", lambda: wrk(url, duration, False)),
        ("h2 req/s", lambda: h2load(url, duration, warmup)),
    ]
    for kind, run in runs:
        if kind != "h2 req/s":  # h2load warms up by itself
            wrk(url, warmup, kind == "handshakes/s")
        server, client = cpu_seconds(session), os.times()
        rate = run()
        after = os.times()
        used = (after.children_user - client.children_user) + (after.children_system - client.children_system)
        # h2load's own warm-up is in its CPU time and not in its rate: counted as measured (an overestimate)
        requests = rate * duration
        figures[kind] = (rate, (cpu_seconds(session) - server) * 1e6 / requests, used * 1e6 / requests)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk before each measured run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per contender, alternated; medians shown")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 worker, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.workers, args.rounds = 3.0, 1.0, [1], 1
    for tool in ("wrk", "nginx", "h2load"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            sys.exit(f"{tool} not found: run deploy/install.sh --bench")
    if os.geteuid() != 0:
        sys.exit("lb up needs root: run this as root")
    from lb import tls

    ciphers = ":".join(tls.POLICIES["ELBSecurityPolicy-TLS13-1-2-2021-06"].ciphers)
    rows = []
    print(f"load before: {load()}")
    with tempfile.TemporaryDirectory(prefix="lb-bench-https-") as tmpdir, Stack() as stack:
        tmp = Path(tmpdir)
        cert, key = make_certificate(tmp)
        backend = free_port()
        start_nginx(stack, tmp, "backend", 1, BACKEND_SERVER.format(host=HOST, port=backend, text=BODY.strip()))
        wait_port(backend)
        for workers in args.workers:
            results: dict[str, list[dict[str, Figure]]] = {"nginx": [], "lb": []}
            for _ in range(args.rounds):
                with Stack() as contender:
                    port = free_port()
                    session = start_nginx(contender, tmp, f"nginx{workers}", workers, TLS_PROXY_SERVER.format(
                        host=HOST, port=port, backend=backend, cert=cert, key=key, ciphers=ciphers))
                    wait_port(port)
                    results["nginx"].append(measure(f"https://{HOST}:{port}/", args.duration, args.warmup, session))
                with Stack() as contender:
                    port = free_port()
                    session = start_lb(contender, tmp, workers, port, backend, cert, key)
                    wait_https(port)
                    results["lb"].append(measure(f"https://{HOST}:{port}/", args.duration, args.warmup, session))
            for kind in FIGURES:
                lb, nginx = ([statistics.median(r[kind][i] for r in results[name]) for i in range(3)]
                             for name in ("lb", "nginx"))
                runs = ", ".join(f"{r[kind][0]:,.0f}" for r in results["lb"])
                rows.append((kind, workers, lb, nginx, runs))
    print(f"load after: {load()}")
    print(f"\n{'figure':<17} {'workers':>7} {'lb':>8} {'nginx':>8} {'lb/nginx':>8}"
          f" {'lb µs':>7} {'nginx µs':>8} {'per CPU':>7} {'client µs':>9}   lb runs")
    for kind, workers, lb, nginx, runs in rows:
        print(f"{kind:<17} {workers:>7} {lb[0]:>8,.0f} {nginx[0]:>8,.0f} {lb[0] / nginx[0]:>7.2f}×"
              f" {lb[1]:>7.1f} {nginx[1]:>8.1f} {nginx[1] / lb[1]:>6.2f}× {lb[2]:>4.0f}/{nginx[2]:<4.0f}   {runs}")
    print("""
lb µs, nginx µs: CPU time per request of all the contender's processes (lb up's
  supervisor and workers; nginx's master and workers), medians of the rounds;
per CPU: nginx µs / lb µs, the ratio of requests per CPU-second, what the rate
  ratio would be if the contender, not the client or the machine, were the limit;
client µs: wrk's (h2load's) CPU per request against lb / against nginx. When
  client µs × rate nears the cores the contender does not use, the client is the
  bottleneck and the rate ratio says less than the per-CPU one.""")
    for workers in args.workers:
        h2 = next(r for r in rows if r[0] == "h2 req/s" and r[1] == workers)
        ka = next(r for r in rows if r[0] == "keep-alive req/s" and r[1] == workers)
        print(f"HTTP/2 framing, {workers} worker(s): an h2 request costs lb {h2[2][1] - ka[2][1]:+.1f} µs of CPU more"
              f" than a keep-alive HTTP/1.1 one (nginx {h2[3][1] - ka[3][1]:+.1f} µs), both over TLS")
    print("\ngoals: handshakes/s >= 0.9x nginx, keep-alive req/s >= 0.8x nginx (same certificate, same workers);"
          " h2 req/s: ratio printed")

if __name__ == "__main__":
    main()

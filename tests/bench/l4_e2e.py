"""TCP throughput and new connections per second through lb's XDP VIP and its rivals (not a pytest test).

Usage (root; the comparison tools come from `deploy/install.sh --bench`):
    .venv/bin/python tests/bench/l4_e2e.py
    .venv/bin/python tests/bench/l4_e2e.py --runs 3 --seconds 5 --only lb,nftables
    .venv/bin/python tests/bench/l4_e2e.py --family 6

The namespace lab (lb.lab.Lab with prefix "lbb", so it never meets the
tests' "lbt" or the demo's "lab"):

    lbb-client 10.0.0.2 ── to-client [VIP 10.0.0.100] lbb-lb ── to-backendN ── lbb-backendN 10.0.1.1N
               fd00::2               [VIP fd00::100]                               fd00:1::1N

Two TCP services on the VIP, the same in every setup:
    10.0.0.100:8080 -> backends 1..3 :80    HTTP (nginx, 2 workers each), new connections per second
    10.0.0.100:5201 -> backend1 :5201       iperf3, one stream (one backend only: iperf3's
                                            control and data connections must meet the same server)

--family 6 (or both, the default) measures every setup again over IPv6,
the same two services on [fd00::100] toward the backends' fd00:1::1N (nginx
and iperf3 listen on both families), each setup against the baseline of its
own family, measured in the same rounds.

The HTTP backends are nginx (`worker_processes 2`, access log off, a
`return 200` that names the backend in X-Backend), one per backend
namespace with its config, pid file and prefix in a temporary directory,
in place of the lab's Python servers (stopped for the run): with those the
backends took over half of both CPUs, so the connection rate measured
them rather than the balancers.

Setups, each measured with the same iperf3 and wrk parameters:
    lb          lb's XDP program, native mode, on every lb-side interface (as tests/l4_lab.py)
    lb-full-nat the same, both services in full NAT (targets see lb's 10.0.1.1 and a port it
                allocated; counters shared with "lb")
    nftables    no XDP; an nftables DNAT rule in the lb namespace (jhash of saddr . sport
                mod 3 over the backends; kernel conntrack does the reply path); IPv6: the
                same rule in a table of family ip6
    stateless   tests/bench/baseline_dnat.c in native mode: 5-tuple hash mod 3, stateless
                reverse NAT, no maps at all: the ceiling of an XDP DNAT; IPv6:
                tests/bench/baseline_dnat6.c, the same with -DREVERSE_NAT
    routing     nothing attached, the client talks to backend1 directly through the
                lb namespace's ordinary forwarding: a reference
    haproxy     HAProxy in TCP mode in the lb namespace (only if haproxy is installed)

Throughput: `iperf3 -c <host> -p 5201 -t S -A 0,1` (one stream; client pinned to
CPU 0 and server to CPU 1 so that every setup gets the same placement on this
2-CPU machine), receiver Gbit/s.
Connections: `wrk -c32 -t2 -dSs -H 'Connection: close'`, so every request is a
new TCP connection; non-2xx responses and socket errors are reported and must
be zero. wrk closes first, so its TIME_WAIT sockets would use up the client's
ephemeral ports after ~14k connections, and every later run would measure the
60 s TIME_WAIT expiry (~900 conn/s) whatever the setup: the client namespace
(and the lb one, for HAProxy's own connections) therefore runs with
net.ipv4.tcp_tw_reuse=1 and ip_local_port_range 1024-65535, as load
generators do.

Every measurement is repeated --runs times, rounds interleaving the setups,
and the median is shown. This machine is shared: before each measurement the
script waits (up to --quiet-wait s) for a second in which other processes
(other sessions' test suites) use under --quiet % of it, and every result
line shows the CPU split during the measurement, including what other
sessions used, so that noisy runs can be told apart.

Everything created here is removed in `finally`, also on Ctrl-C or SIGTERM:
the lab's namespaces and the processes in them (nginx, iperf3,
HAProxy), the nftables tables, the XDP attachments, the pinned maps under
/sys/fs/bpf/lb/lbb-e2e, the lab's logs under /run/lb-lab/lbb. Traffic only
flows between those namespaces.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lb import lab as labmod  # noqa: E402
from lb import netlink as nl  # noqa: E402
from lb.dataplane.dataplane import Dataplane, L4Service  # noqa: E402
from lb.dataplane.loader import Attachment, Program, bpf_source_dir, detach, purge_pins  # noqa: E402
from lb.dataplane.maps import Endpoint, Maps, VipAddr  # noqa: E402
from lb.dataplane.structs import Counter, Limits, ip6_to_net, ip_to_net, port_to_net  # noqa: E402
from lb.lab import Lab  # noqa: E402
from lb.model import XdpMode  # noqa: E402
from tests.names import name  # noqa: E402

# From LB_TEST_PREFIX (tests/names.py), so benchmarks of two sessions on one
# machine never share (or tear down) each other's namespaces: "lbb" unless set.
PREFIX = name("b") if "LB_TEST_PREFIX" in os.environ else "lbb"
NAME = f"{PREFIX}-e2e"  # pin directory /sys/fs/bpf/lb/<PREFIX>-e2e
LIMITS = Limits(ring_size=65537, max_vips=8, max_targets=64, conntrack_size=262144)
VIP = labmod.VIP
VIP6 = labmod.VIP6
HTTP_VIP_PORT = 8080
HTTP_PORT = labmod.HTTP_PORT  # what the backends' nginx listen on
NGINX_WORKERS = 2
IPERF_PORT = 5201
NFT_TABLE = f"{PREFIX.replace('-', '_')}_bench"
BASELINE_C = Path(__file__).resolve().parent / "baseline_dnat.c"
BASELINE6_C = Path(__file__).resolve().parent / "baseline_dnat6.c"
IPERF_AFFINITY = "0,1"  # client on CPU 0, server on CPU 1: the same placement for every setup
CLIENT_SYSCTLS = {"net.ipv4.tcp_tw_reuse": "1", "net.ipv4.ip_local_port_range": "1024 65535"}
GOAL_VS_NFT = 1.3
GOAL_VS_STATELESS = 0.95
FAMILIES = {"4": (4,), "6": (6,), "both": (4, 6)}


class BenchError(RuntimeError):
    pass


# --- running tools inside namespaces -------------------------------------------------

def ns_cmd(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def run(ns: str, *argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ns_cmd(ns, *argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def proc_net_address(address: str) -> str:
    """An address as /proc/net/tcp{,6} print it: each 32-bit word of the
    network-order bytes, read in host order, as %08X."""
    packed = ipaddress.ip_address(address).packed
    return "".join(f"{int.from_bytes(packed[i:i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4))


def url_host(host: str) -> str:
    """host as a URL or a Host header writes it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def listening(ns: str, address: str, port: int) -> bool:
    """Is a TCP socket listening on address:port (or on any address, IPv4 or
    dual-stack IPv6) in namespace ns?"""

    def read() -> bool:
        want = {f"{proc_net_address(address)}:{port:04X}", f"00000000:{port:04X}", f"{'0' * 32}:{port:04X}"}
        for table in ("tcp", "tcp6"):
            with open(f"/proc/thread-self/net/{table}") as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[1] in want and fields[3] == "0A":  # TCP_LISTEN
                        return True
        return False

    return nl.run_in_netns(ns, read)


def wait_listening(ns: str, address: str, port: int, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + 10
    while not listening(ns, address, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{what} did not start listening on {address}:{port} in {ns}")
        time.sleep(0.05)


def http_get(ns: str, host: str, port: int) -> tuple[int, str]:
    """One HTTP/1.1 request with Connection: close, from namespace ns: (status, X-Backend)."""

    def get() -> tuple[int, str]:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {url_host(host)}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        backend = next((h.split(":", 1)[1].strip() for h in head[1:] if h.lower().startswith("x-backend:")), "?")
        return int(head[0].split()[1]), backend

    return nl.run_in_netns(ns, get)


# --- where the CPU went ------------------------------------------------------------------

PF_KTHREAD = 0x00200000


@dataclass
class CpuSample:
    stat: list[int]  # the "cpu" line of /proc/stat (USER_HZ ticks, all CPUs)
    procs: dict[int, tuple[str, int]]  # pid -> (group, user+system ticks)
    tools: int  # ticks of this script's reaped children


def cpu_sample(groups_by_netns: dict[int | None, str]) -> CpuSample:
    """/proc/stat, and user+system ticks of every process with the group of
    its network namespace. The tools this script runs (wrk, iperf3 -c, nft)
    exit before the second sample: their time is in this process's cutime."""
    with open("/proc/stat") as f:
        stat = [int(x) for x in f.readline().split()[1:]]
    procs: dict[int, tuple[str, int]] = {}
    tools = 0
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            inode = os.stat(f"/proc/{entry}/ns/net").st_ino
        except OSError:
            continue
        if int(fields[6]) & PF_KTHREAD:
            continue
        if int(entry) == me:
            tools = int(fields[13]) + int(fields[14])
            continue
        procs[int(entry)] = (groups_by_netns.get(inode, "foreign"), int(fields[11]) + int(fields[12]))
    return CpuSample(stat, procs, tools)


@dataclass
class CpuUse:
    """Shares of the whole machine (all CPUs) over one measurement, in %."""

    busy: float
    softirq: float
    groups: dict[str, float]

    def __str__(self) -> str:
        parts = [f"softirq {self.softirq:.0f}"]
        parts += [f"{g} {v:.0f}" for g, v in sorted(self.groups.items()) if g != "foreign" and v >= 0.5]
        foreign = self.groups.get("foreign", 0)
        return f"cpu% busy {self.busy:.0f}: " + ", ".join(parts) + f" | other sessions {foreign:.0f}"


def cpu_use(before: CpuSample, after: CpuSample) -> CpuUse:
    """Processes that exited in between are missed (other sessions' share is a
    lower bound); new ones count from zero."""
    d = [a - b for a, b in zip(after.stat, before.stat)]
    total = sum(d[:8]) or 1  # user nice system idle iowait irq softirq steal
    busy = total - d[3] - d[4]
    ticks: dict[str, int] = {"tools": after.tools - before.tools}
    for pid, (group, t) in after.procs.items():
        old = before.procs.get(pid)
        ticks[group] = ticks.get(group, 0) + t - (old[1] if old and old[0] == group else 0)
    return CpuUse(100.0 * busy / total, 100.0 * d[6] / total, {g: 100.0 * v / total for g, v in ticks.items()})


def wait_for_quiet(groups_by_netns: dict[int | None, str], limit: float, max_wait: float) -> float:
    """Other sessions share this machine: wait (at most max_wait s) for a
    1-second window in which their processes use under `limit` % of it.
    Returns the share seen in the last window."""
    deadline = time.monotonic() + max_wait
    while True:
        before = cpu_sample(groups_by_netns)
        time.sleep(1)
        share = cpu_use(before, cpu_sample(groups_by_netns)).groups.get("foreign", 0.0)
        if share < limit or time.monotonic() >= deadline:
            return share


# --- measurements ----------------------------------------------------------------------

@dataclass
class IperfResult:
    gbits: float
    retransmits: int
    cpu_local: float
    cpu_remote: float


@dataclass
class WrkResult:
    rps: float
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]


def measure_iperf(client_ns: str, host: str, seconds: int, reverse: bool = False) -> IperfResult:
    """One stream; `reverse` (-R): the server sends, the client receives.
    A client that has not ended 30 s after its time is killed and run once
    more, saying so (seen once: -R over IPv6 toward the DSR lab's VIP)."""
    argv = ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", str(seconds), "-A", IPERF_AFFINITY, "-J",
            *(["-R"] if reverse else [])]
    try:
        proc = run(client_ns, *argv, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        print(f"    iperf3 to {host} did not end within {seconds + 30} s: killed, run again", flush=True)
        try:
            proc = run(client_ns, *argv, timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            raise BenchError(f"iperf3 to {host} did not end within {seconds + 30} s, twice") from None
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise BenchError(f"iperf3 to {host}: {proc.stderr.strip() or proc.stdout[-300:]}") from exc
    if "error" in out:
        raise BenchError(f"iperf3 to {host}: {out['error']}")
    end = out["end"]
    cpu = end.get("cpu_utilization_percent", {})
    return IperfResult(end["sum_received"]["bits_per_second"] / 1e9, int(end["sum_sent"].get("retransmits", 0)),
                       float(cpu.get("host_total", 0.0)), float(cpu.get("remote_total", 0.0)))


def measure_wrk(client_ns: str, host: str, port: int, seconds: int) -> WrkResult:
    url = f"http://{url_host(host)}:{port}/"
    proc = run(client_ns, "wrk", "-c32", "-t2", f"-d{seconds}s", "-H", "Connection: close", url, timeout=seconds + 30)
    text = proc.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if proc.returncode != 0 or not rps or not total:
        raise BenchError(f"wrk {url}: {proc.stderr.strip() or text[-300:]}")
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors = dict(zip(errors, map(int, m.groups())))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(float(rps.group(1)), int(total.group(1)), int(non_2xx.group(1)) if non_2xx else 0, errors)


# --- setups -------------------------------------------------------------------------------

@dataclass
class Setup:
    key: str
    title: str
    host: str  # what the client connects to
    http_port: int
    start: Callable[[], None] = lambda: None
    stop: Callable[[], None] = lambda: None
    family: int = 4
    notes: list[str] = field(default_factory=list)
    iperf: list[IperfResult] = field(default_factory=list)
    wrk: list[WrkResult] = field(default_factory=list)
    iperf_cpu: list[CpuUse] = field(default_factory=list)
    wrk_cpu: list[CpuUse] = field(default_factory=list)
    backends_seen: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        """The title with the family: what the report prints."""
        return f"IPv{self.family} {self.title}"

    @property
    def gbits(self) -> float:
        return statistics.median(r.gbits for r in self.iperf) if self.iperf else float("nan")

    @property
    def conns(self) -> float:
        return statistics.median(r.rps for r in self.wrk) if self.wrk else float("nan")


def backend_address(backend: labmod.Backend, family: int) -> str:
    return backend.address if family == 4 else backend.address6


def nft_family(family: int) -> str:
    """The nftables table family and address keyword of an IP family."""
    return "ip" if family == 4 else "ip6"


def nft_ruleset(lab: Lab, family: int) -> str:
    b = [backend_address(x, family) for x in lab.backends]
    vip, ip = (VIP, "ip") if family == 4 else (VIP6, "ip6")
    pool = ", ".join(f"{i} : {addr} . {HTTP_PORT}" for i, addr in enumerate(b))
    first = b[0] if family == 4 else f"[{b[0]}]"
    return f"""
table {ip} {NFT_TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    {ip} daddr {vip} tcp dport {HTTP_VIP_PORT} dnat {ip} to jhash {ip} saddr . tcp sport mod {len(b)} map {{ {pool} }}
    {ip} daddr {vip} tcp dport {IPERF_PORT} dnat {ip} to {first}
  }}
}}
"""


def haproxy_address(address: str, port: int) -> str:
    """address:port as HAProxy's bind and server lines take it (ipv6@ says which colon is the port's)."""
    return f"ipv6@{address}:{port}" if ":" in address else f"{address}:{port}"


def haproxy_config(lab: Lab, family: int) -> str:
    vip = VIP if family == 4 else VIP6
    first = backend_address(lab.backends[0], family)
    servers = "\n".join(f"    server {x.name} {haproxy_address(backend_address(x, family), HTTP_PORT)}"
                        for x in lab.backends)
    return f"""
global
    maxconn 8000
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend http_in
    bind {haproxy_address(vip, HTTP_VIP_PORT)}
    default_backend http_pool
backend http_pool
    balance roundrobin
{servers}
frontend iperf_in
    bind {haproxy_address(vip, IPERF_PORT)}
    default_backend iperf_pool
backend iperf_pool
    server {lab.backends[0].name} {haproxy_address(first, IPERF_PORT)}
"""


def nginx_config(name: str, listens: tuple[str, ...], directory: str) -> str:
    """A backend's nginx on each of `listens` (ADDRESS:PORT, or PORT: every
    address, with its parameters), no logs, every answer naming it (`name`)."""
    listen = "\n".join(f"        listen {x} reuseport backlog=4096;" for x in listens)
    return f"""
worker_processes {NGINX_WORKERS};
pid {directory}/nginx.pid;
error_log /dev/null crit;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    server {{
{listen}
        location / {{
            default_type text/plain;
            add_header X-Backend {name} always;
            return 200 "{name}\\n";
        }}
    }}
}}
"""


def run_nginx(backend: labmod.Backend, port: int, prefix: str, stack: ExitStack, every_address: bool = False,
              families: tuple[int, ...] = (4,)) -> None:
    """nginx (nginx_config) in `backend`'s namespace on its addresses of
    `families` and `port` (on every address of them if `every_address`),
    until it listens; stopped by `stack`. Its files under a temporary
    directory named from `prefix`. (IPv4 unless asked: the backends of
    lb.labhosts have no IPv6 address.)"""
    if every_address:
        listens = tuple(str(port) if f == 4 else f"[::]:{port} ipv6only=on" for f in families)
    else:
        listens = tuple(f"{url_host(backend_address(backend, f))}:{port}" for f in families)
    directory = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{prefix}-nginx-{backend.name}-"))
    config = os.path.join(directory, "nginx.conf")
    with open(config, "w") as f:
        f.write(nginx_config(backend.name, listens, directory))
    proc = subprocess.Popen(ns_cmd(backend.netns, "nginx", "-p", directory, "-c", config, "-e", "/dev/null",
                                   "-g", "daemon off;"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    stack.callback(stop_process, proc)
    try:
        for family in families:
            wait_listening(backend.netns, backend_address(backend, family), port, proc, f"nginx in {backend.netns}")
    except BenchError:
        stop_process(proc)
        assert proc.stderr is not None
        raise BenchError(f"nginx in {backend.netns}: {proc.stderr.read().decode().strip()}") from None


def run_iperf_server(backend: labmod.Backend, stack: ExitStack) -> None:
    """iperf3 -s on IPERF_PORT in `backend`'s namespace (on [::]: both
    families), until it listens; stopped by `stack`."""
    proc = subprocess.Popen(ns_cmd(backend.netns, "iperf3", "-s", "-p", str(IPERF_PORT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
    stack.callback(stop_process, proc)
    wait_listening(backend.netns, backend.address, IPERF_PORT, proc, "iperf3 -s")


def start_nginx(lab: Lab, stack: ExitStack, families: tuple[int, ...] = (4,)) -> None:
    """Replace each backend's lab server by nginx on its HTTP port (run_nginx); stopped by `stack`."""
    for backend in lab.backends:
        lab.stop_server(backend)  # it holds 0.0.0.0:80
        run_nginx(backend, HTTP_PORT, PREFIX, stack, families=families)


def veth_report(lab: Lab) -> list[str]:
    lines = []
    for ns in (lab.client_ns, *(b.netns for b in lab.backends)):
        f = nl.get_features(ns, labmod.HOST_IF)
        lines.append(f"{ns}/{labmod.HOST_IF}: rx-gro {'on' if f.get('rx-gro') else 'off'}, "
                     f"tx-checksum-ip-generic {'on' if f.get('tx-checksum-ip-generic') else 'off'}, "
                     f"tso {'on' if f.get('tx-tcp-segmentation') else 'off'}")
    lines.append(f"{lab.lb_ns}: " + ", ".join(f"{k} = {nl.get_sysctl(lab.lb_ns, k)}"
                                              for k in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding")))
    for ns in (lab.client_ns, lab.lb_ns):
        lines.append(f"{ns}: " + ", ".join(f"{k} = {nl.get_sysctl(ns, k)}" for k in CLIENT_SYSCTLS))
    return lines


MAIN_PID = os.getpid()


def on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` cleans up. Only in this
    process: pyroute2 forks helpers (netns sockets) and stops them with
    SIGTERM; a helper that raised here would run our cleanup from its copy of
    the stack and tear the lab down under the parent."""
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt

def parse_args(description: str, setups: str) -> argparse.Namespace:
    """The options of the end-to-end benchmarks (this one, l4_dsr_e2e.py); `setups` for --only's help."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=3, help="measurements per setup; the median is shown (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="length of each iperf3 and wrk run (default 5)")
    parser.add_argument("--quiet", type=float, default=5.0,
                        help="before each measurement wait for a second in which other sessions' processes use "
                             "under this %% of the machine (default 5)")
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="but at most this many seconds (default 20)")
    parser.add_argument("--only", default="", help=f"comma-separated setups ({setups}), in every family measured")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="both",
                        help="IP family of the client's connections: 4, 6 or both (default both, each setup "
                             "measured over each family in the same rounds)")
    parser.add_argument("--iperf-reverse", action="store_true",
                        help="iperf3 -R: the backend sends, the client receives (the direction whose packets "
                             "DSR keeps off lb)")
    return parser.parse_args()


def can_run(script: str, tools: tuple[str, ...]) -> bool:
    """Root and `tools` installed; else says why on stderr."""
    if os.geteuid() != 0:
        print(f"{script}: needs root (XDP, network namespaces)", file=sys.stderr)
        return False
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"{script}: missing {', '.join(missing)}: run `deploy/install.sh --bench`", file=sys.stderr)
        return False
    return True


def selected(setups: list[Setup], only: str) -> list[Setup]:
    """--only: the setups named (by key, in every family measured)."""
    if not only:
        return setups
    wanted = set(only.split(","))
    return [s for s in setups if s.key in wanted]


def measure_setup(s: Setup, rnd: int, client_ns: str, groups: dict[int | None, str], args: argparse.Namespace,
                  warmed: Callable[[Setup], None]) -> None:
    """Round `rnd` of setup `s`: started, iperf3 then wrk from `client_ns`,
    each after a quiet second (parse_args), with the CPU split by `groups`,
    stopped; the results kept in `s` and printed. In round 1, 12 HTTP
    requests first (they warm ARP / neighbours), then `warmed(s)`."""
    s.start()
    try:
        if rnd == 1:  # also warms ARP / neighbours before the first measurement
            for _ in range(12):
                status, backend = http_get(client_ns, s.host, s.http_port)
                if status != 200:
                    raise BenchError(f"{s.label}: HTTP {status} through {s.host}:{s.http_port}")
                s.backends_seen.add(backend)
            warmed(s)
        wait_for_quiet(groups, args.quiet, args.quiet_wait)
        c0 = cpu_sample(groups)
        it = measure_iperf(client_ns, s.host, args.seconds, args.iperf_reverse)
        iperf_cpu = cpu_use(c0, cpu_sample(groups))
        wait_for_quiet(groups, args.quiet, args.quiet_wait)
        c1 = cpu_sample(groups)
        wk = measure_wrk(client_ns, s.host, s.http_port, args.seconds)
        c2 = cpu_sample(groups)
    finally:
        s.stop()
    s.iperf.append(it)
    s.wrk.append(wk)
    s.iperf_cpu.append(iperf_cpu)
    s.wrk_cpu.append(cpu_use(c1, c2))
    errs = sum(wk.socket_errors.values())
    print(f"round {rnd} {s.label}", flush=True)
    print(f"    iperf3 {it.gbits:6.2f} Gbit/s  retransmits {it.retransmits:<6}  {s.iperf_cpu[-1]}")
    print(f"    wrk   {wk.rps:7.0f} conn/s  non-2xx {wk.non_2xx}, socket errors {errs}  {s.wrk_cpu[-1]}", flush=True)
    time.sleep(1)  # let TIME_WAIT and softirq backlogs settle between setups


def print_table(setups: list[Setup]) -> None:
    """The medians and every run's figure, one block per family."""
    header = (f"{'setup':<43} {'Gbit/s':>7} {'runs':>16} {'conn/s':>7} {'runs':>19} {'non-2xx':>7} {'sockerr':>7} "
              f"{'other sessions cpu%':>19}")
    print(header)
    for family in sorted({s.family for s in setups}):
        print("-" * len(header))
        for s in (s for s in setups if s.family == family):
            runs_g = " ".join(f"{r.gbits:.2f}" for r in s.iperf)
            runs_c = " ".join(f"{r.rps:.0f}" for r in s.wrk)
            non2xx = sum(r.non_2xx for r in s.wrk)
            errs = sum(sum(r.socket_errors.values()) for r in s.wrk)
            foreign = " ".join(f"{c.groups.get('foreign', 0):.0f}" for c in [*s.iperf_cpu, *s.wrk_cpu])
            print(f"{s.label:<43} {s.gbits:7.2f} {runs_g:>16} {s.conns:7.0f} {runs_c:>19} {non2xx:7d} {errs:7d} "
                  f"{foreign:>19}")


def print_cpu(setups: list[Setup], legend: str) -> None:
    print("median cpu% of the whole machine (2 CPUs = 100) during the wrk runs (tick-sampled; softirq time is also")
    print(f"counted in the process it interrupted; {legend}):")
    for s in setups:
        if s.wrk_cpu:
            keys = sorted({k for c in s.wrk_cpu for k in c.groups} - {"foreign"})
            med = {k: statistics.median(c.groups.get(k, 0) for c in s.wrk_cpu) for k in keys}
            print(f"  {s.label:<43} busy {statistics.median(c.busy for c in s.wrk_cpu):3.0f}  "
                  f"softirq {statistics.median(c.softirq for c in s.wrk_cpu):3.0f}  "
                  + "  ".join(f"{k} {v:3.0f}" for k, v in med.items()))


def ratio_lines(name: str, mine: Setup, theirs: Setup, goal: float | None, note: str = "") -> list[str]:
    """mine / theirs for throughput and connections, with the goal's verdict (>= goal) when there is one."""
    lines = []
    for what, a, b in (("Gbit/s", mine.gbits, theirs.gbits), ("conn/s", mine.conns, theirs.conns)):
        ratio = a / b if b else float("nan")
        verdict = f"(goal >= {goal}) [{'MET' if ratio >= goal else 'NOT MET'}]" if goal is not None else note
        lines.append(f"IPv{mine.family} {name:<46} {what}: {ratio:5.2f}  {verdict}".rstrip())
    return lines


def print_answered_by(setups: list[Setup]) -> None:
    for s in setups:
        if s.backends_seen:
            print(f"{s.label}: HTTP answered by {', '.join(sorted(s.backends_seen))}")


def warn_of_errors(setups: list[Setup]) -> None:
    bad = [s.label for s in setups if any(r.non_2xx or sum(r.socket_errors.values()) for r in s.wrk)]
    if bad:
        print(f"WARNING: wrk saw non-2xx responses or socket errors in: {', '.join(bad)}")


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], "lb,lb-full-nat,nftables,stateless,routing,haproxy")
    if not can_run("l4_e2e.py", ("iperf3", "wrk", "nft", "nginx")):
        return 1
    signal.signal(signal.SIGTERM, on_sigterm)

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"kernel:  {platform.system()} {platform.release()} {platform.version()} ({platform.machine()})")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"cpu:     {cpu}, {os.cpu_count()} CPUs")
    versions = []
    for tool, flag in (("iperf3", "--version"), ("wrk", "-v"), ("nft", "--version"), ("nginx", "-v"),
                       ("haproxy", "-v")):
        if shutil.which(tool):
            out = subprocess.run([tool, flag], capture_output=True, text=True)
            versions.append((out.stdout or out.stderr).splitlines()[0].strip())
    print("tools:   " + "; ".join(versions))
    print(f"params:  iperf3 -t {args.seconds} -A {IPERF_AFFINITY}{' -R' if args.iperf_reverse else ''} (1 stream) | "
          f"wrk -c32 -t2 -d{args.seconds}s -H 'Connection: close' | {args.runs} runs each, median | "
          f"IPv{' and IPv'.join(map(str, FAMILIES[args.family]))}")
    print()

    lab = Lab(PREFIX)
    stack = ExitStack()
    try:
        return run_bench(lab, args, stack)
    finally:
        try:
            stack.close()  # detach XDP, delete the nft tables, stop processes, release BPF objects
        finally:
            lab.down()  # the namespaces, with the VIP addresses and every process left in them
            purge_pins(NAME)
            shutil.rmtree(f"/run/lb-lab/{PREFIX}", ignore_errors=True)


def words6(macro: str, address: str) -> list[str]:
    """-D<macro>_W0..3: an IPv6 address as baseline_dnat6.c takes it."""
    return [f"-D{macro}_W{i}={w:#x}U" for i, w in enumerate(ip6_to_net(address).words)]


def stateless_cflags(lab: Lab, family: int) -> tuple[Path, str, list[str]]:
    """The stateless XDP DNAT of a family (source, function, cflags): the
    same C as xdp_cost.py's baseline, with two services and reverse NAT."""
    b = [backend_address(x, family) for x in lab.backends]
    if family == 4:
        return BASELINE_C, "xdp_baseline", [
            f"-I{bpf_source_dir()}", f"-DVIP_ADDR={ip_to_net(VIP):#x}U", "-DREVERSE_NAT",
            f"-DSVC0_VIP_PORT={port_to_net(HTTP_VIP_PORT):#x}", f"-DSVC0_TARGET_PORT={port_to_net(HTTP_PORT):#x}",
            f"-DSVC0_N={len(b)}", *(f"-DSVC0_T{i}={ip_to_net(a):#x}U" for i, a in enumerate(b)),
            f"-DSVC1_VIP_PORT={port_to_net(IPERF_PORT):#x}", f"-DSVC1_TARGET_PORT={port_to_net(IPERF_PORT):#x}",
            "-DSVC1_N=1", f"-DSVC1_T0={ip_to_net(b[0]):#x}U",
        ]
    return BASELINE6_C, "xdp_baseline6", [
        f"-I{bpf_source_dir()}", *words6("VIP", VIP6), "-DREVERSE_NAT",
        f"-DVIP_PORT={port_to_net(HTTP_VIP_PORT):#x}", f"-DTARGET_PORT={port_to_net(HTTP_PORT):#x}",
        f"-DTARGETS_N={len(b)}", *(w for i, a in enumerate(b) for w in words6(f"T{i or ''}", a)),
        f"-DSVC1_VIP_PORT={port_to_net(IPERF_PORT):#x}", f"-DSVC1_TARGET_PORT={port_to_net(IPERF_PORT):#x}",
    ]


def run_bench(lab: Lab, args: argparse.Namespace, stack: ExitStack) -> int:
    from bcc import BPF  # deferred, as in lb.dataplane.loader: loading libbcc is for root only (after the checks)

    families = FAMILIES[args.family]
    lab.down()  # leftovers of an interrupted run
    purge_pins(NAME)
    lab.up()
    with nl.iproute(lab.lb_ns) as ipr:
        nl.add_address(ipr, labmod.LB_CLIENT_IF, VIP, 32)
        nl.add_address(ipr, labmod.LB_CLIENT_IF, VIP6, 128, nodad=True)  # answers the client's neighbour solicitation
    # wrk closes first, so the client keeps each connection in TIME_WAIT for
    # 60 s: without these, ~14k connections use up the ephemeral ports and every
    # later measurement runs at the TIME_WAIT expiry rate (~900 conn/s here).
    # The lb namespace gets the same for HAProxy's own outgoing connections.
    # (net.ipv4's TCP sysctls govern IPv6 TCP sockets too.)
    for ns in (lab.client_ns, lab.lb_ns):
        for key, value in CLIENT_SYSCTLS.items():
            nl.set_sysctl(ns, key, value)
    for line in veth_report(lab):
        print(f"lab:     {line}")
    start_nginx(lab, stack, families)
    print(f"lab:     HTTP backends: nginx, {NGINX_WORKERS} workers each")

    backend1 = lab.backends[0]
    run_iperf_server(backend1, stack)

    # lb: compiled once, attached and detached per round; the services of
    # every family measured, as a dual-stack configuration has them.
    program = stack.enter_context(Program.load(NAME, LIMITS))
    maps = stack.enter_context(Maps(program.pin_dir, LIMITS))
    dataplane = Dataplane(maps, source_of=lambda address: nl.source_toward(address, lab.lb_ns))

    def services(mode: str) -> list[L4Service]:
        out = []
        for family in families:
            vip = ipaddress.ip_address(VIP if family == 4 else VIP6)
            http = tuple((Endpoint(ipaddress.ip_address(backend_address(x, family)), HTTP_PORT), 1)
                         for x in lab.backends)
            iperf = ((Endpoint(ipaddress.ip_address(backend_address(backend1, family)), IPERF_PORT), 1),)
            out += [L4Service(VipAddr(vip, HTTP_VIP_PORT, "TCP"), members=http, mode=mode),
                    L4Service(VipAddr(vip, IPERF_PORT, "TCP"), members=iperf, mode=mode)]
        return out

    dataplane.apply(services("nat"))

    stateless_fds: dict[int, int] = {}
    for family in families:
        source, function, cflags = stateless_cflags(lab, family)
        stateless = BPF(src_file=str(source).encode(), cflags=cflags)
        stack.callback(stateless.cleanup)
        stateless_fds[family] = stateless.load_func(function.encode(), BPF.XDP).fd

    netns_groups = {nl.netns_inode(lab.client_ns): "client", nl.netns_inode(lab.lb_ns): "lb-ns"}
    for x in lab.backends:
        netns_groups[nl.netns_inode(x.netns)] = "backends"

    lb_attachments: list[Attachment] = []
    # per family, over the runs of lb (NAT) and lb full NAT
    counters_total: dict[int, dict[Counter, int]] = {f: {c: 0 for c in Counter} for f in families}
    counters_before: dict[Counter, int] = {}

    def lb_start() -> None:
        for ifname in lab.lb_interfaces:
            lb_attachments.append(program.attach(ifname, XdpMode.NATIVE, lab.lb_ns))
        counters_before.update(maps.counters())

    def lb_stopper(family: int) -> Callable[[], None]:
        def stop() -> None:
            if lb_attachments:
                after = maps.counters()
                for c in Counter:
                    counters_total[family][c] += after[c] - counters_before.get(c, after[c])
            detach_lb()
        return stop

    def detach_lb() -> None:
        while lb_attachments:
            detach(lb_attachments.pop())

    def full_nat_start() -> None:
        dataplane.apply(services("full-nat"))  # a mode change: the VIPs are made anew
        lb_start()

    def full_nat_stopper(family: int) -> Callable[[], None]:
        def stop() -> None:
            lb_stopper(family)()
            dataplane.apply(services("nat"))
        return stop

    stateless_on: list[str] = []

    def stateless_starter(family: int) -> Callable[[], None]:
        def start() -> None:
            with nl.iproute(lab.lb_ns) as ipr:
                for ifname in lab.lb_interfaces:
                    nl.attach_xdp(ipr, ifname, stateless_fds[family], "native")
                    stateless_on.append(ifname)
        return start

    def stateless_stop() -> None:
        with nl.iproute(lab.lb_ns) as ipr:
            while stateless_on:
                nl.detach_xdp(ipr, stateless_on.pop(), "native")

    nft_on: list[int] = []

    def nft_starter(family: int) -> Callable[[], None]:
        def start() -> None:
            proc = subprocess.run(ns_cmd(lab.lb_ns, "nft", "-f", "-"), input=nft_ruleset(lab, family), text=True,
                                  capture_output=True, timeout=30)
            if proc.returncode != 0:
                raise BenchError(f"nft: {proc.stderr.strip()}")
            nft_on.append(family)
        return start

    def nft_stop() -> None:
        while nft_on:
            subprocess.run(ns_cmd(lab.lb_ns, "nft", "delete", "table", nft_family(nft_on.pop()), NFT_TABLE),
                           capture_output=True, timeout=30)

    haproxy_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"{PREFIX}-haproxy-"))
    haproxy_proc: list[subprocess.Popen[Any]] = []

    def haproxy_starter(family: int) -> Callable[[], None]:
        cfg = os.path.join(haproxy_dir, f"haproxy{family}.cfg")
        with open(cfg, "w") as f:
            f.write(haproxy_config(lab, family))
        vip = VIP if family == 4 else VIP6

        def start() -> None:
            proc = subprocess.Popen(ns_cmd(lab.lb_ns, "haproxy", "-f", cfg, "-db"), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
            haproxy_proc.append(proc)
            wait_listening(lab.lb_ns, vip, HTTP_VIP_PORT, proc, "haproxy")
            wait_listening(lab.lb_ns, vip, IPERF_PORT, proc, "haproxy")
        return start

    def haproxy_stop() -> None:
        while haproxy_proc:
            stop_process(haproxy_proc.pop())

    # Whatever is on when the script is interrupted comes off again.
    stack.callback(haproxy_stop)
    stack.callback(nft_stop)
    stack.callback(stateless_stop)
    stack.callback(detach_lb)

    setups: list[Setup] = []
    for family in families:
        vip = VIP if family == 4 else VIP6
        setups += [
            Setup("lb", "lb XDP (native)", vip, HTTP_VIP_PORT, lb_start, lb_stopper(family), family),
            Setup("lb-full-nat", "lb XDP full NAT (native)", vip, HTTP_VIP_PORT, full_nat_start,
                  full_nat_stopper(family), family),
            Setup("nftables", "nftables DNAT (jhash mod 3)", vip, HTTP_VIP_PORT, nft_starter(family), nft_stop,
                  family),
            Setup("stateless", "stateless XDP DNAT (native)", vip, HTTP_VIP_PORT, stateless_starter(family),
                  stateless_stop, family),
            Setup("routing", "plain routing (client -> backend1)", backend_address(backend1, family), HTTP_PORT,
                  family=family),
        ]
        if shutil.which("haproxy"):
            setups.append(Setup("haproxy", "HAProxy 2 threads, TCP mode", vip, HTTP_VIP_PORT,
                                haproxy_starter(family), haproxy_stop, family))
    if not shutil.which("haproxy"):
        print("haproxy not installed: skipped")
    setups = selected(setups, args.only)

    def note_attachments(s: Setup) -> None:
        if s.key == "lb":
            s.notes += [f"{a.ifname} {a.mode}" for a in lb_attachments]

    for rnd in range(1, args.runs + 1):  # rounds interleave the setups: a noisy minute spreads over all of them
        for s in setups:
            measure_setup(s, rnd, lab.client_ns, netns_groups, args, note_attachments)

    # --- report -----------------------------------------------------------------------------
    print()
    print_table(setups)
    print()
    print_cpu(setups, "tools = wrk, backends = nginx, lb-ns = HAProxy")
    print()
    print_answered_by(setups)
    for family in families:
        by_key = {s.key: s for s in setups if s.family == family}
        lb = by_key.get("lb")
        if not lb:
            continue
        total = counters_total[family]
        print(f"IPv{family} lb attachments: {', '.join(dict.fromkeys(lb.notes))}")
        nonzero = {c.label: v for c, v in total.items() if v}
        print(f"IPv{family} lb counters over all its runs (NAT and full NAT): "
              + ", ".join(f"{k} {v:,}" for k, v in nonzero.items()))
        fwd = total[Counter.REDIRECTED] + total[Counter.TX]
        fib = total[Counter.PASS_FIB]
        if fwd + fib:
            print(f"  forwarded by XDP: {fwd / (fwd + fib):.4%} of rewritten packets; "
                  f"passed to the kernel for want of a neighbour (pass_fib): {fib:,}")
        full = by_key.get("lb-full-nat")
        made = sum(r.requests for r in [*lb.wrk, *(full.wrk if full else [])]) + 24  # wrk's + the warm-ups
        misses = total[Counter.CONNTRACK_MISS]
        why = (f": a client port reused within the idle timeout ({LIMITS.tcp_idle_timeout} s) found the entry of "
               f"its closed connection (a hit, same backend)" if misses < 0.9 * made else "")
        print(f"  conntrack misses {misses:,} for ~{made:,} HTTP connections{why}")
    print()
    for family in families:
        by_key = {s.key: s for s in setups if s.family == family}
        lb = by_key.get("lb")
        full = by_key.get("lb-full-nat")
        lines = []
        for other, goal in (("nftables", GOAL_VS_NFT), ("stateless", GOAL_VS_STATELESS)):
            if lb and other in by_key:
                lines += ratio_lines(f"lb / {by_key[other].title}", lb, by_key[other], goal)
        if lb and full:
            lines += ratio_lines("lb full NAT / lb NAT", full, lb, None,
                                 "(goal: full NAT's established cost <= 1.5 x its floor: see xdp_cost.py)")
        if full and "stateless" in by_key:
            lines += ratio_lines(f"lb full NAT / {by_key['stateless'].title}", full, by_key["stateless"], None,
                                 "(reference: a DNAT floor, no source rewrite)")
        for other in ("routing", "haproxy"):
            if lb and other in by_key:
                lines += ratio_lines(f"lb / {by_key[other].title}", lb, by_key[other], None, "(reference)")
        for line in lines:
            print(line)
    warn_of_errors(setups)
    return 0


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # ip netns exec and its child, started in their own session
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)

"""Scale-out: failover time at the router, and 2 lb hosts against 1 (not a pytest test).

Usage (root; wrk, iperf3 and nginx from `deploy/install.sh --bench`):
    LB_TEST_PREFIX=lbb .venv/bin/python tests/bench/bgp_failover.py
    LB_TEST_PREFIX=lbb .venv/bin/python tests/bench/bgp_failover.py --runs 5 --seconds 5 --only failover

The scale-out lab (lb.labhosts.ScaleLab, prefix <LB_TEST_PREFIX>-bench):
a router namespace running BIRD (ECMP, 5-tuple hash) in front of two lb
hosts, each running `lb up` with its own BIRD, announcing 10.0.0.100.

Failover, each case with 50 long-lived TCP connections exchanging a line
every 100 ms (tests/ecmp_lab.Pumps), --runs times, medians shown:
    graceful          `lb bgp withdraw` on host 1; once the router has one next
                      hop, the backends stop using host 1 and it runs `lb down`
    link down         host 2's links go down (the router's BIRD sees its interface go)
    silent, BFD       host 2 stops but the router's link stays up (nftables drops
                      everything on it, as a switch in between would): BFD 100 ms × 3
    silent, no BFD    the same with BFD off (an `lb reload` first): the hold timer, 3 s
"converged" is the time from the action to the router's kernel route having
one next hop; "broken" counts connections with an error; "pause" is the
longest time any connection went without an exchange.

Throughput and new connections per second, the same run, interleaved:
    2 hosts   both hosts announce
    1 host    host 2 withdrawn (`lb bgp withdraw`): the same path, one host
Throughput: `iperf3 -P 4` to VIP:5201 (one target, backend1, so that
iperf3's control and data connections meet one server; the four streams
spread over the hosts by the router's hash). Connections: `wrk -c32 -t2`
with `Connection: close` to VIP:8080 (nginx on the three backends, as
tests/bench/l4_e2e.py). On this 2-CPU machine every namespace shares the
same two cores, so 2 hosts show that the path works at the rate of 1, not
that it scales: the ratio is printed to show nothing is lost, not gained.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lb import netlink as nl  # noqa: E402
from lb.labhosts import ScaleLab  # noqa: E402
from tests.bench.l4_e2e import (  # noqa: E402
    CLIENT_SYSCTLS,
    HTTP_PORT,
    HTTP_VIP_PORT,
    IPERF_PORT,
    BenchError,
    measure_iperf,
    measure_wrk,
    ns_cmd,
    start_nginx,
    stop_process,
    wait_listening,
)
from tests.daemon_fixture import CHECKS  # noqa: E402
from tests.ecmp_lab import Host, Pumps, ecmp_lab, wait_next_hops  # noqa: E402

VIP = "10.0.0.100"
LONG_LIVED = 50

EXTRA = f"""
[[listeners]]
name = "web"
protocol = "TCP"
address = "{VIP}"
port = {HTTP_VIP_PORT}
default_action = {{ type = "forward", target_group = "web" }}

[[target_groups]]
name = "web"
protocol = "TCP"
port = {HTTP_PORT}
targets = [{{ id = "10.0.1.11" }}, {{ id = "10.0.1.12" }}, {{ id = "10.0.1.13" }}]
health_check = {{ {CHECKS} }}

[[listeners]]
name = "iperf"
protocol = "TCP"
address = "{VIP}"
port = {IPERF_PORT}
default_action = {{ type = "forward", target_group = "iperf" }}

[[target_groups]]
name = "iperf"
protocol = "TCP"
port = {IPERF_PORT}
targets = [{{ id = "10.0.1.11" }}]
health_check = {{ {CHECKS} }}
"""


# --- failover ---------------------------------------------------------------------------


def failover(lab: ScaleLab, act: Callable[[], None], restore: Callable[[], None],
             then: Callable[[], None] = lambda: None) -> tuple[float, int, float]:
    """(seconds from `act` to one next hop, broken connections, longest pause)
    of one failure; `then` runs once the router converged."""
    wait_next_hops(lab, 2)
    with Pumps(lab, LONG_LIVED) as pumps:
        if not pumps.wait_all_moving(5):
            raise BenchError("the long-lived connections did not all start moving")
        start = time.monotonic()
        act()
        wait_next_hops(lab, 1)
        took = time.monotonic() - start
        then()
        pumps.wait_all_moving(10)
        broken, pause = len(pumps.broken()), pumps.recovery()
    restore()
    wait_next_hops(lab, 2, timeout=60)  # BIRD backs off after repeated session errors (error wait time 1..10 s)
    return took, broken, pause


def graceful(lab: ScaleLab, host: Host) -> tuple[float, int, float]:
    def act() -> None:
        host.daemon.request("bgp_withdraw")

    def then() -> None:  # the backends stop using the host, then lb down (docs/bgp.md)
        host.leave_backends()
        host.stop()

    def restore() -> None:
        host.links(True)
        host.start()

    return failover(lab, act, restore, then)


def run_failover(lab: ScaleLab, hosts: list[Host], runs: int) -> list[str]:
    lines = []
    host1, host2 = hosts
    cases: list[tuple[str, Callable[[], tuple[float, int, float]]]] = [
        ("graceful (withdraw, lb down)", lambda: graceful(lab, host1)),
        ("hard: link down", lambda: failover(lab, lambda: host2.links(False), host2.revive)),
        ("hard: silent, BFD 100 ms x 3", lambda: failover(lab, host2.die_silently, host2.revive)),
    ]
    results: dict[str, list[tuple[float, int, float]]] = {name: [] for name, _ in cases}
    for _ in range(runs):
        for name, case in cases:
            results[name].append(case())
    # Without BFD: the hosts reloaded with bfd off, one at a time (a session
    # whose settings change restarts: the host is out meanwhile), then the silent case.
    def set_bfd(on: bool) -> None:
        for h in hosts:
            h.reconfigure(h.config_text.replace(f"bfd = {{ enabled = {'false' if on else 'true'}",
                                                f"bfd = {{ enabled = {'true' if on else 'false'}"))
            time.sleep(1)  # the restart, if BIRD restarts the session (a change of bfd alone may not)
            wait_next_hops(lab, 2, timeout=30)

    set_bfd(False)
    name = "hard: silent, no BFD (hold 3 s)"
    results[name] = [failover(lab, host2.die_silently, host2.revive) for _ in range(runs)]
    set_bfd(True)
    for name, rows in results.items():
        took = statistics.median(r[0] for r in rows)
        broken = [r[1] for r in rows]
        pause = statistics.median(r[2] for r in rows)
        lines.append(f"{name:<34} converged {took * 1000:7.0f} ms   broken {broken} of {LONG_LIVED}   "
                     f"longest pause {pause:5.2f} s   (runs: {', '.join(f'{r[0] * 1000:.0f}' for r in rows)} ms)")
    return lines


# --- 2 hosts against 1 ------------------------------------------------------------------------


def run_throughput(lab: ScaleLab, hosts: list[Host], runs: int, seconds: int, stack: ExitStack) -> list[str]:
    for key, value in CLIENT_SYSCTLS.items():
        nl.set_sysctl(lab.client_ns, key, value)
    start_nginx(lab, stack)
    backend1 = lab.backends[0]
    iperf = subprocess.Popen(ns_cmd(backend1.netns, "iperf3", "-s", "-B", backend1.address, "-p", str(IPERF_PORT)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    stack.callback(stop_process, iperf)
    wait_listening(backend1.netns, backend1.address, IPERF_PORT, iperf, "iperf3")
    time.sleep(2 * 5 + 1)  # the new groups' targets pass their first checks (interval 5 s, threshold 2)
    gbits: dict[str, list[float]] = {"2 hosts": [], "1 host": []}
    conns: dict[str, list[float]] = {"2 hosts": [], "1 host": []}
    errors = 0
    for _ in range(runs):
        for setup in ("2 hosts", "1 host"):
            if setup == "1 host":
                hosts[1].daemon.request("bgp_withdraw")
                wait_next_hops(lab, 1)
            else:
                hosts[1].daemon.request("bgp_announce")
                wait_next_hops(lab, 2)
            gbits[setup].append(measure_iperf(lab.client_ns, VIP, seconds).gbits)
            wrk = measure_wrk(lab.client_ns, VIP, HTTP_VIP_PORT, seconds)
            conns[setup].append(wrk.rps)
            errors += wrk.non_2xx + sum(wrk.socket_errors.values())
    hosts[1].daemon.request("bgp_announce")
    lines = []
    for setup in ("2 hosts", "1 host"):
        lines.append(f"{setup:<8} iperf3 -P 4 {statistics.median(gbits[setup]):6.2f} Gbit/s   "
                     f"wrk new conn/s {statistics.median(conns[setup]):8.0f}   "
                     f"(runs: {', '.join(f'{g:.2f}' for g in gbits[setup])} Gbit/s; "
                     f"{', '.join(f'{c:.0f}' for c in conns[setup])} conn/s)")
    g_ratio = statistics.median(gbits["2 hosts"]) / statistics.median(gbits["1 host"])
    c_ratio = statistics.median(conns["2 hosts"]) / statistics.median(conns["1 host"])
    lines.append(f"2 hosts / 1 host: throughput {g_ratio:.2f}x, new connections {c_ratio:.2f}x "
                 f"(2 CPUs shared by every namespace: this shows the path works, not that it scales)")
    if errors:
        lines.append(f"WARNING: wrk saw {errors} non-2xx responses or socket errors")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measurements per case; the median is shown (default 3)")
    parser.add_argument("--seconds", type=int, default=5, help="length of each iperf3 and wrk run (default 5)")
    parser.add_argument("--only", choices=("failover", "throughput"), help="one half of the bench")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bgp_failover.py needs root (namespaces, XDP, BIRD)", file=sys.stderr)
        return 1
    with ExitStack() as stack:
        lab, hosts = stack.enter_context(ecmp_lab("bench", extra_config=EXTRA))
        took = wait_next_hops(lab, 2)
        print(f"lab up: two hosts announce {VIP} ({took:.2f} s after the second lb up answered)")
        if args.only in (None, "failover"):
            print("\n== failover at the router (2 hosts -> 1) ==")
            for line in run_failover(lab, hosts, args.runs):
                print(line, flush=True)
        if args.only in (None, "throughput"):
            print("\n== 2 hosts against 1, same run ==")
            for line in run_throughput(lab, hosts, args.runs, args.seconds, stack):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)

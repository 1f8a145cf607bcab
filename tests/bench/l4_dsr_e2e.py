"""DSR against NAT and full NAT end to end, on the DSR lab's topology (not a pytest test).

Usage (root; the comparison tools come from `deploy/install.sh --bench`):
    .venv/bin/python tests/bench/l4_dsr_e2e.py
    .venv/bin/python tests/bench/l4_dsr_e2e.py --runs 3 --seconds 5 --only dsr,nat
    .venv/bin/python tests/bench/l4_dsr_e2e.py --family 6

The issue's goal for direct server return: its end-to-end throughput at
least NAT's. tests/bench/l4_e2e.py cannot measure it: in its lab the
backends sit behind lb on links of their own, and DSR needs lb and the
targets on one segment with replies through a router. So this script uses
the DSR lab (lb.lab_dsr, prefix from LB_TEST_PREFIX, "lbd" unless set) and
runs every mode on it:

    client ── router ── switch ─┬─ lb (XDP on its one link)
                                └─ target1..3 (the VIP on lo, ARP suppressed)

    dsr       lb rewrites the destination MAC and sends the frame back onto the
              segment (XDP_TX); targets answer the client through the router
    nat       targets' default route switched to lb for the setup, so their
              replies come back through lb's reverse NAT (the mode's premise)
    full-nat  targets answer lb's own address; nothing else changes
    routing   the client talks to target1's address directly: a reference

--family 6 (or both, the default) measures every mode again over IPv6, in
the same rounds: the client fd30::2 toward the VIP fd30:9::100 (on the
targets' lo too), targets fd30:1::1N, lb fd30:1::2; for nat the targets'
IPv6 default route goes to lb's fd30:1::2.

The same VIP port as the targets' in every mode (DSR cannot translate ports).
HTTP: nginx (2 workers, `return 200`, listening on every address of both
families, so on the VIPs too) on each target in place of the lab's Python
servers; iperf3 on target1 only (its control and data connections must
meet the same server).
Measurements, rounds, medians and the CPU split are tests/bench/l4_e2e.py's
(one stream of iperf3 pinned client/server; wrk -c32 with Connection: close).
iperf3's client sends, so its data crosses lb in every mode and DSR spares
lb only the ACKs; --iperf-reverse (iperf3 -R: target1 sends) measures the
direction DSR takes off lb.

Everything made here is removed in `finally`: the namespaces and processes
in them, the XDP attachment, the pinned maps (/sys/fs/bpf/lb/<prefix>-dsr-e2e).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import signal
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lb import lab_dsr  # noqa: E402
from lb import netlink as nl  # noqa: E402
from lb.dataplane.dataplane import Dataplane, L4Service  # noqa: E402
from lb.dataplane.loader import Attachment, Program, detach, purge_pins  # noqa: E402
from lb.dataplane.maps import Endpoint, Maps, VipAddr  # noqa: E402
from lb.dataplane.structs import Counter, Limits  # noqa: E402
from lb.lab import Lab  # noqa: E402
from lb.lab_dsr import DsrLab  # noqa: E402
from tests.bench.l4_e2e import (  # noqa: E402
    CLIENT_SYSCTLS,
    FAMILIES,
    IPERF_PORT,
    Setup,
    backend_address,
    can_run,
    measure_setup,
    on_sigterm,
    parse_args,
    print_answered_by,
    print_cpu,
    print_table,
    ratio_lines,
    run_iperf_server,
    run_nginx,
    selected,
    warn_of_errors,
)
from tests.names import name  # noqa: E402

PREFIX = name("d") if "LB_TEST_PREFIX" in os.environ else "lbd"
NAME = f"{PREFIX}-dsr-e2e"
LIMITS = Limits(ring_size=65537, max_vips=8, max_targets=64, conntrack_size=262144)
HTTP_PORT = 80  # the VIP's and the targets' (DSR cannot translate ports)
GOAL_DSR_VS_NAT = 1.0


def start_servers(lab: DsrLab, stack: ExitStack, families: tuple[int, ...]) -> None:
    """nginx on each target in place of the lab's server, and iperf3 -s on target1."""
    servers = Lab(lab.prefix, backend_count=len(lab.targets))  # knows how to stop lb.labserver
    for target in lab.targets:
        servers.stop_server(target)  # it holds *:80
        run_nginx(target, HTTP_PORT, PREFIX, stack, every_address=True, families=families)  # its own, the VIPs on lo
    run_iperf_server(lab.targets[0], stack)


def set_default_route(ns: str, family: int, gateway: str) -> None:
    default = "default" if family == 4 else "::/0"
    with nl.iproute(ns) as ipr:
        nl.remove_route(ipr, default)
        nl.add_route(ipr, default, gateway=gateway)


def vip_of(family: int) -> str:
    return lab_dsr.VIP if family == 4 else lab_dsr.VIP6


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], "dsr,nat,full-nat,routing")
    if not can_run("l4_dsr_e2e.py", ("iperf3", "wrk", "nginx")):
        return 1
    signal.signal(signal.SIGTERM, on_sigterm)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"params:  iperf3 -t {args.seconds}{' -R' if args.iperf_reverse else ''} (1 stream) | "
          f"wrk -c32 -t2 -d{args.seconds}s -H 'Connection: close' | "
          f"{args.runs} runs each, median | IPv{' and IPv'.join(map(str, FAMILIES[args.family]))}")
    lab = DsrLab(PREFIX)
    stack = ExitStack()
    try:
        return run_bench(lab, args, stack)
    finally:
        try:
            stack.close()
        finally:
            lab.down()
            purge_pins(NAME)


def run_bench(lab: DsrLab, args: argparse.Namespace, stack: ExitStack) -> int:
    families = FAMILIES[args.family]
    purge_pins(NAME)
    lab.up()
    for key, value in CLIENT_SYSCTLS.items():  # net.ipv4's TCP sysctls govern IPv6 TCP sockets too
        nl.set_sysctl(lab.client_ns, key, value)
    start_servers(lab, stack, families)

    program = stack.enter_context(Program.load(NAME, LIMITS))
    maps = stack.enter_context(Maps(program.pin_dir, LIMITS))
    dataplane = Dataplane(maps, source_of=lambda address: nl.source_toward(address, lab.lb_ns))

    def services(mode: str) -> list[L4Service]:
        """Every family measured, in one mode (as a dual-stack configuration has them)."""
        out = []
        for family in families:
            vip = ipaddress.ip_address(vip_of(family))
            everyone = tuple((Endpoint(ipaddress.ip_address(backend_address(t, family)), HTTP_PORT), 1)
                             for t in lab.targets)
            first = ((Endpoint(ipaddress.ip_address(backend_address(lab.targets[0], family)), IPERF_PORT), 1),)
            out += [L4Service(VipAddr(vip, HTTP_PORT, "TCP"), members=everyone, mode=mode),
                    L4Service(VipAddr(vip, IPERF_PORT, "TCP"), members=first, mode=mode)]
        return out

    attachments: list[Attachment] = []
    counters: dict[str, dict[Counter, int]] = {}
    lb_addr = {4: lab_dsr.LB_ADDR, 6: lab_dsr.LB_ADDR6}
    router_addr = {4: lab_dsr.ROUTER_ADDR, 6: lab_dsr.ROUTER_ADDR6}

    def starter(mode: str, family: int) -> tuple[Callable[[], None], Callable[[], None]]:
        before: dict[Counter, int] = {}

        def start() -> None:
            if mode == "nat":  # NAT's premise: the targets' replies route through lb
                for t in lab.targets:
                    set_default_route(t.netns, family, lb_addr[family])
            dataplane.apply(services(mode))  # a mode change makes the VIPs anew
            attachments.append(program.attach(lab_dsr.LB_IF, lab_dsr.XDP_MODE, lab.lb_ns))
            before.update(maps.counters())

        def stop() -> None:
            after = maps.counters()
            total = counters.setdefault(f"IPv{family} {mode}", {c: 0 for c in Counter})
            for c in Counter:
                total[c] += after[c] - before.get(c, after[c])
            while attachments:
                detach(attachments.pop())
            if mode == "nat":
                for t in lab.targets:
                    set_default_route(t.netns, family, router_addr[family])

        return start, stop

    def detach_all() -> None:
        while attachments:
            detach(attachments.pop())

    stack.callback(detach_all)
    setups = []
    for family in families:
        for mode, title in (("dsr", "lb XDP DSR (MAC rewrite, XDP_TX)"), ("nat", "lb XDP NAT (replies through lb)"),
                            ("full-nat", "lb XDP full NAT")):
            start, stop = starter(mode, family)
            setups.append(Setup(mode, title, vip_of(family), HTTP_PORT, start, stop, family))
        setups.append(Setup("routing", "plain routing (client -> target1)", backend_address(lab.targets[0], family),
                            HTTP_PORT, family=family))
    setups = selected(setups, args.only)

    groups = {nl.netns_inode(lab.client_ns): "client", nl.netns_inode(lab.lb_ns): "lb-ns",
              nl.netns_inode(lab.router_ns): "router"}
    for t in lab.targets:
        groups[nl.netns_inode(t.netns)] = "targets"
    for rnd in range(1, args.runs + 1):  # rounds interleave the setups: a noisy minute spreads over all of them
        for s in setups:
            measure_setup(s, rnd, lab.client_ns, groups, args, lambda s: None)

    print()
    print_table(setups)
    print()
    print_cpu(setups, "tools = wrk, targets = nginx")
    print()
    print_answered_by(setups)
    for mode, total in counters.items():
        shown = ", ".join(f"{c.label} {v:,}" for c, v in total.items() if v)
        print(f"counters, {mode}: {shown}")
    print()
    for family in families:
        by_key = {s.key: s for s in setups if s.family == family}
        dsr = by_key.get("dsr")
        lines = []
        if dsr and "nat" in by_key:
            lines += ratio_lines("DSR / NAT", dsr, by_key["nat"], GOAL_DSR_VS_NAT)
        if dsr and "full-nat" in by_key:
            lines += ratio_lines("DSR / full NAT", dsr, by_key["full-nat"], None)
        if "full-nat" in by_key and "nat" in by_key:
            lines += ratio_lines("full NAT / NAT", by_key["full-nat"], by_key["nat"], None)
        if dsr and "routing" in by_key:
            lines += ratio_lines("DSR / plain routing", dsr, by_key["routing"], None, "(reference)")
        for line in lines:
            print(line)
    warn_of_errors(setups)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)

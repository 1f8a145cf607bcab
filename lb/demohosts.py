"""`python -m lb.demo --hosts 2`: the scale-out lab, end to end.

1. builds the lab with a router (BIRD, ECMP) in front of two lb hosts
   (lb.labhosts), each running `lb up` with the embedded config and its own
   BGP identity, and shows the router's route: one next hop per host;
2. sends new TCP connections through the VIP and shows how the router
   spread them (each host's VIP counters) and where they landed (the
   backends' banners);
3. opens long-lived connections, takes host 1 out of rotation
   (`lb bgp withdraw`) and shows every one of them still answering, now
   through host 2 (to the same backend: both hosts build the same ring), and
   new connections all going to host 2;
4. puts host 1 back (`lb bgp announce`), and takes everything down (`--keep`
   leaves it running).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter

from lb import lab as labmod
from lb.config import default_config_text
from lb.dataplane.pins import open_pinned
from lb.demodaemon import DemoDaemon
from lb.labhosts import LbHost, ScaleLab
from lb.netlink import run_in_netns

LONG_LIVED = 10


def say(title: str) -> None:
    print(f"\n== {title}", flush=True)


def banner() -> str:
    with socket.create_connection((labmod.VIP, labmod.ECHO_PORT), timeout=5) as sock:
        return sock.recv(64).decode().strip()


class HostDaemon(DemoDaemon):
    """`lb up -c lbK.toml` for one host, and its counters."""

    def __init__(self, lab: ScaleLab, host: LbHost, path: str) -> None:
        super().__init__(path, os.path.join(lab.run_dir, f"lb{host.index}.log"), f"lb up on lb{host.index}")
        self.host = host

    def tcp_flows(self) -> int:
        with open_pinned(self.config) as maps:
            return sum(maps.vip_traffic(e.vip_id).new_flows for e in maps.vips()
                       if e.vip.port == labmod.ECHO_PORT and e.vip.protocol == "TCP")


def wait_hops(lab: ScaleLab, count: int, timeout: float = 30) -> float:
    start = time.monotonic()
    while len(lab.vip_next_hops()) != count:
        if time.monotonic() - start > timeout:
            raise SystemExit(f"the router's route has next hops {lab.vip_next_hops()}, not {count}")
        time.sleep(0.02)
    return time.monotonic() - start


def new_connections(lab: ScaleLab, daemons: list[HostDaemon], n: int) -> None:
    before = [d.tcp_flows() for d in daemons]
    seen = Counter(run_in_netns(lab.client_ns, banner) for _ in range(n))
    hosts = ", ".join(f"lb{d.host.index} {d.tcp_flows() - b}" for d, b in zip(daemons, before, strict=True))
    print(f"  {n} new connections: by host (VIP counters) {hosts}; "
          f"by backend {', '.join(f'{k} {seen[k]}' for k in sorted(seen))}")


def run_hosts(hosts: int, keep: bool, prefix: str = "lab") -> int:
    lab = ScaleLab(prefix, hosts=hosts)
    say(f"lab: client -> router (BIRD, ECMP) -> lb1..lb{hosts} -> backend1..3")
    print("built" if lab.up() else "already up", "-", ", ".join(lab.namespaces))
    daemons = [HostDaemon(lab, h, p) for h, p in zip(lab.lb_hosts, lab.write_host_configs(default_config_text()),
                                                     strict=True)]
    try:
        say("lb up on every host (the embedded config, each with its own [load_balancer.bgp])")
        for d in daemons:
            d.start()
        for d in daemons:
            d.wait_ready()
        took = wait_hops(lab, hosts)
        print(f"  the router's route to {labmod.VIP}: next hops {', '.join(lab.vip_next_hops())} "
              f"({took:.1f} s after the last lb up answered)")
        time.sleep(3)  # every target's first checks
        say("new TCP connections through the router")
        new_connections(lab, daemons, 60)

        say(f"{LONG_LIVED} long-lived connections, then lb1 leaves: lb bgp withdraw")
        conns = [run_in_netns(lab.client_ns, lambda: socket.create_connection((labmod.VIP, labmod.ECHO_PORT), 5))
                 for _ in range(LONG_LIVED)]
        owners = [c.recv(64).decode().strip() for c in conns]
        status = daemons[0].request("bgp_withdraw")
        took = wait_hops(lab, hosts - 1)
        print(f"  lb1: in rotation {status['in_rotation']}, announcing {status['announced'] or 'nothing'}; "
              f"the router has next hops {', '.join(lab.vip_next_hops())} after {took * 1000:.0f} ms")
        answers = 0
        for conn, owner in zip(conns, owners, strict=True):
            conn.sendall(b"still there?\n")
            answers += conn.recv(64) == b"still there?\n"
        print(f"  {answers} of {LONG_LIVED} long-lived connections still echo (each at its backend: "
              f"{', '.join(f'{k} {v}' for k, v in sorted(Counter(owners).items()))})")
        for conn in conns:
            conn.close()
        new_connections(lab, daemons, 60)

        say("lb1 comes back: lb bgp announce")
        daemons[0].request("bgp_announce")
        took = wait_hops(lab, hosts)
        print(f"  next hops {', '.join(lab.vip_next_hops())} after {took * 1000:.0f} ms")
        new_connections(lab, daemons, 60)
        print(f"$ lb status -c {daemons[0].path}  (its BGP part)", flush=True)
        subprocess.run([sys.executable, "-m", "lb", "status", "-c", daemons[0].path], check=False)
    finally:
        if not keep:
            say("cleanup")
            for d in daemons:
                d.stop()
            print("lab:", ", ".join(lab.down()) or "nothing", "removed")
    if keep:
        print(f"\nleft running (--keep): stop each lb up (pids in `lb status -c {lab.run_dir}/lbK.toml`), "
              f"`lb down -c ...`, then `lb lab down --prefix {prefix} --hosts {hosts}`")
    return 0

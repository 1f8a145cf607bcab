"""The demo's forwarding modes: DSR and full NAT through a real `lb up`.

NAT, the main demo's mode, needs the targets to route their replies
through lb. The other two do not, and the DSR lab (lb.lab_dsr: lb and the
targets on one segment, replies through a router) shows both with one
`lb up` and two listeners on its VIP:

    dsr       10.30.9.100:80    only the destination MAC rewritten; the targets
                                hold the VIP on lo and answer the client directly
    full-nat  10.30.9.100:8080  source rewritten to lb's address and a port of its
                                own; the targets answer lb

Each line says where the requests went, whom the targets saw (the client,
or lb) and how many replies crossed lb (the program's counters). The lab
and the daemon are always taken down again, --keep or not.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import dataclass

from lb import lab_dsr
from lb.dataplane.pins import open_pinned
from lb.dataplane.structs import Counter as PacketCounter
from lb.demodaemon import DemoDaemon
from lb.lab_dsr import DsrLab
from lb.netlink import run_in_netns

PREFIX = "lab-dsr"  # namespaces lab-dsr-client, lab-dsr-lb, ...; the main demo's lab is "lab"
NAME = "lab-modes"
PORTS = {"dsr": 80, "full-nat": 8080}  # the targets serve HTTP on 80 (DSR cannot translate ports)
REQUESTS = 30
CHECKS = "interval = 5, timeout = 2, healthy_threshold = 2, unhealthy_threshold = 2"


@dataclass(frozen=True)
class ModeResult:
    served: dict[str, int]  # target name -> requests it answered
    seen: list[str]  # the addresses the targets saw connect
    replies_through_lb: int  # reverse_nat + fullnat_reverse during the requests


def config(lab: DsrLab, name: str) -> str:
    targets = "[" + ", ".join(f'{{ id = "{t.address}" }}' for t in lab.targets) + "]"
    text = f"""
[load_balancer]
name = "{name}"
netns = "{lab.lb_ns}"
interfaces = ["{lab_dsr.LB_IF}"]
xdp_mode = "native"
admin_socket = "/run/lb/{name}.sock"
workers = 1
"""
    for mode, port in PORTS.items():
        key = "direct_server_return = true" if mode == "dsr" else "preserve_client_ip = false"
        text += f"""
[[listeners]]
name = "{mode}"
protocol = "TCP"
address = "{lab_dsr.VIP}"
port = {port}
default_action = {{ type = "forward", target_group = "{mode}" }}

[[target_groups]]
name = "{mode}"
protocol = "TCP"
port = 80
{key}
targets = {targets}
health_check = {{ {CHECKS} }}
"""
    return text


def peer(port: int) -> tuple[str, str]:
    """GET /peer through the VIP: (the target's name, the address it saw connect)."""
    with socket.create_connection((lab_dsr.VIP, port), timeout=5) as sock:
        sock.sendall(f"GET /peer HTTP/1.1\r\nHost: {lab_dsr.VIP}\r\nConnection: close\r\n\r\n".encode())
        data = b"".join(iter(lambda: sock.recv(4096), b""))
    name, seen = data.split(b"\r\n\r\n", 1)[1].decode().split()
    return name, seen


def run_modes(prefix: str = PREFIX, name: str = NAME) -> dict[str, ModeResult]:
    """The section, printed; returns what each mode did (tests/test_demo_modes.py)."""
    print(f"\n== the other forwarding modes, on the DSR lab: client {lab_dsr.CLIENT_ADDR} -> router -> "
          f"lb {lab_dsr.LB_ADDR} + targets {lab_dsr.TARGET_ADDRS[0]}-{lab_dsr.TARGET_ADDRS[-1].rsplit('.', 1)[1]} "
          "on one segment", flush=True)
    lab = DsrLab(prefix)
    daemon: DemoDaemon | None = None
    results: dict[str, ModeResult] = {}
    try:
        lab.up()
        path = os.path.join(lab.run_dir, f"{name}.toml")
        with open(path, "w") as f:
            f.write(config(lab, name))
        daemon = DemoDaemon(path, os.path.join(lab.run_dir, f"{name}.log"), f"lb up ({name})")
        daemon.start()
        daemon.wait_ready()
        for mode in PORTS:
            for target in lab.targets:
                daemon.wait_for(mode, target.address, "healthy")
        for mode, port in PORTS.items():
            with open_pinned(daemon.config) as maps:
                before = maps.counters()
            answers = [run_in_netns(lab.client_ns, peer, port) for _ in range(REQUESTS)]
            with open_pinned(daemon.config) as maps:
                after = maps.counters()
            served = Counter(name for name, _ in answers)
            seen = sorted({address for _, address in answers})
            who = {lab_dsr.CLIENT_ADDR: "the client", lab_dsr.LB_ADDR: "lb"}
            replies = sum(after[c] - before[c] for c in (PacketCounter.REVERSE_NAT, PacketCounter.FULLNAT_REVERSE))
            print(f"  {mode:<9} {lab_dsr.VIP}:{port:<5} {REQUESTS} requests: "
                  + ", ".join(f"{n} {served[n]}" for n in sorted(served))
                  + "; targets saw " + ", ".join(f"{a} ({who.get(a, 'neither')})" for a in seen)
                  + f"; replies through lb: {replies}", flush=True)
            results[mode] = ModeResult(dict(served), seen, replies)
    finally:
        if daemon is not None:
            daemon.stop()
        lab.down()
    return results

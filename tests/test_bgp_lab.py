"""Scale-out with real BIRD processes and real namespaces (lb.labhosts):
two lb hosts announce the VIP to a router that spreads it by ECMP.

One lab and two daemons for the module, the tests in order: the router's
next hops follow the hosts; new connections spread over hosts and targets;
a host taken out gracefully breaks no connection; one that dies (its links
down) is routed around by BFD, and the connections it carried resume on the
other host, at the same target (identical rings), with their replies NATed
by whichever host the target's multipath route picks (docs/bgp.md). An
HTTP listener on an IPv6 VIP (served by lb itself: a fixed response) goes
to the router as a /128 over the same IPv4 sessions.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lb import netlink as nl
from lb.lab import VIP
from lb.labhosts import VIP6, ScaleLab
from tests.ecmp_lab import CONVERGE_TIMEOUT, Host, Pumps, ecmp_lab, spread, wait_converged, wait_next_hops

pytestmark = pytest.mark.root

CONNECTIONS = 300
LONG_LIVED = 50
TOLERANCE = 0.25


# An IPv6 VIP: an HTTP listener answering itself (HTTP listeners take IPv6
# addresses; lb serves it with no target, so it is announced while lb is up).
IPV6_LISTENER = f"""
[[listeners]]
name = "web6"
protocol = "HTTP"
address = "{VIP6}"
port = 80
default_action = {{ type = "fixed-response", status_code = 200, body = "v6" }}
"""


@pytest.fixture(scope="module")
def scale() -> Iterator[tuple[ScaleLab, list[Host]]]:
    with ecmp_lab(extra_config=IPV6_LISTENER) as (lab, hosts):
        yield lab, hosts


def lb_json(host: Host, *args: str) -> Any:
    """`lb ARGS -c CONFIG --json`, as an operator runs it."""
    result = subprocess.run([sys.executable, "-m", "lb", *args, "-c", host.daemon.config_path, "--json"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_one_next_hop_per_host(scale: tuple[ScaleLab, list[Host]]) -> None:
    lab, hosts = scale
    took = wait_next_hops(lab, 2)
    assert lab.vip_next_hops() == sorted(h.host.address for h in hosts)
    print(f"\nboth hosts are next hops {took:.2f} s after the second lb up answered")
    bgp = lb_json(hosts[0], "status")["bgp"]  # read from BIRD
    assert bgp["announced"] == [f"{VIP}/32", f"{VIP6}/128"] and bgp["in_rotation"] is True
    assert [(s["neighbor"], s["state"], s["info"]) for s in bgp["sessions"]] == [
        (hosts[0].host.router_address, "up", "Established")]


def wait_next_hops6(lab: ScaleLab, expected: list[str], timeout: float = CONVERGE_TIMEOUT) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if lab.vip_next_hops(VIP6) == expected:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"the router's route to {VIP6} has next hops {lab.vip_next_hops(VIP6)}, not {expected}")


def http_get6(lab: ScaleLab) -> str:
    """One request from the client to the IPv6 VIP, through the router: the body."""

    def run() -> str:
        with socket.create_connection((VIP6, 80), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: vip6\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        head, _, body = data.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200"), head
        return body

    return nl.run_in_netns(lab.client_ns, run)


def test_an_ipv6_vip_over_the_ipv4_sessions(scale: tuple[ScaleLab, list[Host]]) -> None:
    """The /128 reaches the router over the IPv4 sessions (an ipv6 channel, next
    hop each host's IPv6 address on its link), one next hop per host; the
    client reaches the VIP; `lb bgp withdraw` takes both families of a host
    out, `lb bgp announce` puts them back."""
    lab, hosts = scale
    everyone = sorted((h.host.address6 for h in hosts), key=ipaddress.ip_address)
    took = wait_next_hops6(lab, everyone)
    print(f"\nthe /128 has both hosts as next hops {took:.2f} s after the IPv4 ones")
    assert [http_get6(lab) for _ in range(4)] == ["v6"] * 4
    leaving = hosts[0]
    status = lb_json(leaving, "bgp", "withdraw")
    assert status["in_rotation"] is False and status["announced"] == []
    took = wait_next_hops6(lab, [hosts[1].host.address6], timeout=5)
    wait_next_hops(lab, 1, timeout=5)
    print(f"lb bgp withdraw: the /128 withdrawn at the router in {took:.3f} s")
    assert http_get6(lab) == "v6"  # the other host serves it
    status = lb_json(leaving, "bgp", "announce")
    assert status["in_rotation"] is True and status["wanted"] == [VIP, VIP6]
    wait_next_hops6(lab, everyone)
    wait_next_hops(lab, 2)


def test_every_host_builds_the_same_ring(scale: tuple[ScaleLab, list[Host]]) -> None:
    """The per-VIP seed and sorted identities: a flow the router moves finds
    the same target on the other host (no conntrack entry needed)."""
    lab, hosts = scale
    wait_converged(lab, hosts)
    rings = [h.ring() for h in hosts]
    assert len(set(rings[0])) == 3 and "-" not in rings[0]
    assert rings[0] == rings[1]


def test_new_connections_spread_over_hosts_and_targets(scale: tuple[ScaleLab, list[Host]]) -> None:
    lab, hosts = scale
    wait_converged(lab, hosts)
    before = [h.new_flows() for h in hosts]
    reached = spread(lab, CONNECTIONS)
    per_host = [h.new_flows() - b for h, b in zip(hosts, before, strict=True)]
    print(f"\nper host: {per_host}, per target: {dict(reached)}")
    assert sum(per_host) == CONNECTIONS
    for n in per_host:
        assert abs(n - CONNECTIONS / 2) <= TOLERANCE * CONNECTIONS / 2, per_host
    assert sorted(reached) == [b.name for b in lab.backends]
    for n in reached.values():
        assert abs(n - CONNECTIONS / 3) <= TOLERANCE * CONNECTIONS / 3, reached


def test_graceful_withdraw_breaks_nothing(scale: tuple[ScaleLab, list[Host]]) -> None:
    """lb bgp withdraw, the backends' next hop through the host down, lb down:
    the host's flows go on through the other host, at their targets."""
    lab, hosts = scale
    leaving = hosts[0]
    wait_converged(lab, hosts)
    with Pumps(lab, LONG_LIVED) as pumps:
        assert pumps.wait_all_moving(5)
        status = lb_json(leaving, "bgp", "withdraw")
        assert status["in_rotation"] is False and status["announced"] == []
        took = wait_next_hops(lab, 1, timeout=5)
        assert lab.vip_next_hops() == [hosts[1].host.address]
        leaving.leave_backends()
        leaving.stop()  # SIGTERM, lb down
        moving = pumps.wait_all_moving(5)
        broken = pumps.broken()
        print(f"\ngraceful: withdrawn at the router in {took:.3f} s; {len(broken)} of {LONG_LIVED} broken; "
              f"longest pause {pumps.recovery():.2f} s")
        assert not broken, [p.error for p in broken]
        assert moving
    # The host comes back: its BGP session and route return.
    leaving.links(True)
    leaving.start()
    took = wait_next_hops(lab, 2)
    print(f"back to two next hops {took:.2f} s after lb up answered")


def test_lb_up_without_bird_is_refused_and_leaves_nothing(scale: tuple[ScaleLab, list[Host]]) -> None:
    lab, hosts = scale
    host = hosts[0]
    host.stop()
    wait_next_hops(lab, 1)
    host.host.bird.stop()
    try:
        with pytest.raises(AssertionError, match=r"(?s)exited with 1.*load_balancer.bgp: BIRD's control socket "
                                                 r".*lb1.ctl does not exist: is BIRD running\?"):
            host.start()
        assert not os.path.exists(f"/run/lb/{host.daemon.name}.json")
        assert not os.path.exists(f"/sys/fs/bpf/lb/{host.daemon.name}")
        with nl.iproute(host.host.netns) as ipr:
            assert nl.find_address(ipr, VIP) is None
            assert all(nl.xdp_info(ipr, i)[1] is None for i in lab.lb_interfaces)
        assert os.listdir(host.host.bird.fragment_dir) == []
    finally:
        host.host.bird.start(f"router id {host.host.address};\nprotocol device {{ scan time 1; }}\n"
                             f"{host.host.bird.include_line()}\n")
    host.start()
    wait_next_hops(lab, 2)


def test_every_target_unhealthy_withdraws(scale: tuple[ScaleLab, list[Host]]) -> None:
    """withdraw_when_unhealthy (the default): with no healthy target behind
    the VIP a host stops attracting its traffic; back when one is healthy."""
    lab, hosts = scale
    wait_converged(lab, hosts)
    try:
        for b in lab.backends:
            lab.stop_server(b)
        took = wait_next_hops(lab, 0, timeout=30)
        print(f"\nevery target down: withdrawn by both hosts after {took:.1f} s (checks every 5 s, 2 failures)")
    finally:
        for b in lab.backends:
            lab.start_server(b)
    took = wait_next_hops(lab, 2, timeout=30)
    print(f"targets back: announced again after {took:.1f} s")


def test_kill_9_keeps_the_route_until_lb_down(scale: tuple[ScaleLab, list[Host]]) -> None:
    """A daemon killed with SIGKILL cannot withdraw: its XDP program goes on
    serving L4 flows, so the route stays; `lb down` then withdraws first."""
    lab, hosts = scale
    host = hosts[0]
    wait_converged(lab, hosts)
    host.daemon.stop(signal.SIGKILL)
    time.sleep(1)
    assert len(lab.vip_next_hops()) == 2
    assert sum(spread(lab, 30).values()) == 30  # both hosts still forward
    host.daemon.down()
    wait_next_hops(lab, 1, timeout=5)
    host.start()
    wait_next_hops(lab, 2)


@pytest.mark.parametrize("how", ["link-down", "silent"])
def test_hard_failure(scale: tuple[ScaleLab, list[Host]], how: str) -> None:
    """A host dies. link-down: its links lose carrier, the router's BIRD sees
    its interface go. silent: the router's link stays up (a switch between),
    BFD (100 ms × 3) takes the route away. Either way the connections it
    carried resume on the other host, at their targets."""
    lab, hosts = scale
    dying = hosts[1]
    wait_converged(lab, hosts)
    with Pumps(lab, LONG_LIVED) as pumps:
        assert pumps.wait_all_moving(5)
        down_at = time.monotonic()
        dying.links(False) if how == "link-down" else dying.die_silently()
        wait_next_hops(lab, 1, timeout=CONVERGE_TIMEOUT)
        took = time.monotonic() - down_at
        moving = pumps.wait_all_moving(10)
        broken = pumps.broken()
        print(f"\nhard ({how}, BFD): route withdrawn at the router {took:.3f} s after the failure; "
              f"{len(broken)} of {LONG_LIVED} broken; longest pause of a connection {pumps.recovery():.2f} s")
        assert not broken, [p.error for p in broken]
        assert moving
    dying.revive()
    wait_next_hops(lab, 2)

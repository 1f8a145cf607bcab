"""The scale-out lab with an `lb up` on every host, for tests/test_bgp_lab.py
and tests/bench/bgp_failover.py: next hops at the router, long-lived
connections that count their breaks, new connections spread over hosts.
"""

from __future__ import annotations

import collections
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from lb import config as configmod
from lb import inspect
from lb import netlink as nl
from lb.inspect.access import open_maps
from lb.lab import ECHO_PORT, VIP
from lb.labhosts import LbHost, ScaleLab
from tests.daemon_fixture import RunningDaemon, lab_config
from tests.labclient import read_line, tcp_connect
from tests.names import name

CONVERGE_TIMEOUT = 15.0  # seconds for a BGP session to come up and the router to install its route


def wait_next_hops(lab: ScaleLab, count: int, timeout: float = CONVERGE_TIMEOUT) -> float:
    """Seconds until the router's VIP route has `count` next hops."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if len(lab.vip_next_hops()) == count:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"the router's route to {VIP} has next hops {lab.vip_next_hops()}, not {count}, "
                         f"after {timeout:g} s")


def wait_converged(lab: ScaleLab, hosts: list[Host], timeout: float = 30.0) -> None:
    """Every host announces and sees every target healthy: the rings agree
    (docs/bgp.md: hosts that disagree on health build different rings)."""
    wait_next_hops(lab, len(hosts), timeout)
    for h in hosts:
        for b in lab.backends:
            h.daemon.wait_for("echo-tcp", b.address, "healthy", timeout)


@dataclass
class Host:
    """One lb host of the lab and its daemon."""

    lab: ScaleLab
    host: LbHost
    daemon: RunningDaemon
    config_text: str

    def start(self) -> None:
        self.daemon.write_config(self.config_text)
        self.daemon.start()

    def reconfigure(self, text: str) -> None:
        """A new config, by `lb reload` (BGP settings reload; BIRD restarts the session)."""
        self.config_text = text
        self.daemon.write_config(text)
        self.daemon.request("reload")

    def stop(self) -> None:
        """SIGTERM (BGP withdrawn first), then `lb down`."""
        self.daemon.stop()
        self.daemon.down()

    def stats(self) -> dict[str, object]:
        return inspect.stats(configmod.load(self.daemon.config_path))

    def new_flows(self) -> int:
        rows = self.stats()["vips"]
        assert isinstance(rows, list)
        return sum(int(r["new_flows"]) for r in rows if r["port"] == ECHO_PORT and r["protocol"] == "TCP")

    def ring(self) -> list[str]:
        """The echo VIP's live Maglev ring, as target endpoints (ids differ by host)."""
        with open_maps(configmod.load(self.daemon.config_path), "ring") as maps:
            endpoints = {t.target_id: str(t.endpoint) for t in maps.targets()}
            entry = next(e for e in maps.vips() if e.vip.port == ECHO_PORT and e.vip.protocol == "TCP")
            return [endpoints.get(i, "-") for i in maps.read_ring(entry.vip_id, entry.ring)]

    def links(self, up: bool) -> None:
        """All of the host's links up or down: a host that dies (hard), or comes back."""
        self.lab.set_links(self.host, up)

    def die_silently(self) -> None:
        """The host stops (a kernel hang, power): its links to the backends lose
        carrier (they are direct), but the router's stays up, as behind a switch:
        the router drops everything to and from it, and must notice by BFD or
        the hold timer."""
        ifname = self.host.router_ifname
        table = f"inet dead_{ifname.replace('-', '_')}"
        rules = f"add table {table}\n"
        for chain, hook, match in (("cin", "input", "iifname"), ("cout", "output", "oifname"),
                                   ("cfwd", "forward", "iifname"), ("cfwd", "forward", "oifname")):
            rules += f"add chain {table} {chain} {{ type filter hook {hook} priority 0; }}\n"
            rules += f'add rule {table} {chain} {match} "{ifname}" drop\n'
        subprocess.run(["ip", "netns", "exec", self.lab.router_ns, "nft", "-f", "-"], input=rules, text=True,
                       check=True)
        self.leave_backends()

    def revive(self) -> None:
        ifname = self.host.router_ifname
        subprocess.run(["ip", "netns", "exec", self.lab.router_ns, "nft", "delete", "table", "inet",
                        f"dead_{ifname.replace('-', '_')}"], check=False, capture_output=True)
        self.links(True)

    def leave_backends(self) -> None:
        """The backends stop sending replies through this host (their next hop
        through it goes link-down): what nat mode needs before `lb down`."""
        self.lab.set_links(self.host, False, tuple(b.lb_ifname for b in self.lab.backends))


@contextmanager
def ecmp_lab(prefix_suffix: str = "ecmp", hosts: int = 2, bfd: bool = True, hold_time: int = 3,
             start: bool = True, extra_config: str = "") -> Iterator[tuple[ScaleLab, list[Host]]]:
    """The lab built, an `lb up` per host (a TCP echo VIP over the three
    backends, and `extra_config`'s listeners), all torn down at the end
    whatever happens."""
    lab = ScaleLab(name(prefix_suffix), hosts=hosts)
    lab.down()
    lab.up()
    members: list[Host] = []
    try:
        for h in lab.lb_hosts:
            base = lab_config(lab, lab.host_name(h), echo_targets=3, netns=False) + extra_config
            text = lab.host_config(base, h, bfd=bfd, hold_time=hold_time)
            members.append(Host(lab, h, RunningDaemon(lab, lab.host_name(h), text), text))
        if start:
            for m in members:
                m.start()
        yield lab, members
    finally:
        for m in members:
            m.daemon.cleanup()
        lab.down()


# --- traffic -------------------------------------------------------------------------


def spread(lab: ScaleLab, count: int) -> collections.Counter[str]:
    """`count` new TCP connections from the client: which backend each reached."""
    reached: collections.Counter[str] = collections.Counter()

    def run() -> None:
        for _ in range(count):
            with socket.create_connection((VIP, ECHO_PORT), timeout=5) as sock:
                reached[read_line(sock)] += 1

    nl.run_in_netns(lab.client_ns, run)
    return reached


@dataclass
class Pump:
    """One long-lived connection: a line every `interval`, its echo awaited."""

    sock: socket.socket
    target: str
    interval: float = 0.1
    exchanged: int = 0
    error: str | None = None
    last_ok: float = field(default_factory=time.monotonic)
    longest_gap: float = 0.0  # seconds between two successful exchanges

    def run(self, stop: threading.Event) -> None:
        i = 0
        while not stop.is_set():
            line = f"tick {i}"
            try:
                self.sock.sendall(f"{line}\n".encode())
                answer = read_line(self.sock)
                if answer != line:
                    raise ConnectionError(f"sent {line!r}, echoed {answer!r}")
            except (OSError, ConnectionError) as exc:
                self.error = repr(exc)
                return
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - self.last_ok)
            self.last_ok = now
            self.exchanged += 1
            i += 1
            stop.wait(self.interval)


class Pumps:
    """`count` long-lived connections through the VIP, each in its own thread."""

    def __init__(self, lab: ScaleLab, count: int, timeout: float = 10.0) -> None:
        self.pumps = []
        for _ in range(count):
            sock = tcp_connect(lab.client_ns, VIP, ECHO_PORT, timeout=timeout)
            self.pumps.append(Pump(sock, read_line(sock)))
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=p.run, args=(self._stop,), daemon=True) for p in self.pumps]

    def __enter__(self) -> Pumps:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        for p in self.pumps:
            p.sock.close()

    def broken(self) -> list[Pump]:
        return [p for p in self.pumps if p.error is not None]

    def recovery(self) -> float:
        """The longest any connection went without an exchange (seconds)."""
        return max(p.longest_gap for p in self.pumps)

    def all_moving(self, since: float) -> bool:
        return all(p.error is None and p.last_ok > since for p in self.pumps)

    def wait_all_moving(self, timeout: float) -> bool:
        """True once every connection has exchanged since now."""
        since = time.monotonic()
        deadline = since + timeout
        while time.monotonic() < deadline:
            if self.all_moving(since) or any(p.error for p in self.pumps):
                break
            time.sleep(0.05)
        return self.all_moving(since)

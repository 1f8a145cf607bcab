"""L4 flows that follow TCP's life, as real `lb up` runs on the lab.

- kill -9, `lb up` again, `lb down`: the VIP address lb placed goes, an
  address the operator placed stays;
- a client with 1000 source ports opens 200 connections/s while a target
  dies: once it is unhealthy, no connection is refused (a port used again
  must not follow its old flow to the dead target), and back, it gets new
  flows again;
- a spoofed flood (ACK, RST, FIN+ACK and SYN from random sources, enough to
  fill the flow table) leaves an idle and a busy connection working, also
  while targets join and leave the ring.

Each test runs its own `lb up` (its own pinned maps); the lab is the session's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2.netns import setns

from lb import lab as labmod
from lb import netlink as nl
from lb.dataplane.structs import Limits
from lb.lab import Lab
from tests.daemon_fixture import CHECKS, RunningDaemon, StreamPump, forwarded, lab_config, target_list
from tests.labclient import read_line, tcp_connect
from tests.names import name

pytestmark = pytest.mark.root

CHECK_INTERVAL = 5  # lab_config's health checks: interval 5 s, thresholds 2
OPERATOR_ADDR = "10.0.0.101"  # inside the client subnet: lb would place it on to-client


def lb_ns_addresses(lab: Lab) -> set[str]:
    with nl.iproute(lab.lb_ns) as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}


def banner_through(lab: Lab, address: str = labmod.VIP) -> str:
    with tcp_connect(lab.client_ns, address, labmod.ECHO_PORT, timeout=3) as sock:
        return read_line(sock)


@pytest.fixture
def operator_address(lab: Lab) -> Iterator[str]:
    """An address the operator put on the lb host before lb started."""
    with nl.iproute(lab.lb_ns) as ipr:
        nl.add_address(ipr, labmod.LB_CLIENT_IF, OPERATOR_ADDR, 32)
    try:
        yield OPERATOR_ADDR
    finally:
        with nl.iproute(lab.lb_ns) as ipr:
            nl.remove_address(ipr, labmod.LB_CLIENT_IF, OPERATOR_ADDR, 32)


def test_kill_9_restart_and_down_remove_the_vip_but_not_the_operators_address(lab: Lab,
                                                                              operator_address: str) -> None:
    lb_name = name("own")
    text = lab_config(lab, lb_name) + forwarded("operator-tcp", "TCP", labmod.ECHO_PORT, target_list(lab.backends),
                                                f"{{ {CHECKS} }}", address=operator_address)
    daemon = RunningDaemon(lab, lb_name, text)
    try:
        assert labmod.VIP not in lb_ns_addresses(lab)
        daemon.start()
        assert {labmod.VIP, operator_address} <= lb_ns_addresses(lab)
        daemon.stop(signal.SIGKILL)
        daemon.start()  # finds both addresses present: one is its own
        assert banner_through(lab) and banner_through(lab, operator_address)
        assert daemon.stop() == 0
        down = subprocess.run([sys.executable, "-m", "lb", "down", "-c", daemon.config_path, "--json"],
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        assert json.loads(down.stdout)["addresses_removed"] == [labmod.VIP]
        left = lb_ns_addresses(lab)
        assert labmod.VIP not in left  # else the host answers the VIP itself, with RSTs
        assert operator_address in left
    finally:
        daemon.cleanup()
        with nl.iproute(lab.lb_ns) as ipr:  # what a failed run left: the lab is shared by the session
            nl.remove_address(ipr, labmod.LB_CLIENT_IF, labmod.VIP, 32)


# --- new connections from a client with 1000 source ports ---------------------------

CLIENT_PORTS = range(26000, 27000)  # below the ephemeral range: no other socket holds one
RATE = 200.0  # new connections per second


@dataclass(frozen=True)
class Attempt:
    at: float  # time.monotonic() when connect() began
    port: int
    backend: str | None  # the banner, when the exchange completed
    error: str | None


class NewConnections(threading.Thread):
    """New TCP connections to the VIP at RATE per second from the client
    namespace, the source port going round CLIENT_PORTS as a client whose
    port range is 1000 wide: each port comes back every 5 s. Each is a whole
    exchange (banner, one echo) closed with an RST, so the client holds no
    TIME_WAIT and can use the port again at once; lb sees the port again."""

    def __init__(self, lab: Lab, seconds: float) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.seconds = seconds  # the loop ends by itself after this
        self.attempts: list[Attempt] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        setns(self.lab.client_ns, flags=0)  # this thread only
        start = next_at = time.monotonic()
        i = 0
        while not self._stop_event.is_set() and time.monotonic() - start < self.seconds:
            port = CLIENT_PORTS[i % len(CLIENT_PORTS)]
            i += 1
            at = time.monotonic()
            try:
                self.attempts.append(Attempt(at, port, self._exchange(port), None))
            except (OSError, AssertionError) as exc:
                self.attempts.append(Attempt(at, port, None, type(exc).__name__))
            next_at += 1 / RATE
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1:
                next_at = time.monotonic()  # fell behind (a loaded machine): no burst to catch up

    @staticmethod
    def _exchange(port: int) -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: RST
            sock.settimeout(2)
            sock.bind((labmod.CLIENT_ADDR, port))
            sock.connect((labmod.VIP, labmod.ECHO_PORT))
            backend = read_line(sock)
            sock.sendall(b"ping\n")
            assert read_line(sock) == "ping"
            return backend

    def since(self, t: float) -> list[Attempt]:
        return [a for a in list(self.attempts) if a.at >= t]

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def summary(attempts: list[Attempt]) -> str:
    failed = [a for a in attempts if a.error]
    kinds = Tally(a.error for a in failed)
    share = 100 * len(failed) / len(attempts) if attempts else 0.0
    return f"{len(failed)} of {len(attempts)} failed ({share:.1f} %): {dict(kinds)}"


@contextmanager
def running(lab: Lab, suffix: str, *, echo_targets: int = 3, deregistration_delay: int = 10) -> Iterator[RunningDaemon]:
    """`lb up` with the lab's TCP echo VIP, every target healthy."""
    lb_name = name(suffix)
    daemon = RunningDaemon(lab, lb_name, lab_config(lab, lb_name, echo_targets=echo_targets,
                                                   deregistration_delay=deregistration_delay))
    try:
        daemon.start()
        for backend in lab.backends[:echo_targets]:
            daemon.wait_for("echo-tcp", backend.address, "healthy", timeout=CHECK_INTERVAL * 2 + 3)
        yield daemon
    finally:
        daemon.cleanup()


def test_a_dead_target_refuses_no_connection_once_unhealthy_and_gets_flows_when_back(lab: Lab) -> None:
    victim = lab.backends[1]
    with running(lab, "dead") as daemon:
        client = NewConnections(lab, seconds=70)  # stopped below; a bound if the test is stuck
        client.start()
        try:
            time.sleep(len(CLIENT_PORTS) / RATE + 1)  # every port used once: lb has seen each
            assert victim.name in {a.backend for a in client.attempts}
            killed_at = time.monotonic()
            lab.stop_server(victim)
            daemon.wait_for("echo-tcp", victim.address, "unhealthy", timeout=CHECK_INTERVAL * 3 + 3)
            # The reconcile follows the state change at once (call_soon); 0.5 s covers its ring write.
            out_at = time.monotonic() + 0.5
            deadline = out_at + 10
            while len(client.since(out_at)) < 1.5 * len(CLIENT_PORTS) and time.monotonic() < deadline:
                time.sleep(0.1)  # every port comes back at least once
            after = client.since(out_at)
            lab.start_server(victim)
            daemon.wait_for("echo-tcp", victim.address, "healthy", timeout=CHECK_INTERVAL * 3 + 3)
            back_at = time.monotonic() + 0.5
            time.sleep(3.5)
        finally:
            client.stop()
            if not lab.status()["servers"][victim.name]:
                lab.start_server(victim)  # the session's lab, whole again
    before = [a for a in client.attempts if killed_at <= a.at < out_at]
    print(f"from the kill until 0.5 s after it was seen unhealthy: {summary(before)}")
    print(f"after it was marked unhealthy: {summary(after)}")
    assert len(after) >= len(CLIENT_PORTS), f"the client made only {len(after)} connections"  # every port reused
    assert not [a for a in after if a.error], summary(after)
    returned = client.since(back_at)
    assert not [a for a in returned if a.error], summary(returned)
    assert victim.name in {a.backend for a in returned}, Tally(a.backend for a in returned)


# --- a spoofed flood ----------------------------------------------------------------

# No config key sizes the flow table: the flood fills the default one. Half
# its packets are SYNs: at least one new flow per conntrack entry even if
# lb keeps state for SYNs only.
FLOOD_PACKETS = 2 * Limits().conntrack_size
FLOOD_PPS = 150_000  # per sending CPU
REPO = Path(__file__).resolve().parents[1]


def link_mac(ns: str, ifname: str) -> str:
    with nl.iproute(ns) as ipr:
        return str(ipr.get_links(nl.ifindex(ipr, ifname))[0].get_attr("IFLA_ADDRESS"))


def link_rx_packets(ns: str, ifname: str) -> int:
    with nl.iproute(ns) as ipr:
        return int(ipr.get_links(nl.ifindex(ipr, ifname))[0].get_attr("IFLA_STATS64")["rx_packets"])


class Flood:
    """tests/flood.py on every CPU (the flow table has an LRU list per CPU:
    BPF_F_NO_COMMON_LRU), from the client namespace to the TCP VIP."""

    def __init__(self, lab: Lab, packets: int, seconds: float) -> None:
        self.lab = lab
        cpus = sorted(os.sched_getaffinity(0))
        macs = ["--src-mac", link_mac(lab.client_ns, labmod.HOST_IF),
                "--dst-mac", link_mac(lab.lb_ns, labmod.LB_CLIENT_IF)]
        self.rx_before = link_rx_packets(lab.lb_ns, labmod.LB_CLIENT_IF)
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "tests.flood", "--netns", lab.client_ns, "--ifname", labmod.HOST_IF, *macs,
             "--vip", labmod.VIP, "--port", str(labmod.ECHO_PORT), "--count", str(packets // len(cpus)),
             "--pps", str(FLOOD_PPS), "--seconds", str(seconds), "--cpu", str(cpu)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cpu in cpus]
        self.sent = 0
        self.received = 0

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float = 60) -> int:
        """Packets sent; also sets `received`: what the lb's interface took in meanwhile."""
        for proc in self.procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err
            self.sent += json.loads(out)["sent"]
        self.received = link_rx_packets(self.lab.lb_ns, labmod.LB_CLIENT_IF) - self.rx_before
        return self.sent

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()  # the sender stops after its batch
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def spoofed_flood(lab: Lab, packets: int = FLOOD_PACKETS, seconds: float = 30) -> Iterator[Flood]:
    flood = Flood(lab, packets, seconds)
    try:
        yield flood
    finally:
        flood.stop()


def idle_connections(lab: Lab, count: int) -> list[tuple[socket.socket, str]]:
    """`count` connections to the VIP, each with the backend that greeted it."""
    opened: list[tuple[socket.socket, str]] = []
    try:
        for _ in range(count):
            sock = tcp_connect(lab.client_ns, labmod.VIP, labmod.ECHO_PORT, timeout=5)
            opened.append((sock, read_line(sock)))
    except BaseException:
        for sock, _ in opened:
            sock.close()
        raise
    return opened


def echoed(sock: socket.socket, line: str) -> str:
    """What came back for `line` (the echo backend's bytes), or what went wrong."""
    try:
        sock.sendall(f"{line}\n".encode())
        return read_line(sock)
    except OSError as exc:
        return f"<{type(exc).__name__}>"


def broken(idle: list[tuple[socket.socket, str]], what: str) -> list[str]:
    """The idle connections that do not echo any more, with their backends."""
    answers = [(backend, echoed(sock, f"{what} {i}"), f"{what} {i}") for i, (sock, backend) in enumerate(idle)]
    return [f"{backend}: {got!r}" for backend, got, want in answers if got != want]


def test_idle_and_busy_connections_survive_a_spoofed_flood(lab: Lab) -> None:
    """With the ring unchanged, a flow the flood pushed out of the table
    hashes back onto the same target: this one guards that the flood (and
    what stands up to it) disturbs no live connection; the next test adds
    the ring change under which a lost entry shows."""
    with running(lab, "flood") as daemon:
        idle = idle_connections(lab, 12)
        busy = tcp_connect(lab.client_ns, labmod.VIP, labmod.ECHO_PORT, timeout=10)
        pump = StreamPump(busy)
        try:
            read_line(busy)
            pump.start()
            with spoofed_flood(lab) as flood:
                before = pump.exchanged
                flood.wait()
            during = pump.exchanged - before
            time.sleep(0.5)
            pump.stop()
            lost = broken(idle, "after the flood")
        finally:
            pump.stop()
            busy.close()
            for sock, _ in idle:
                sock.close()
        assert daemon.request("status")  # the daemon lived through it
    print(f"flood: {flood.sent} sent, {flood.received} received by the lb; busy: {during} exchanges during it")
    assert flood.sent >= FLOOD_PACKETS * 0.95 and flood.received >= flood.sent * 0.9
    assert not pump.errors and during > 0, pump.errors
    assert not lost, f"{len(lost)} of {len(idle)} idle connections broken by the flood: {lost}"


def test_connections_survive_a_flood_while_targets_leave_and_join_the_ring(lab: Lab) -> None:
    """backend3 joins the ring mid-flood (registered, then healthy) and the
    backend of the first idle connection leaves it (deregistered: draining,
    its flows go on). A flow whose table entries the flood pushed out would
    be hashed onto the changed ring, to a target that does not know it."""
    joining = lab.backends[2]
    with running(lab, "ring", echo_targets=2, deregistration_delay=300) as daemon:
        idle = idle_connections(lab, 24)
        leaving = next(b for b in lab.backends if b.name == idle[0][1])
        busy = tcp_connect(lab.client_ns, labmod.VIP, labmod.ECHO_PORT, timeout=10)
        pump = StreamPump(busy)
        try:
            read_line(busy)
            pump.start()
            with spoofed_flood(lab, packets=2 * FLOOD_PACKETS) as flood:
                time.sleep(1)
                daemon.request("register", group="echo-tcp", target=joining.address)
                daemon.request("deregister", group="echo-tcp", target=leaving.address)
                daemon.wait_for("echo-tcp", joining.address, "healthy", timeout=CHECK_INTERVAL * 3 + 3)
                assert flood.running(), "the flood ended before the ring changed"
                flood.wait()
            pump.stop()
            lost = broken(idle, "after the ring changed")
        finally:
            pump.stop()
            busy.close()
            for sock, _ in idle:
                sock.close()
    print(f"flood: {flood.sent} sent, {flood.received} received by the lb; busy: {pump.exchanged} exchanges")
    assert flood.sent >= FLOOD_PACKETS and flood.received >= flood.sent * 0.9
    assert not pump.errors, pump.errors
    assert not lost, f"{len(lost)} of {len(idle)} idle connections broken by the flood and the ring change: {lost}"

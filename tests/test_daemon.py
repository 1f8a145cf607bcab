"""`lb up` for real: health checks moving targets in and out of the XDP ring,
draining, reload, restart without loss, and the admin socket's guard."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb import config as configmod
from lb import lab as labmod
from lb.dataplane.maps import VipAddr
from lb.dataplane.pins import open_pinned
from lb.lab import Lab
from lb.netlink import run_in_netns
from lb.runstate import lock_path
from tests import labclient
from tests.daemon_fixture import RunningDaemon, StreamPump, lab_config
from tests.labclient import read_line
from tests.names import name

pytestmark = pytest.mark.root

NAME = name("d")
INTERVAL, UNHEALTHY, HEALTHY = 5, 2, 2


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    running = RunningDaemon(lab, NAME, lab_config(lab, NAME, udp=True, http=True))
    try:
        running.start()
        for backend in lab.backends:
            running.wait_for("echo-tcp", backend.address, "healthy", timeout=INTERVAL * 2 + 2)
            running.wait_for("web", backend.address, "healthy", timeout=INTERVAL * 2 + 2)
        yield running
    finally:
        running.cleanup()


def tcp_to_vip(lab: Lab, timeout: float = 3.0) -> socket.socket:
    return labclient.tcp_connect(lab.client_ns, labmod.VIP, labmod.ECHO_PORT, timeout)


def echo(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed mid-echo")
        received += chunk
    assert received == payload


def http_get(lab: Lab, path: str = "/", timeout: float = 3.0) -> tuple[int, str | None]:
    """One request through the HTTP listener: (status, the backend that answered)."""
    status, headers, _ = labclient.http_get(lab.client_ns, labmod.VIP, labmod.HTTP_PORT, path, timeout=timeout)
    return status, headers.get("x-backend")


class ClientLoop(threading.Thread):
    """New TCP connections through the VIP and HTTP requests through the HTTP
    listener, back to back, each a full exchange."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.results: list[tuple[float, str | None, str | None]] = []  # (time, backend, error)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            at = time.monotonic()
            try:
                with tcp_to_vip(self.lab, timeout=2) as sock:
                    name = read_line(sock)
                    echo(sock, b"hello\n")
                self.results.append((at, name, None))
            except OSError as exc:
                self.results.append((at, None, f"tcp: {exc!r}"))
            at = time.monotonic()
            try:
                status, backend = http_get(self.lab)
                self.results.append((at, backend, None if status == 200 else f"http: {status} from {backend}"))
            except OSError as exc:
                self.results.append((at, None, f"http: {exc!r}"))
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def ring_target_addresses(daemon: RunningDaemon, vip: VipAddr) -> set[str]:
    config = configmod.load(daemon.config_path)
    with open_pinned(config) as maps:
        entry = next(e for e in maps.vips() if e.vip == vip)
        ids = set(maps.read_ring(entry.vip_id, entry.ring))
        return {str(t.endpoint.address) for t in maps.targets() if t.target_id in ids}


def test_dead_backend_is_detected_taken_out_and_brought_back(daemon: RunningDaemon, lab: Lab) -> None:
    victim = lab.backends[1]
    vip = VipAddr(ipaddress.IPv4Address(labmod.VIP), labmod.ECHO_PORT, "TCP")
    assert victim.address in ring_target_addresses(daemon, vip)
    loop = ClientLoop(lab)
    loop.start()
    try:
        time.sleep(1)
        killed_at = time.monotonic()
        lab.stop_server(victim)
        detect = daemon.wait_for("echo-tcp", victim.address, "unhealthy", timeout=INTERVAL * (UNHEALTHY + 1) + 3)
        daemon.wait_for("web", victim.address, "unhealthy", timeout=INTERVAL * (UNHEALTHY + 1) + 3)
        detected_at = time.monotonic()  # both target groups have taken it out by now
        bound = INTERVAL * UNHEALTHY + INTERVAL + 1.5  # interval × threshold, plus one interval
        assert detect <= bound and detected_at - killed_at <= bound
        row = daemon.targets("echo-tcp")[victim.address]
        assert row["reason"] in ("Target.FailedHealthChecks", "Target.Timeout")
        time.sleep(0.5)
        assert victim.address not in ring_target_addresses(daemon, vip)

        lab.start_server(victim)
        back = daemon.wait_for("echo-tcp", victim.address, "healthy", timeout=INTERVAL * (HEALTHY + 1) + 3)
        assert back <= INTERVAL * HEALTHY + INTERVAL + 1.5
        time.sleep(1.5)
    finally:
        loop.stop()
    assert victim.address in ring_target_addresses(daemon, vip)
    failures = [(at, err) for at, _, err in loop.results if err]
    # Only connections to the dead backend before it was detected may fail.
    assert all(killed_at - 0.1 <= at <= detected_at + 1.0 for at, _ in failures), failures
    served = [name for at, name, _ in loop.results if name and at > detected_at + 1.0]
    assert served and victim.name in {name for at, name, _ in loop.results[-40:] if name}
    assert {err.split(":")[0] for _, err in failures} <= {"tcp", "http"}


def test_deregistered_target_drains_its_connection_and_gets_no_new_ones(daemon: RunningDaemon, lab: Lab) -> None:
    long_lived = tcp_to_vip(lab)
    try:
        owner_name = read_line(long_lived)
        owner = next(b for b in lab.backends if b.name == owner_name)
        daemon.request("deregister", group="echo-tcp", target=owner.address)
        assert daemon.targets("echo-tcp")[owner.address]["state"] == "draining"
        assert daemon.targets("echo-tcp")[owner.address]["reason"] == "Target.DeregistrationInProgress"
        # The reconcile that takes it out of the ring runs after the answer.
        vip = VipAddr(ipaddress.IPv4Address(labmod.VIP), labmod.ECHO_PORT, "TCP")
        deadline = time.monotonic() + 5
        while owner.address in ring_target_addresses(daemon, vip):
            assert time.monotonic() < deadline, "the deregistered target stayed in the ring"
            time.sleep(0.05)
        for i in range(30):
            with tcp_to_vip(lab) as sock:
                assert read_line(sock) != owner_name
            echo(long_lived, f"still draining {i}\n".encode())
        time.sleep(2)
        echo(long_lived, b"done\n")  # the long-lived connection completes
    finally:
        long_lived.close()
    daemon.wait_for("echo-tcp", owner.address, "unused", timeout=15)
    daemon.request("register", group="echo-tcp", target=owner.address)
    daemon.wait_for("echo-tcp", owner.address, "healthy", timeout=INTERVAL * 2 + 3)


def test_reload_rejects_a_broken_config_and_applies_a_good_one(daemon: RunningDaemon, lab: Lab) -> None:
    from lb import admin

    original = Path(daemon.config_path).read_text()
    long_lived = tcp_to_vip(lab)
    try:
        read_line(long_lived)
        before = daemon.request("status")["listeners"]
        daemon.write_config(lab_config(lab, NAME, udp=True, http=True, broken=True))
        with pytest.raises(admin.AdminError, match=r"(?s)reload rejected.*listeners\[3\]\.protocol"):
            daemon.request("reload")
        assert daemon.request("status")["listeners"] == before
        echo(long_lived, b"after a rejected reload\n")

        # Valid: one more target group member and a new TCP listener on :9100.
        text = original + """
[[listeners]]
name = "echo-tcp-2"
protocol = "TCP"
address = "10.0.0.100"
port = 9100
default_action = { type = "forward", target_group = "echo-tcp-2" }

[[target_groups]]
name = "echo-tcp-2"
protocol = "TCP"
port = 9000
targets = [{ id = "10.0.1.13" }]
health_check = { interval = 5, timeout = 2, healthy_threshold = 2, unhealthy_threshold = 2 }
"""
        daemon.write_config(text)
        daemon.request("reload")
        assert {li["name"] for li in daemon.request("status")["listeners"]} >= {"echo-tcp-2"}
        echo(long_lived, b"after a good reload\n")

        def via_new_listener() -> str:
            with socket.create_connection((labmod.VIP, 9100), timeout=3) as sock:
                return read_line(sock)

        # A new group's target serves once its first check passes (ELB); on a
        # loaded machine that can outlast the client's SYN retries.
        daemon.wait_for("echo-tcp-2", "10.0.1.13", "healthy", timeout=INTERVAL * 2 + 3)
        assert run_in_netns(lab.client_ns, via_new_listener) == "backend3"
    finally:
        long_lived.close()
        daemon.write_config(original)
        daemon.request("reload")


def test_kill_9_and_restart_keeps_a_long_lived_stream_flowing(daemon: RunningDaemon, lab: Lab) -> None:
    stream = tcp_to_vip(lab)
    vip = VipAddr(ipaddress.IPv4Address(labmod.VIP), labmod.ECHO_PORT, "TCP")
    everyone = {b.address for b in lab.backends}
    rings: list[set[str]] = []
    read_line(stream)
    pump = StreamPump(stream)
    pump.start()
    try:
        time.sleep(0.5)
        daemon.stop(signal.SIGKILL)
        before_gap = pump.exchanged
        time.sleep(1.5)  # no control plane at all
        during_gap = pump.exchanged - before_gap
        restarting = threading.Thread(target=daemon.start)
        restarting.start()
        while restarting.is_alive():  # the ring while the new daemon comes up
            rings.append(ring_target_addresses(daemon, vip))
            time.sleep(0.05)
        restarting.join()
        deadline = time.monotonic() + INTERVAL * 2 + 3
        while time.monotonic() < deadline:  # ... and until the new daemon knows every target healthy
            rings.append(ring_target_addresses(daemon, vip))
            if all(row["state"] == "healthy" for row in daemon.targets("echo-tcp").values()):
                break
            time.sleep(0.05)
    finally:
        pump.stop()
        stream.close()
    assert not pump.errors
    assert during_gap > 20  # the kernel kept forwarding while nothing ran in user space
    # The adopted ring kept every (healthy) target: no narrowing while the new
    # daemon learned their health again.
    assert rings and all(ring == everyone for ring in rings), rings
    for backend in lab.backends:
        daemon.wait_for("echo-tcp", backend.address, "healthy", timeout=INTERVAL * 2 + 3)
        daemon.wait_for("web", backend.address, "healthy", timeout=INTERVAL * 2 + 3)


def test_admin_socket_refuses_non_root(daemon: RunningDaemon) -> None:
    assert os.stat(daemon.socket).st_mode & 0o777 == 0o600
    probe = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except PermissionError:\n"
        "    print('EACCES'); sys.exit(0)\n"
        "s.settimeout(5); print(s.recv(4096).decode())  # refused before it can even ask\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, daemon.socket], capture_output=True, text=True, timeout=10)
    assert result.stdout.strip() == "EACCES"
    # Even with the file and its directory opened up, the daemon checks the
    # peer's credentials.
    directory = os.path.dirname(daemon.socket)
    dir_mode = os.stat(directory).st_mode & 0o777
    os.chmod(directory, 0o711)
    os.chmod(daemon.socket, 0o666)
    try:
        result = subprocess.run([sys.executable, "-c", probe, daemon.socket], capture_output=True, text=True,
                                timeout=10)
    finally:
        os.chmod(daemon.socket, 0o600)
        os.chmod(directory, dir_mode)
    assert "permission denied" in result.stdout and '"ok": false' in result.stdout


def test_slow_request_through_a_deregistered_target_completes(daemon: RunningDaemon, lab: Lab) -> None:
    """An in-flight HTTP request to a target that is deregistered mid-request
    finishes; new requests go to the other targets."""
    from concurrent.futures import ThreadPoolExecutor

    target = lab.backends[0]
    for backend in lab.backends:
        daemon.wait_for("web", backend.address, "healthy", timeout=INTERVAL * 2 + 3)
    with ThreadPoolExecutor(max_workers=8) as pool:
        # Requests are spread round robin: start enough slow ones that one is on `target`.
        slow = [pool.submit(http_get, lab, "/sleep/3", 10.0) for _ in range(6)]
        time.sleep(0.5)
        daemon.request("deregister", group="web", target=target.address)
        try:
            assert daemon.targets("web")[target.address]["state"] == "draining"
            after = [http_get(lab) for _ in range(12)]
            results = [f.result() for f in slow]
        finally:
            daemon.request("register", group="web", target=target.address)
    assert all(status == 200 for status, _ in results)
    assert target.name in {backend for _, backend in results}  # one was in flight on the drained target
    assert all(status == 200 and backend != target.name for status, backend in after)
    daemon.wait_for("web", target.address, "healthy", timeout=INTERVAL * 2 + 3)


def test_down_is_refused_while_up_runs_and_a_stop_leaves_no_lock(daemon: RunningDaemon) -> None:
    refused = subprocess.run([sys.executable, "-m", "lb", "down", "-c", daemon.config_path], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and "still running" in refused.stderr and "Traceback" not in refused.stderr
    assert daemon.request("status")["program_id"] is not None  # nothing was taken away
    assert os.path.exists(lock_path(NAME))
    assert daemon.stop() == 0
    assert not os.path.exists(lock_path(NAME))
    daemon.start()  # for the fixture's own teardown

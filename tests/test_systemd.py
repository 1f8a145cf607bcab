"""lb.systemd: the watchdog pings come from the event loop (a blocked loop
stops them), only for the process systemd named, at half WATCHDOG_USEC; and a
real `lb up` started as systemd would (NOTIFY_SOCKET bound by the test,
WATCHDOG_USEC set) says READY=1, then pings on, until SIGSTOP stops it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb import systemd
from tests.daemon_fixture import RunningDaemon
from tests.l7_backends import HOST, ThreadedBackends, free_port
from tests.names import name


class NotifySocket:
    """The datagram socket systemd listens on (NOTIFY_SOCKET); messages with when they came."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def receive(self, until: float) -> list[tuple[float, str]]:
        """Every message until `until` (time.monotonic())."""
        got = []
        while (left := until - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got.append((time.monotonic(), data.decode()))
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", listener.path)
    try:
        yield listener
    finally:
        listener.close()


def test_interval_is_half_watchdog_usec_for_the_named_process_only(notify: NotifySocket,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 1.5
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # a worker that inherited the environment
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    for usec in ("0", "", "x"):
        monkeypatch.setenv("WATCHDOG_USEC", usec)
        assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert systemd.watchdog_interval() is None


def test_a_blocked_loop_stops_the_pings(notify: NotifySocket) -> None:
    pings: list[tuple[float, str]] = []

    async def body() -> None:
        loop = asyncio.get_running_loop()
        watchdog = systemd.Watchdog(0.05)
        watchdog.start(loop)
        try:
            # The test reads the socket from a thread: this loop is the one blocked.
            reading = loop.run_in_executor(None, notify.receive, time.monotonic() + 1.2)
            await asyncio.sleep(0.4)
            time.sleep(0.5)  # the loop hangs for 0.5 s
            await asyncio.sleep(0.3)
            pings.extend(await reading)
        finally:
            watchdog.stop()

    asyncio.run(body())
    times = [t for t, message in pings if message == "WATCHDOG=1"]
    assert len(times) >= 8, pings
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) >= 0.45, gaps  # none while the loop was blocked
    assert sorted(gaps)[len(gaps) // 2] < 0.15, gaps  # otherwise every 0.05 s, give or take the load


def test_an_unreachable_notify_socket_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))

    async def body() -> int:
        watchdog = systemd.Watchdog(0.01)
        watchdog.start(asyncio.get_running_loop())
        await asyncio.sleep(0.1)
        watchdog.stop()
        return watchdog.pings

    assert asyncio.run(body()) == 0  # tried, failed, kept the loop alive


LB_CONFIG = """
[load_balancer]
name = "{name}"
workers = 1
admin_socket = "/run/lb/{name}.sock"
metrics_address = "{host}:{metrics}"

[[listeners]]
name = "web"
protocol = "HTTP"
address = "{host}"
port = {port}
default_action = {{ type = "forward", target_group = "web" }}

[[target_groups]]
name = "web"
protocol = "HTTP"
port = {backend}
targets = [{{ id = "{host}" }}]
"""


@pytest.mark.root
def test_lb_up_pings_the_watchdog_from_its_loop(notify: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WatchdogSec=0.4: a ping every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)  # systemd sets it to the main pid; unknown before the fork
    lb_name = name("wdog")
    with ThreadedBackends(("http", "b1")) as (b1,):
        text = LB_CONFIG.format(name=lb_name, host=HOST, port=free_port(), backend=b1.port, metrics=free_port())
        running = RunningDaemon(None, lb_name, text)
        try:
            running.start()
            assert running.proc is not None
            seen = notify.receive(time.monotonic() + 2.0)
            messages = [message for _, message in seen]
            assert any("READY=1" in message for message in messages), messages
            pings = [t for t, message in seen if message == "WATCHDOG=1"]
            assert len(pings) >= 6, messages  # ~10 in 2 s
            # A stopped daemon (as a hung loop would) pings no more: systemd would kill it.
            running.proc.send_signal(signal.SIGSTOP)
            try:
                time.sleep(0.3)
                notify.receive(time.monotonic() + 0.1)  # what was sent before the stop took
                assert notify.receive(time.monotonic() + 1.0) == []
            finally:
                running.proc.send_signal(signal.SIGCONT)
            assert [m for _, m in notify.receive(time.monotonic() + 1.0)].count("WATCHDOG=1") >= 2
        finally:
            running.cleanup()

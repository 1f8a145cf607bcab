"""systemd integration for a Type=notify service (deploy/lb.service).

    sd_notify("READY=1")                 tell systemd our state; a no-op outside systemd
    watchdog = Watchdog.from_environment()
    watchdog.start(loop)                 WATCHDOG=1 from the event loop while it runs
    watchdog.stop()

The watchdog (WatchdogSec= in the unit; systemd passes WATCHDOG_USEC and
WATCHDOG_PID) is pinged from the daemon's event loop, never from a thread of
its own: a loop that hangs (a blocking call, a busy callback) stops the pings,
and systemd kills and restarts lb (Restart=on-failure) instead of leaving a
daemon whose admin socket, health checks and reloads no longer answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger("lb.systemd")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state, e.g. "READY=1"; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(path)
        sock.sendall(message.encode())


def watchdog_interval() -> float | None:
    """Seconds between pings: half of WATCHDOG_USEC (sd_watchdog_enabled's
    advice), or None when systemd asked for no watchdog, or asked another
    process (WATCHDOG_PID names the unit's main process: a child that
    inherited the environment must not ping for it)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or not os.environ.get("NOTIFY_SOCKET"):
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2 / 1e6


class Watchdog:
    """WATCHDOG=1 every `interval` seconds, sent by a callback on the loop."""

    def __init__(self, interval: float | None) -> None:
        self.interval = interval
        self.pings = 0
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False

    @classmethod
    def from_environment(cls) -> Watchdog:
        return cls(watchdog_interval())

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.interval is None or self._timer is not None:
            return
        log.info("systemd watchdog: pinging every %.3g s", self.interval)
        self._ping(loop)

    def _ping(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            sd_notify("WATCHDOG=1")
            self.pings += 1
            self._failed = False
        except OSError as exc:  # systemd gone or restarting: say so once, keep trying
            if not self._failed:
                log.warning("systemd watchdog: cannot notify: %s", exc)
            self._failed = True
        assert self.interval is not None
        self._timer = loop.call_later(self.interval, self._ping, loop)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

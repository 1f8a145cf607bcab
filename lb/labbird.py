"""BIRD processes for the lab and the tests: one per namespace, each with its
own config, control socket and pid file under one directory.

    bird = LabBird(directory, "lb1", netns)    # paths: <dir>/lb1.conf, lb1.ctl, lb1.pid
    bird.start(main_config_text)               # waits for the control socket
    bird.stop()                                # SIGTERM, then SIGKILL

A host's main config includes ``<dir>/lb1.d/*.conf``: the directory lb's
fragment goes to (``[load_balancer.bgp].bird_config``). Nothing here is
shared with a system BIRD: no default path is used.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass

BIRD = "/usr/sbin/bird"
START_TIMEOUT = 5.0


class LabBirdError(RuntimeError):
    """A lab BIRD would not start; the message has its output."""


@dataclass(frozen=True)
class LabBird:
    directory: str  # e.g. /run/lb-lab/<prefix>
    name: str  # "router", "lb1"
    netns: str

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, f"{self.name}.bird.conf")

    @property
    def socket(self) -> str:
        return os.path.join(self.directory, f"{self.name}.ctl")

    @property
    def pid_path(self) -> str:
        return os.path.join(self.directory, f"{self.name}.bird.pid")

    @property
    def fragment_dir(self) -> str:
        """Where lb writes its fragment: the main config includes every *.conf here."""
        return os.path.join(self.directory, f"{self.name}.d")

    def include_line(self) -> str:
        return f'include "{self.fragment_dir}/*.conf";'

    def start(self, config: str) -> None:
        """Write the main config and start BIRD in the namespace (daemonised, its
        pid in pid_path); returns once its control socket answers."""
        os.makedirs(self.fragment_dir, exist_ok=True)
        with open(self.config_path, "w") as f:
            f.write(config)
        self.stop()
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns, BIRD, "-c", self.config_path, "-s", self.socket, "-P", self.pid_path],
            capture_output=True, text=True, timeout=START_TIMEOUT,
        )
        if result.returncode != 0:
            raise LabBirdError(f"bird ({self.name}) did not start: {result.stderr.strip() or result.stdout.strip()}")
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.socket):
            if time.monotonic() > deadline:
                raise LabBirdError(f"bird ({self.name}) started but {self.socket} never appeared")
            time.sleep(0.02)

    def pid(self) -> int | None:
        try:
            with open(self.pid_path) as f:
                pid = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"bird" not in f.read():
                    return None
        except OSError:
            return None
        return pid

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + 2.0
                while time.monotonic() < deadline and _alive(pid):
                    time.sleep(0.02)
                if not _alive(pid):
                    break
        for path in (self.socket, self.pid_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False

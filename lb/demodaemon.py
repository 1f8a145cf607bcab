"""A real `lb up` for the demos: started from a config file, driven through
its admin socket, stopped and taken down (`lb down`) again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any

from lb import admin
from lb.config import load
from lb.model import LoadBalancer

READY_TIMEOUT = 30.0


class DemoDaemon:
    """`lb up -c PATH`, its output in `log`; `what` names it in errors."""

    def __init__(self, path: str, log: str, what: str = "lb up") -> None:
        self.path, self.log, self.what = path, log, what
        self.config: LoadBalancer = load(path)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "lb", "up", "-c", self.path], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"{self.what} exited ({self.proc.returncode}); see {self.log}")
            try:
                self.request("status")
                return
            except admin.AdminError:
                time.sleep(0.1)
        raise SystemExit(f"{self.what} did not come up; see {self.log}")

    def request(self, cmd: str, **args: Any) -> Any:
        return admin.request(self.config.admin_socket, cmd, **args)

    def state(self, group: str, target: str) -> dict[str, Any]:
        rows: dict[str, dict[str, Any]] = {r["target"]: r for r in self.request("targets", group=group)}
        return rows.get(target, {"state": "unused", "reason": "Target.NotRegistered", "description": ""})

    def wait_for(self, group: str, target: str, state: str, timeout: float = 30) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.state(group, target)["state"] == state:
                return time.monotonic() - start
            time.sleep(0.1)
        raise SystemExit(f"{target} did not become {state} in {timeout}s; see {self.log}")

    def stop(self, down: bool = True) -> None:
        """SIGTERM (lb leaves its maps pinned for a restart), then `lb down` unless down=False."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(40)
        if down:
            subprocess.run([sys.executable, "-m", "lb", "down", "-c", self.path], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

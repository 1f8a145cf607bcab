"""A real `lb up` process on the test lab, driven through its admin socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from lb import admin
from lb.lab import Lab

READY_TIMEOUT = 30.0


def lab_config(lab: Lab, name: str, *, echo_targets: int = 3, udp: bool = False, http: bool = False,
               deregistration_delay: int = 10, broken: bool = False) -> str:
    """A config for the test lab: a TCP echo VIP (and optionally UDP and HTTP)."""
    targets = ", ".join(f'{{ id = "{b.address}" }}' for b in lab.backends[:echo_targets])
    all_targets = ", ".join(f'{{ id = "{b.address}" }}' for b in lab.backends)
    checks = "interval = 5, timeout = 2, healthy_threshold = 2, unhealthy_threshold = 2"
    text = f"""
[load_balancer]
name = "{name}"
netns = "{lab.lb_ns}"
interfaces = [{", ".join(f'"{i}"' for i in lab.lb_interfaces)}]
xdp_mode = "native"
admin_socket = "/run/lb/{name}.sock"
workers = 1
"""
    text += _forwarded("echo-tcp", "TCP", 9000, targets, f"{{ {checks} }}", deregistration_delay)
    if udp:
        text += _forwarded("echo-udp", "UDP", 9000, all_targets, f'{{ protocol = "TCP", port = 9000, {checks} }}')
    if http:
        text += _forwarded("web", "HTTP", 80, all_targets, f"{{ {checks} }}", deregistration_delay)
    if broken:
        text += '\n[[listeners]]\nname = "bad"\nprotocol = "SCTP"\nport = 0\n'
    return text


def _forwarded(name: str, protocol: str, port: int, targets: str, health_check: str,
               deregistration_delay: int | None = None) -> str:
    """A listener on the lab's VIP and the target group (of the same name) it forwards to."""
    text = f"""
[[listeners]]
name = "{name}"
protocol = "{protocol}"
address = "10.0.0.100"
port = {port}
default_action = {{ type = "forward", target_group = "{name}" }}

[[target_groups]]
name = "{name}"
protocol = "{protocol}"
port = {port}
targets = [{targets}]
health_check = {health_check}
"""
    if deregistration_delay is not None:
        text += f"deregistration_delay = {deregistration_delay}\n"
    return text


class RunningDaemon:
    """`python -m lb up -c FILE` as a child process; logs kept for failures."""

    def __init__(self, lab: Lab, name: str, config_text: str) -> None:
        self.lab = lab
        self.name = name
        self.socket = f"/run/lb/{name}.sock"
        self.config_file = tempfile.NamedTemporaryFile("w", suffix=".toml", prefix=f"{name}-", delete=False)
        self.config_file.write(config_text)
        self.config_file.close()
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix=f"{name}-", delete=False)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> str:
        return self.config_file.name

    def write_config(self, text: str) -> None:
        with open(self.config_path, "w") as f:
            f.write(text)

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "lb", "up", "-c", self.config_path],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lb up exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                self.request("status", timeout=2)
                return
            except admin.AdminError:
                time.sleep(0.1)
        raise AssertionError(f"lb up not ready after {READY_TIMEOUT}s:\n{self.logs()}")

    def request(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        return admin.request(self.socket, cmd, timeout=timeout, **args)

    def targets(self, group: str) -> dict[str, dict[str, Any]]:
        return {row["target"]: row for row in self.request("targets", group=group)}

    def wait_for(self, group: str, target: str, state: str, timeout: float) -> float:
        """Seconds until `target` reaches `state` (AssertionError after timeout)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            row = self.targets(group).get(target)
            if (row["state"] if row else "unused") == state:
                return time.monotonic() - start
            time.sleep(0.1)
        raise AssertionError(f"{target} not {state} within {timeout}s: {self.targets(group)}\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def down(self) -> None:
        subprocess.run([sys.executable, "-m", "lb", "down", "-c", self.config_path], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def cleanup(self) -> None:
        self.stop()
        self.down()
        for path in (self.config_path, self.log.name):
            if os.path.exists(path):
                os.unlink(path)
        self.log.close()

    def logs(self) -> str:
        with open(self.log.name) as f:
            return f.read()[-6000:]

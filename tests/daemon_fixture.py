"""A real `lb up` process on the test lab, driven through its admin socket."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lb import admin
from lb.lab import ECHO_PORT, HTTP_PORT, VIP, Backend, Lab
from tests.labclient import read_line

READY_TIMEOUT = 30.0
UNIT_FILE = Path(__file__).resolve().parents[1] / "deploy" / "lb.service"


CHECKS = "interval = 5, timeout = 2, healthy_threshold = 2, unhealthy_threshold = 2"  # the fastest lb.config allows


def target_list(backends: Sequence[Backend]) -> str:
    """A TOML array of targets: the backends' addresses."""
    return "[" + ", ".join(f'{{ id = "{b.address}" }}' for b in backends) + "]"


def lab_config(lab: Lab, name: str, *, echo_targets: int = 3, udp: bool = False, http: bool = False,
               deregistration_delay: int = 10, broken: bool = False, netns: bool = True) -> str:
    """A config for the test lab: a TCP echo VIP (and optionally UDP and HTTP).
    With netns=False it names no namespace: for a daemon started inside the
    lab's lb namespace (see confined). More listeners: append forwarded()."""
    targets = target_list(lab.backends[:echo_targets])
    all_targets = target_list(lab.backends)
    netns_line = f'netns = "{lab.lb_ns}"\n' if netns else ""
    text = f"""
[load_balancer]
name = "{name}"
{netns_line}interfaces = [{", ".join(f'"{i}"' for i in lab.lb_interfaces)}]
xdp_mode = "native"
admin_socket = "/run/lb/{name}.sock"
workers = 1
"""
    text += forwarded("echo-tcp", "TCP", ECHO_PORT, targets, f"{{ {CHECKS} }}", deregistration_delay)
    if udp:
        text += forwarded("echo-udp", "UDP", ECHO_PORT, all_targets, f'{{ protocol = "TCP", port = 9000, {CHECKS} }}')
    if http:
        text += forwarded("web", "HTTP", HTTP_PORT, all_targets, f"{{ {CHECKS} }}", deregistration_delay)
    if broken:
        text += '\n[[listeners]]\nname = "bad"\nprotocol = "SCTP"\nport = 0\n'
    return text


def forwarded(name: str, protocol: str, port: int, targets: str, health_check: str,
              deregistration_delay: int | None = None, *, address: str = VIP) -> str:
    """A listener on `address` (the lab's VIP) and the target group (of the same name) it forwards to."""
    text = f"""
[[listeners]]
name = "{name}"
protocol = "{protocol}"
address = "{address}"
port = {port}
default_action = {{ type = "forward", target_group = "{name}" }}

[[target_groups]]
name = "{name}"
protocol = "{protocol}"
port = {port}
targets = {targets}
health_check = {health_check}
"""
    if deregistration_delay is not None:
        text += f"deregistration_delay = {deregistration_delay}\n"
    return text


def unit_capabilities() -> list[str]:
    """CapabilityBoundingSet= of deploy/lb.service: ["CAP_BPF", ...]."""
    found = re.search(r"^CapabilityBoundingSet=(.*)$", UNIT_FILE.read_text(), re.M)
    assert found is not None, f"no CapabilityBoundingSet= in {UNIT_FILE}"
    return found.group(1).split()


def confined(lab: Lab) -> list[str]:
    """A launcher prefix: run inside the lab's lb namespace with exactly the
    unit's capability bounding set, as systemd starts lb. nsenter, not
    `ip netns exec`, which remounts /sys (and bpffs with it); no netns in the
    config then (lab_config(netns=False)): setns needs CAP_SYS_ADMIN."""
    caps = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in unit_capabilities())
    return ["nsenter", f"--net=/run/netns/{lab.lb_ns}", "setpriv", f"--bounding-set=-all,{caps}", "--"]


def effective_capabilities(pid: int) -> set[str]:
    """Names (CAP_...) of the capabilities process `pid` has in effect."""
    found = re.search(r"^CapEff:\s*([0-9a-f]+)$", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert found is not None
    names = subprocess.run(["capsh", f"--decode={found.group(1)}"], capture_output=True, text=True,
                           check=True).stdout
    return {cap.upper() for cap in names.split("=", 1)[1].strip().split(",") if cap}


class StreamPump(threading.Thread):
    """Echo exchanges back to back over one long-lived TCP connection through
    the VIP (the lab's echo server answers each line); the first error ends it."""

    def __init__(self, stream: socket.socket) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.exchanged = 0
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._stop_event.is_set():
            line = f"tick {i}"
            try:
                self.stream.sendall(f"{line}\n".encode())
                answer = read_line(self.stream)
                if answer != line:
                    raise AssertionError(f"sent {line!r}, echoed {answer!r}")
                self.exchanged += 1
            except (OSError, AssertionError) as exc:
                self.errors.append(repr(exc))
                return
            i += 1
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)


class RunningDaemon:
    """`python -m lb up -c FILE` as a child process; logs kept for failures.
    `launcher` prefixes the commands (`lb up`, `lb down`), e.g. confined(lab)."""

    def __init__(self, lab: Lab | None, name: str, config_text: str, launcher: Sequence[str] = ()) -> None:
        self.lab = lab
        self.launcher = list(launcher)
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
        self.proc = subprocess.Popen([*self.launcher, sys.executable, "-m", "lb", "up", "-c", self.config_path],
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
        subprocess.run([*self.launcher, sys.executable, "-m", "lb", "down", "-c", self.config_path], check=False,
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

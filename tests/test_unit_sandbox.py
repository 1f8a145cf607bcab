"""deploy/lb.service's sandbox: `systemd-analyze security` rates it 3.0 or
better, and what `lb up` and `lb reload` really do fits it.

systemd is not PID 1 here (nor in CI), so the unit cannot be started as
such. Instead `lb up` runs as the unit runs it (the lab's lb namespace, the
unit's capability bounding set: tests/daemon_fixture.confined) under strace,
through a day of its life: start (BPF compile, XDP attach, listeners),
health checks, HTTP and HTTPS requests, a metrics scrape, `lb reload` (the
unit's ExecReload, traced too), SIGUSR1 (access log reopen) and SIGTERM.
Then every system call, socket family, namespace operation and device the
trace shows is checked against the unit's lines, the system call groups
resolved by this systemd (`systemd-analyze syscall-filter`). A directive
that would break lb fails here, not on an operator's host.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lb import lab as labmod
from lb.lab import Lab
from tests import labclient
from tests.daemon_fixture import UNIT_FILE, RunningDaemon, confined, lab_config
from tests.names import name
from tests.test_https_daemon import connect, get, https_section
from tests.tls_certs import Certs

MAX_EXPOSURE = 3.0
NAME = name("sbox")
METRICS_PORT = 9475  # distinct from other test daemons in the lab's lb namespace
# PrivateDevices=yes: the /dev systemd gives the unit.
PRIVATE_DEV = re.compile(r"^/dev/(null|zero|full|random|urandom|tty|ptmx|shm/.*|pts/.*|mqueue/.*)$")


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: deploy/install.sh installs systemd with the test packages"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def unit_values(key: str) -> list[str]:
    """Every value of `key=` in deploy/lb.service, its lines concatenated in order."""
    values: list[str] = []
    for line in UNIT_FILE.read_text().splitlines():
        if line.startswith(f"{key}="):
            values += line.split("=", 1)[1].split()
    return values


def test_systemd_analyze_security_rates_the_unit_3_or_better() -> None:
    result = systemd_analyze("security", "--offline=true", str(UNIT_FILE))
    found = re.search(r"Overall exposure level for lb\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout
    # The figure the unit's comment gives is the one systemd computes.
    assert f"rates this unit {found.group(1)}" in UNIT_FILE.read_text()


def test_systemd_analyze_verify_finds_no_unknown_or_invalid_line(tmp_path: Path) -> None:
    """A misspelt directive is only a warning to systemd (and ignored): none here."""
    lb = Path(sys.executable).parent / "lb"
    unit = tmp_path / "lb.service"
    unit.write_text(UNIT_FILE.read_text().replace("=/usr/local/bin/lb ", f"={lb} "))
    result = systemd_analyze("verify", str(unit))
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def syscall_groups() -> dict[str, list[str]]:
    """`systemd-analyze syscall-filter`: group → its members (calls and groups)."""
    groups: dict[str, list[str]] = {}
    current = None
    for line in systemd_analyze("syscall-filter").stdout.splitlines():
        if line.startswith("@"):
            current = line.split()[0]
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())
    return groups


def allowed_syscalls() -> set[str]:
    """The unit's SystemCallFilter= (an allow list, `~` lines removing) resolved."""
    groups = syscall_groups()

    def expand(item: str) -> set[str]:
        return set().union(*(expand(member) for member in groups[item])) if item.startswith("@") else {item}

    allowed: set[str] = set()
    lines = [line.split("=", 1)[1] for line in UNIT_FILE.read_text().splitlines()
             if line.startswith("SystemCallFilter=")]
    assert lines and not lines[0].startswith("~"), "SystemCallFilter= should start with an allow list"
    for line in lines:
        deny = line.startswith("~")
        items = set().union(*(expand(item) for item in line.removeprefix("~").split()))
        allowed = allowed - items if deny else allowed | items
    return allowed


@dataclass
class Trace:
    """What strace -f saw: system calls, socket families, paths opened, pids."""

    syscalls: set[str] = field(default_factory=set)
    families: set[str] = field(default_factory=set)
    paths: set[str] = field(default_factory=set)
    pids: set[str] = field(default_factory=set)
    lines: list[str] = field(default_factory=list)

    def read(self, path: Path) -> None:
        for line in path.read_text(errors="replace").splitlines():
            call = re.match(r"^(\d+)\s+(?:<\.\.\. )?(\w+)(?:\(| resumed>)", line)
            if call is None:
                continue
            self.lines.append(line)
            self.pids.add(call.group(1))
            self.syscalls.add(call.group(2))
            if family := re.search(r"\bsocket(?:pair)?\((AF_\w+)", line):
                self.families.add(family.group(1))
            if opened := re.search(r'\bopen(?:at2?)?\((?:AT_FDCWD|\d+), "([^"]+)"', line):
                self.paths.add(opened.group(1))

    def matching(self, pattern: str) -> list[str]:
        return [line for line in self.lines if re.search(pattern, line)]


def strace_prefix(lab: Lab, out: Path) -> list[str]:
    """As the unit runs lb (confined), traced from its exec on."""
    return [*confined(lab), "strace", "-f", "-qq", "-o", str(out)]


@pytest.fixture(scope="module")
def trace(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trace]:
    tmp = tmp_path_factory.mktemp("sandbox")
    certs = Certs(tmp)
    cert, key = certs.files("www.example.com")
    access_log = tmp / "access.log"
    text = lab_config(lab, NAME, http=True, udp=True, netns=False) + https_section(cert, key)
    text = text.replace("workers = 1\n", f'workers = 1\nmetrics_address = "127.0.0.1:{METRICS_PORT}"\n'
                        f'access_log = {{ enabled = true, path = "{access_log}" }}\n', 1)
    daemon_trace, reload_trace = tmp / "up.strace", tmp / "reload.strace"
    running = RunningDaemon(lab, NAME, text, launcher=strace_prefix(lab, daemon_trace))
    running.launcher = confined(lab)
    running.down()  # what an interrupted run left
    running.launcher = strace_prefix(lab, daemon_trace)
    try:
        running.start()
        running.launcher = confined(lab)  # `lb down` at cleanup: not traced
        pid = running.request("status")["pid"]
        for backend in lab.backends:
            running.wait_for("web", backend.address, "healthy", timeout=15)
        status, _, _ = labclient.http_get(lab.client_ns, labmod.VIP, labmod.HTTP_PORT, "/")
        assert status == 200
        tls = connect(lab, certs.client())
        try:
            assert get(tls).startswith(b"HTTP/1.1 200 ")
        finally:
            tls.close()
        scrape = subprocess.run(["nsenter", f"--net=/run/netns/{lab.lb_ns}", sys.executable, "-c",
                                 "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
                                 f"'http://127.0.0.1:{METRICS_PORT}/metrics', timeout=10).read().decode())"],
                                capture_output=True, text=True, timeout=30)
        assert "lb_http_requests_total" in scrape.stdout, scrape.stderr
        reload = subprocess.run([*strace_prefix(lab, reload_trace), sys.executable, "-m", "lb", "reload", "-c",
                                 running.config_path], capture_output=True, text=True, timeout=60)
        assert reload.returncode == 0, reload.stderr + running.logs()
        subprocess.run(["kill", "-USR1", str(pid)], check=True)
        time.sleep(1.0)
        subprocess.run(["kill", "-TERM", str(pid)], check=True)
        assert running.proc is not None
        running.proc.wait(45)  # strace exits with lb
        assert running.proc.returncode == 0, running.logs()
        running.proc = None
        assert access_log.read_text().count("\n") >= 2  # the requests, logged through the sandboxed workers
        traced = Trace()
        traced.read(daemon_trace)
        assert "bpf" in traced.syscalls and "execve" in traced.syscalls
        traced.read(reload_trace)
        yield traced
    finally:
        if running.proc is not None:
            running.proc.send_signal(signal.SIGKILL)  # strace: its tracees die with it
        running.cleanup()


@pytest.mark.root
def test_every_system_call_is_in_the_units_filter(trace: Trace) -> None:
    refused = sorted(trace.syscalls - allowed_syscalls())
    assert not refused, f"SystemCallFilter= would refuse {refused}: " + "\n".join(
        trace.matching(rf"\b({'|'.join(refused)})\(")[:10])


@pytest.mark.root
def test_every_socket_family_is_in_restrict_address_families(trace: Trace) -> None:
    allowed = set(unit_values("RestrictAddressFamilies"))
    assert trace.families and trace.families <= allowed, trace.families - allowed


@pytest.mark.root
def test_no_namespace_is_made_or_entered(trace: Trace) -> None:
    assert unit_values("RestrictNamespaces") == ["yes"]
    assert not trace.matching(r"\b(setns|unshare)\(|CLONE_NEW"), trace.matching(r"\b(setns|unshare)\(|CLONE_NEW")


@pytest.mark.root
def test_only_the_private_dev_devices_are_opened(trace: Trace) -> None:
    assert unit_values("PrivateDevices") == ["yes"]
    devices = {p for p in trace.paths if p.startswith("/dev/")}
    assert all(PRIVATE_DEV.match(p) for p in devices), devices
    assert not {"/dev/kmsg", "/proc/kmsg"} & trace.paths  # ProtectKernelLogs=yes


@pytest.mark.root
def test_no_other_process_is_read_in_proc(trace: Trace) -> None:
    """ProtectProc=invisible hides other users' processes: lb reads only its own."""
    assert unit_values("ProtectProc") == ["invisible"]
    others = {p for p in trace.paths if (m := re.match(r"^/proc/(\d+)/", p)) and m.group(1) not in trace.pids}
    assert not others, others


@pytest.mark.root
def test_no_realtime_no_setuid_no_personality_no_clock(trace: Trace) -> None:
    assert not trace.matching(r"\bsched_setscheduler\(|SCHED_FIFO|SCHED_RR")  # RestrictRealtime=yes
    assert not trace.matching(r"\b(f?chmod(at)?)\(.*\bS_IS[UG]ID")  # RestrictSUIDSGID=yes
    assert not trace.matching(r"\bpersonality\((?!0xffffffff)")  # LockPersonality=yes (a query is fine)
    assert not trace.matching(r"\b(clock_settime|settimeofday|adjtimex|clock_adjtime)\(")  # ProtectClock=yes

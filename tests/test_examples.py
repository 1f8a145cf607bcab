"""deploy/: every example config validates and is indexed; the systemd unit says what it must."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lb import config
from lb import lab as labmod
from lb import model as m

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "deploy" / "examples"
UNIT = REPO / "deploy" / "lb.service"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.toml"))
EXPECTED_EXAMPLES = {"path-host-routing.toml", "tcp-service.toml", "udp-service.toml", "mixed.toml",
                     "https-redirect.toml"}
# What lb needs (the unit's comment says why each, and why not CAP_SYS_ADMIN).
CAPABILITIES = {"CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_PERFMON"}


# --- examples ------------------------------------------------------------------------


def test_the_examples_the_issue_asks_for_exist() -> None:
    assert EXPECTED_EXAMPLES <= {f.name for f in EXAMPLE_FILES}


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    lb = config.load(path)  # raises ConfigError naming every problem
    assert lb.listeners and lb.target_groups


NAMESPACE_LAB_ONLY = {"dual-stack.toml"}  # IPv6: the Vagrant lab has none


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_runs_on_the_lab(path: Path) -> None:
    """The lab's VIP, targets and ports only, so the file runs on either lab
    (the namespace lab's IPv6 ones too in an example marked so in the index)."""
    lb = config.load(path)
    assert lb.netns is None and not lb.interfaces, "examples leave netns and interfaces to the host"
    ipv6 = path.name in NAMESPACE_LAB_ONLY
    vips = (labmod.VIP, labmod.VIP6) if ipv6 else (labmod.VIP,)
    backends = labmod.BACKEND_ADDRS + (labmod.BACKEND_ADDRS6 if ipv6 else ())
    for listener in lb.listeners:
        assert str(listener.address) in vips, listener.name
    for group in lb.target_groups:
        for target in group.targets:
            assert str(target.address) in backends, (group.name, str(target.address))
            port = target.port or group.port
            wanted = labmod.ECHO_PORT if group.protocol is not m.Protocol.HTTP else \
                labmod.HTTPS_PORT if group.tls is not None else labmod.HTTP_PORT
            assert port == wanted, (group.name, port)


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_is_described_in_the_index(path: Path) -> None:
    index = (EXAMPLES / "README.md").read_text()
    rows = [line for line in index.splitlines() if line.startswith("|") and f"`{path.name}`" in line]
    assert rows, f"deploy/examples/README.md has no table row for {path.name}"
    description = rows[0].rsplit("|", 2)[-2].strip()
    assert len(description) > 20, f"{path.name}: describe it in a sentence"
    assert ("namespace lab only" in description) == (path.name in NAMESPACE_LAB_ONLY), description


# --- the systemd unit -------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values, in order]}}.

    Comments (# or ;) and blank lines are skipped, a trailing backslash
    continues a line, and a repeated key adds a value, as systemd reads them.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} comes before any [section]"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: expected one value, got {values}"
    return values[0]


def test_parse_unit_reads_what_systemd_reads() -> None:
    text = "# c\n[Service]\n; c\nExecReload=a\nExecReload=b \\\n  c\n\nType = notify\n"
    assert parse_unit(text) == {"Service": {"ExecReload": ["a", "b c"], "Type": ["notify"]}}


def test_unit_is_type_notify_and_restarts_on_failure(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "ExecStart") == "/usr/local/bin/lb up -c /etc/lb/lb.toml"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "KillSignal") == "SIGTERM"
    assert one(unit, "Service", "TimeoutStopSec") == "35"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_unit_reload_waits_for_the_daemons_answer(unit: dict[str, dict[str, list[str]]]) -> None:
    # `lb reload` exits non-zero when the daemon rejects the file: so does `systemctl reload`
    # (a SIGHUP would report success whatever the daemon made of it).
    assert unit["Service"]["ExecReload"] == ["/usr/local/bin/lb reload -c /etc/lb/lb.toml"]
    assert one(unit, "Service", "WatchdogSec") == "30s"  # pinged from the daemon's loop (lb.systemd.Watchdog)


def test_unit_capabilities_are_only_what_lb_needs(unit: dict[str, dict[str, list[str]]]) -> None:
    for key in ("AmbientCapabilities", "CapabilityBoundingSet"):
        values = unit["Service"][key]
        assert not any(v.startswith("~") for v in values), f"{key} must list what is kept, not what is dropped"
        caps = {cap for value in values for cap in value.split()}
        # No CAP_SYS_ADMIN: only a config with `netns` (setns) needs it; see the unit.
        assert caps == CAPABILITIES, key


def test_unit_sandbox(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    writable = {path for value in unit["Service"]["ReadWritePaths"] for path in value.split()}
    assert writable == {"/sys/fs/bpf", "/run/lb", "-/run/bird"}  # "-": BIRD's run directory, if BIRD is there
    assert one(unit, "Service", "SupplementaryGroups") == "bird"  # BIRD's control socket (docs/bgp.md)
    assert one(unit, "Service", "RuntimeDirectory") == "lb"
    assert one(unit, "Service", "RuntimeDirectoryMode") == "0700"
    # The access log's default directory (lb.model.AccessLog.path), the only one the unit may write in /var/log.
    assert one(unit, "Service", "LogsDirectory") == "lb"
    assert os.path.dirname(m.AccessLog().path) == "/var/log/lb"
    assert one(unit, "Service", "ProtectHome") == "yes"
    assert one(unit, "Service", "PrivateTmp") == "yes"
    assert one(unit, "Service", "LimitMEMLOCK") == "infinity"


def test_unit_admin_socket_lives_in_its_runtime_directory() -> None:
    # Both configs the unit is meant to run keep the socket where it may write.
    for path in (REPO / "vagrant" / "lb.toml", *EXAMPLE_FILES):
        assert config.load(path).admin_socket.startswith("/run/lb/"), path.name


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys or bad values are reported on stderr."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify also checks that commands exist; lb is not installed here.
    copy = tmp_path / "lb.service"
    copy.write_text(re.sub(r"/usr/local/bin/lb\b", "/bin/true", UNIT.read_text()))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    about_unit = [line for line in result.stderr.splitlines() if "lb.service" in line]
    assert result.returncode == 0 and not about_unit, result.stderr


def test_logrotate_snippet_rotates_the_default_access_log_and_signals_lb_only(tmp_path: Path) -> None:
    text = (REPO / "deploy" / "lb.logrotate").read_text()
    (pattern,) = re.findall(r"^(/\S+) \{$", text, re.M)
    assert fnmatch.fnmatch(m.AccessLog().path, pattern)
    assert "delaycompress" in text  # the renamed file takes lines until the reopen
    postrotate = text.split("postrotate", 1)[1].split("endscript", 1)[0]
    assert "--kill-whom=main" in postrotate and "USR1" in postrotate and "lb.service" in postrotate
    logrotate = shutil.which("logrotate") or next(
        (p for p in ("/usr/sbin/logrotate", "/sbin/logrotate") if os.path.exists(p)), None)
    if logrotate is None:
        pytest.skip("logrotate is not installed")
    result = subprocess.run([logrotate, "--debug", "--state", str(tmp_path / "state"), str(REPO / "deploy/lb.logrotate")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr

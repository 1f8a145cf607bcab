"""`lb reload` as systemd's ExecReload= runs it: it waits for the daemon's
answer and exits 0 only when the change applied, 2 with every problem of an
invalid file, 1 with the daemon's reasons, 3 with no daemon; it finds the
daemon through the config the unit names, also under the unit's capabilities."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from lb.cli import cli
from lb.lab import Lab
from tests.daemon_fixture import RunningDaemon, lab_config, unit_capabilities
from tests.names import name

NAME = name("rl")


def lb(daemon: RunningDaemon, *args: str, launcher: tuple[str, ...] = (),
       config: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*launcher, sys.executable, "-m", "lb", *args, "-c", config or daemon.config_path],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    running = RunningDaemon(lab, NAME, lab_config(lab, NAME, echo_targets=1))
    try:
        running.start()
        yield running
    finally:
        running.cleanup()


@pytest.mark.root
def test_reload_exits_0_only_when_applied(daemon: RunningDaemon) -> None:
    original = Path(daemon.config_path).read_text()
    loaded = daemon.request("status")["loaded_at"]
    try:
        out = lb(daemon, "reload")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"reloaded {daemon.config_path}: 1 listeners, 1 target groups")
        assert daemon.request("status")["loaded_at"] > loaded

        # Invalid: every problem printed, exit 2, the daemon untouched.
        daemon.write_config(original.replace('xdp_mode = "native"', 'xdp_mode = "fast"')
                            .replace("interval = 5", "interval = 0"))
        loaded = daemon.request("status")["loaded_at"]
        out = lb(daemon, "reload")
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert "load_balancer.xdp_mode" in out.stderr and "health_check.interval" in out.stderr
        assert daemon.request("status")["loaded_at"] == loaded

        # Valid, but the daemon refuses it: exit 1 with its reason.
        daemon.write_config(original.replace("workers = 1", "workers = 2"))
        out = lb(daemon, "reload")
        assert out.returncode == 1 and "reload rejected: workers needs a restart" in out.stderr, out.stderr
        assert daemon.request("status")["loaded_at"] == loaded

        # The file now names another load balancer (and socket): lb reload still
        # finds the daemon running from this file (its state file), which says why not.
        daemon.write_config(original.replace(f'"{NAME}"', f'"{NAME}x"').replace(f"{NAME}.sock", f"{NAME}x.sock"))
        out = lb(daemon, "reload")
        assert out.returncode == 1 and "name, admin_socket needs a restart" in out.stderr, out.stderr
    finally:
        daemon.write_config(original)
    assert lb(daemon, "reload").returncode == 0


@pytest.mark.root
def test_reload_refuses_a_file_the_daemon_does_not_run_from(daemon: RunningDaemon) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix=f"{NAME}-copy-") as copy:
        shutil.copyfile(daemon.config_path, copy.name)
        out = lb(daemon, "reload", config=copy.name)
    assert out.returncode == 1 and f"runs from {daemon.config_path}, not {copy.name}" in out.stderr


@pytest.mark.root
def test_reload_works_with_only_the_units_capabilities(daemon: RunningDaemon) -> None:
    """ExecReload= runs with the unit's bounding set (no CAP_DAC_OVERRIDE, no CAP_SYS_ADMIN)."""
    caps = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in unit_capabilities())
    out = lb(daemon, "reload", launcher=("setpriv", f"--bounding-set=-all,{caps}", "--"))
    assert out.returncode == 0, out.stderr


def test_reload_without_a_daemon_exits_3(tmp_path: Path) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(f'[load_balancer]\nname = "{name("nobody")}"\nadmin_socket = "{tmp_path}/none.sock"\n')
    result = CliRunner().invoke(cli, ["reload", "-c", str(config)])
    assert result.exit_code == 3 and "no `lb up` is running" in result.output

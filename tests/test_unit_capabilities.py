"""`lb up` with exactly the capabilities deploy/lb.service leaves it: start,
kill -9, start again (Restart=on-failure, `systemctl restart`), reload.

The second start finds the maps the first one pinned and must adopt them, the
established flow going on, without CAP_SYS_ADMIN: the unit does not grant it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb.dataplane import libbpf
from lb.dataplane.pins import PROGRAM_PIN, pin_dir
from lb.dataplane.structs import MapName
from lb.lab import Lab
from tests import labclient
from tests.daemon_fixture import (
    RunningDaemon,
    StreamPump,
    confined,
    effective_capabilities,
    lab_config,
    unit_capabilities,
)
from tests.names import name

pytestmark = pytest.mark.root

NAME = name("caps")
HEALTHY_WITHIN = 5 * 2 + 3  # interval × healthy_threshold, and some


@pytest.fixture
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    running = RunningDaemon(lab, NAME, lab_config(lab, NAME, http=True, netns=False), launcher=confined(lab))
    running.down()  # what an interrupted run left
    try:
        yield running
    finally:
        running.cleanup()


def pinned_map_ids() -> dict[str, int]:
    ids = {}
    for map_name in MapName:
        fd = libbpf.obj_get(os.path.join(pin_dir(NAME), map_name.value))
        try:
            ids[map_name.value] = libbpf.map_info(fd).map_id
        finally:
            os.close(fd)
    return ids


def start_confined(daemon: RunningDaemon) -> None:
    daemon.start()
    assert daemon.proc is not None
    assert effective_capabilities(daemon.proc.pid) == set(unit_capabilities())
    assert "CAP_SYS_ADMIN" not in unit_capabilities()


def test_restart_and_reload_under_the_units_capabilities(daemon: RunningDaemon, lab: Lab) -> None:
    start_confined(daemon)
    for backend in lab.backends:
        daemon.wait_for("echo-tcp", backend.address, "healthy", timeout=HEALTHY_WITHIN)
    maps_before = pinned_map_ids()
    program_before = daemon.request("status")["program_id"]

    stream = labclient.tcp_connect(lab.client_ns, labmod.VIP, labmod.ECHO_PORT, timeout=3)
    labclient.read_line(stream)  # the backend's banner
    pump = StreamPump(stream)
    pump.start()
    try:
        time.sleep(0.5)
        daemon.stop(signal.SIGKILL)
        time.sleep(0.5)
        start_confined(daemon)  # finds the maps pinned: opens them by path
        after_restart = pump.exchanged
        for backend in lab.backends:
            daemon.wait_for("echo-tcp", backend.address, "healthy", timeout=HEALTHY_WITHIN)

        daemon.write_config(lab_config(lab, NAME, http=True, udp=True, netns=False))
        reload = subprocess.run([sys.executable, "-m", "lb", "reload", "-c", daemon.config_path],
                                capture_output=True, text=True, timeout=30)
        assert reload.returncode == 0, reload.stderr + daemon.logs()
        assert "echo-udp" in {li["name"] for li in daemon.request("status")["listeners"]}
        time.sleep(0.5)
    finally:
        pump.stop()
        stream.close()
    assert not pump.errors, daemon.logs()
    assert pump.exchanged > after_restart + 20  # the flow went on through the restart and the reload
    assert pinned_map_ids() == maps_before  # adopted, not made anew
    program_after = daemon.request("status")["program_id"]
    assert program_after != program_before
    prog_fd = libbpf.obj_get(os.path.join(pin_dir(NAME), PROGRAM_PIN))
    try:
        assert libbpf.prog_info(prog_fd).prog_id == program_after
    finally:
        os.close(prog_fd)

"""`lb up` under the common default of 1024 open files (soft and hard, as a
unit without LimitNOFILE gets): thousands of idle and slowloris connections
must not take the HTTP listener down. The worker sheds the oldest idle
connections near its limit, says so in the log and counts it."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb.lab import Lab
from lb.netlink import run_in_netns
from tests.daemon_fixture import UNIT_FILE, RunningDaemon, lab_config
from tests.idle_clients import nofile_at_least, open_idle
from tests.names import name
from tests.test_daemon_workers import daemon_log, http_get, scrape, total, wait_healthy, worker_pids

pytestmark = pytest.mark.root

NAME = name("f")
METRICS_PORT = 9473  # as test_daemon_workers' (whose scrape() this module uses); never both at once
IDLE = 3000
LIMIT = 1024


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    text = lab_config(lab, NAME, http=True).replace(
        "workers = 1\n", f'workers = 1\nmetrics_address = "127.0.0.1:{METRICS_PORT}"\n', 1)
    running = RunningDaemon(lab, NAME, text, launcher=["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--"])
    try:
        running.start()
        wait_healthy(running, lab)
        yield running
    finally:
        running.cleanup()


def open_files_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_idle_and_slow_connections_beyond_the_limit_leave_room_for_new_clients(
        daemon: RunningDaemon, lab: Lab) -> None:
    assert daemon.proc is not None
    (worker,) = worker_pids(daemon)
    assert open_files_limit(daemon.proc.pid) == (LIMIT, LIMIT) == open_files_limit(worker)
    with nofile_at_least(IDLE + 1000):
        idle = run_in_netns(lab.client_ns, open_idle, (labmod.VIP, labmod.HTTP_PORT), IDLE)
        try:
            assert len(idle) > LIMIT  # established from the client's side, far beyond what lb may hold
            for sock in idle[::2]:  # half of them slowloris: a request head that never ends
                try:
                    sock.send(b"GET / HTTP/1.1\r\nHost: lab\r\nX-Slow: ")
                except OSError:  # shed already
                    pass
            time.sleep(0.5)
            started = time.monotonic()
            answers = []
            for _ in range(50):
                try:
                    answers.append(http_get(lab, timeout=3.0)[0])
                except (OSError, IndexError) as exc:  # IndexError: closed without an answer
                    answers.append(repr(exc))
            took = time.monotonic() - started
        finally:
            for sock in idle:
                sock.close()
    assert answers == [200] * 50, answers
    assert took < 20
    assert worker_pids(daemon) == [worker]  # the same worker: nothing crashed
    samples = scrape(lab)
    assert total(samples, "lb_l7_connections_shed_total") > 0
    assert total(samples, "lb_l7_fd_limit") == LIMIT
    assert 0 < total(samples, "lb_l7_open_fds") < LIMIT
    logs = daemon_log(daemon)
    assert "file descriptors" in logs and "closed" in logs, logs
    assert all(http_get(lab)[0] == 200 for _ in range(10))


def test_the_daemon_and_its_workers_raise_their_soft_limit_to_the_hard_one(daemon: RunningDaemon, lab: Lab) -> None:
    daemon.stop()
    daemon.launcher = ["prlimit", "--nofile=1024:8192", "--"]  # systemd's default soft limit, a higher hard one
    daemon.start()
    assert daemon.proc is not None
    assert open_files_limit(daemon.proc.pid) == (8192, 8192)
    assert [open_files_limit(pid) for pid in worker_pids(daemon)] == [(8192, 8192)]
    assert "soft limit raised from 1024 to 8192" in daemon_log(daemon)


def test_the_unit_sets_a_limit_on_open_files() -> None:
    found = re.search(r"^LimitNOFILE=(\d+)$", UNIT_FILE.read_text(), re.M)
    assert found is not None and int(found.group(1)) >= 65536

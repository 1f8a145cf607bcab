"""`lb up` supervises its L7 workers: a worker killed (-9) is replaced within
a second with the current routing table while the others keep serving; a
stopped (SIGSTOP) one never blocks the daemon, is reported, and is killed
and replaced once silent for too long. Real daemon, real lab traffic."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb import lab as labmod
from lb.lab import Lab
from lb.netlink import run_in_netns
from tests import labclient
from tests.daemon_fixture import RunningDaemon, lab_config
from tests.names import name

pytestmark = pytest.mark.root

NAME = name("w")
WORKERS = 3
METRICS_PORT = 9473  # distinct from the other test daemons' in the lab's lb namespace
HEALTHY_WITHIN = 15.0
KILL_AFTER = 10.0  # lb.l7.server.Supervision.kill_after: a silent worker is killed after this

T = TypeVar("T")


def config_text(lab: Lab, workers: int) -> str:
    return lab_config(lab, NAME, http=True).replace(
        "workers = 1\n", f'workers = {workers}\nmetrics_address = "127.0.0.1:{METRICS_PORT}"\n', 1)


def wait_healthy(daemon: RunningDaemon, lab: Lab) -> None:
    for backend in lab.backends:
        daemon.wait_for("web", backend.address, "healthy", timeout=HEALTHY_WITHIN)


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    running = RunningDaemon(lab, NAME, config_text(lab, WORKERS))
    try:
        running.start()
        wait_healthy(running, lab)
        yield running
    finally:
        running.cleanup()


# --- helpers ---------------------------------------------------------------------------


def worker_pids(daemon: RunningDaemon) -> list[int]:
    """The live L7 worker processes of the daemon: its children that run
    multiprocessing's spawn_main (not its resource tracker; not zombies)."""
    assert daemon.proc is not None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except OSError:
            continue
        if int(fields[1]) == daemon.proc.pid and fields[0] != "Z" and b"spawn_main" in command:
            found.append(int(entry))
    return sorted(found)


def wait_until(check: Callable[[], T | None], timeout: float, interval: float = 0.01) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(interval)


def http_get(lab: Lab, timeout: float = 2.0) -> tuple[int, str | None]:
    status, headers, _ = labclient.http_get(lab.client_ns, labmod.VIP, labmod.HTTP_PORT, "/", timeout=timeout)
    return status, headers.get("x-backend")


def scrape(lab: Lab, timeout: float = 10.0) -> dict[str, float]:
    """Every sample as "name{label=value,...}" (labels sorted) → value."""
    def get() -> str:
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
        return body.decode()

    samples = {}
    for family in text_string_to_metric_families(run_in_netns(lab.lb_ns, get)):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def total(samples: dict[str, float], metric: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(metric + "{"))


class HttpLoad(threading.Thread):
    """Requests through the HTTP listener back to back, a new connection each."""

    def __init__(self, lab: Lab, timeout: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.timeout = timeout
        self.results: list[tuple[float, str | None, str | None]] = []  # (started, backend, error)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            at = time.monotonic()
            try:
                status, backend = http_get(self.lab, self.timeout)
                self.results.append((at, backend, None if status == 200 else f"status {status}"))
            except (OSError, IndexError, ValueError) as exc:  # IndexError: an empty answer (closed by a dying worker)
                self.results.append((at, None, repr(exc)))
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    def served_between(self, start: float, end: float) -> int:
        return sum(1 for at, _, error in self.results if start <= at < end and error is None)


def daemon_log(daemon: RunningDaemon) -> str:
    """The whole log (RunningDaemon.logs() keeps the tail, for failure messages), access lines left out."""
    with open(daemon.log.name) as f:
        return "".join(line for line in f if " lb." in line or "Traceback" in line or "Error" in line)


def worker_rows(daemon: RunningDaemon) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = daemon.request("status")["l7_workers"]
    return rows


# --- kill -9 ------------------------------------------------------------------------------


def test_each_killed_worker_is_replaced_within_a_second_and_gets_the_routing_updates(
        daemon: RunningDaemon, lab: Lab) -> None:
    before_metrics = scrape(lab)
    originals = worker_pids(daemon)
    assert len(originals) == WORKERS
    load = HttpLoad(lab)
    load.start()
    kills: list[float] = []
    try:
        time.sleep(0.5)
        for victim in originals:  # each worker in turn, under load
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            kills.append(killed_at)
            wait_until(lambda gone=victim: len(pids := worker_pids(daemon)) == WORKERS and gone not in pids, 5.0)
            replaced_in = time.monotonic() - killed_at
            assert replaced_in <= 1.0, f"worker {victim} replaced after {replaced_in:.2f} s"
            time.sleep(1.0)
    finally:
        load.stop()
    # Requests kept flowing: only those caught by a dying worker failed.
    failures = [(at, error) for at, _, error in load.results if error]
    assert all(any(k - 0.1 <= at <= k + 1.0 for k in kills) for at, _ in failures), failures
    assert len(failures) <= 5 * WORKERS, failures
    for killed_at in kills:
        assert load.served_between(killed_at, killed_at + 1.0) > 5
    replacements = worker_pids(daemon)
    assert not set(replacements) & set(originals)
    # Logged with the signal, counted, shown by `lb status`.
    logs = daemon_log(daemon)
    for victim in originals:
        assert f"(pid {victim}) was killed by SIGKILL" in logs, logs
    rows = worker_rows(daemon)
    assert sorted(row["pid"] for row in rows) == replacements
    assert all(row["restarts"] == 1 and row["state"] == "running" and row["started"] > 0 for row in rows), rows
    shown = subprocess.run([sys.executable, "-m", "lb", "status", "-c", daemon.config_path], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    table = shown[shown.index("l7 worker"):].splitlines()
    assert table[0].split() == ["l7", "worker", "pid", "state", "started", "restarts", "last", "exit"], shown
    for row, line in zip(rows, table[1:]):
        assert line.split()[:3] == [row["name"], str(row["pid"]), "running"], shown
        assert line.split()[5:] == ["1", "was", "killed", "by", "SIGKILL"], shown

    # Routing updates reach the new workers: a deregistered target gets no new requests from any of them.
    drained = lab.backends[0]
    daemon.request("deregister", group="web", target=drained.address)
    try:
        time.sleep(0.3)
        served = [http_get(lab) for _ in range(30)]
    finally:
        daemon.request("register", group="web", target=drained.address)
    assert all(status == 200 and backend != drained.name for status, backend in served), served
    result = daemon.request("reload")
    assert result["reloaded"] and not result.get("warnings"), result
    wait_healthy(daemon, lab)

    # Metrics kept working: restarts counted, the request counters never went backwards.
    after_metrics = scrape(lab)
    assert total(after_metrics, "lb_l7_worker_restarts_total") == WORKERS
    assert total(after_metrics, "lb_http_requests_total") >= total(before_metrics, "lb_http_requests_total") + \
        load.served_between(0, time.monotonic()) * 0.5
    assert "Traceback" not in daemon_log(daemon)


# --- a stopped worker ------------------------------------------------------------------------


def test_a_stopped_worker_never_blocks_the_daemon_and_is_reported(daemon: RunningDaemon, lab: Lab) -> None:
    victim = worker_pids(daemon)[0]
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        with ThreadPoolExecutor(2) as pool:
            started = time.monotonic()
            reloading = pool.submit(daemon.request, "reload", 30.0)
            time.sleep(0.3)
            asked = time.monotonic()
            status = daemon.request("status", timeout=5.0)
            assert time.monotonic() - asked < 1.0
            result = reloading.result(timeout=30)
            reload_took = time.monotonic() - started
        assert reload_took < 5.0
        assert any(str(victim) in warning for warning in result.get("warnings", [])), result
        assert status["name"] == NAME
        asked = time.monotonic()
        samples = scrape(lab)
        assert time.monotonic() - asked < 5.0
        assert total(samples, "lb_l7_worker_up") == WORKERS - 1
        row = next((r for r in worker_rows(daemon) if r["pid"] == victim), None)
        # Silent for kill_after (10 s), a stopped worker is killed and replaced, as
        # designed: on a loaded machine the steps above can take that long.
        if row is not None or time.monotonic() - stopped_at < 9.0:
            assert row is not None and row["state"] == "unresponsive", row
        # The other workers still serve, and still take routing updates.
        drained = lab.backends[1]
        daemon.request("deregister", group="web", target=drained.address)
        try:
            time.sleep(0.3)
            served = []
            for _ in range(20):
                try:
                    served.append(http_get(lab, timeout=0.5))
                except OSError:  # a connection the stopped worker's listener took
                    pass
        finally:
            daemon.request("register", group="web", target=drained.address)
        assert len(served) >= 5 and all(s == 200 and b != drained.name for s, b in served), served
    finally:
        with contextlib.suppress(ProcessLookupError):  # killed and replaced already (see above)
            os.kill(victim, signal.SIGCONT)
    if victim in worker_pids(daemon):
        # It answers again: back to running, nothing reported, no restart.
        wait_until(lambda: next(r for r in worker_rows(daemon) if r["pid"] == victim)["state"] == "running",
                   5.0, 0.1)
        result = daemon.request("reload")
        assert not result.get("warnings"), result
    else:
        assert time.monotonic() - stopped_at >= 9.0, "a stopped worker was replaced before kill_after"
        wait_until(lambda: len(worker_pids(daemon)) == WORKERS, 10.0, 0.1)
    wait_healthy(daemon, lab)


def test_a_worker_silent_too_long_is_killed_and_replaced(daemon: RunningDaemon, lab: Lab) -> None:
    victim = worker_pids(daemon)[-1]
    restarts = total(scrape(lab), "lb_l7_worker_restarts_total")
    stopped_at = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(lambda: len(pids := worker_pids(daemon)) == WORKERS and victim not in pids, KILL_AFTER + 5.0, 0.1)
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert KILL_AFTER - 1.0 <= time.monotonic() - stopped_at <= KILL_AFTER + 4.0
    logs = daemon_log(daemon)
    assert f"(pid {victim}) has not answered" in logs and "killing it (SIGKILL)" in logs, logs
    assert total(scrape(lab), "lb_l7_worker_restarts_total") == restarts + 1
    assert all(http_get(lab)[0] == 200 for _ in range(10))


# --- one worker ----------------------------------------------------------------------------


def test_with_one_worker_the_listener_is_back_within_a_second(daemon: RunningDaemon, lab: Lab) -> None:
    daemon.stop()
    daemon.write_config(config_text(lab, 1))
    daemon.start()
    wait_healthy(daemon, lab)
    (victim,) = worker_pids(daemon)
    assert http_get(lab)[0] == 200
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    def served() -> bool:
        try:
            return http_get(lab, timeout=0.25)[0] == 200
        except OSError:
            return False

    wait_until(served, 5.0)
    back_in = time.monotonic() - killed_at
    assert back_in <= 1.0, f"the listener was back after {back_in:.2f} s"
    assert len(worker_pids(daemon)) == 1


def test_sigterm_to_the_whole_unit_stops_gracefully_without_replacing_a_worker(
        daemon: RunningDaemon, lab: Lab) -> None:
    """systemd's default KillMode (control-group) sends SIGTERM to every
    process of the unit, the workers first here, and lb is stopped (SIGSTOP)
    meanwhile so they would be long gone before it sees its own SIGTERM, had
    they acted on theirs. lb decides when they stop: a request in flight
    still finishes, and no worker is replaced."""
    assert daemon.proc is not None
    workers = worker_pids(daemon)
    seen = len(daemon_log(daemon))
    with ThreadPoolExecutor(1) as pool:
        def slow_request() -> int:
            status, _, _ = labclient.http_get(lab.client_ns, labmod.VIP, labmod.HTTP_PORT, "/sleep/2", timeout=10)
            return status

        in_flight = pool.submit(slow_request)
        time.sleep(0.5)
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
            time.sleep(1.0)
            assert worker_pids(daemon) == workers  # still there
            os.kill(daemon.proc.pid, signal.SIGTERM)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        assert daemon.stop() == 0
        assert in_flight.result(timeout=10) == 200
    logs = daemon_log(daemon)[seen:]
    assert "replace" not in logs and "Traceback" not in logs and "exited" not in logs, logs
    daemon.start()  # for the fixture's own teardown

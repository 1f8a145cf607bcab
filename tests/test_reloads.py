"""lb.reloads through a real `lb up`: a rejected reload is counted and seen
in the metrics (lb_reload_failures_total, lb_reload_last_successful 0), the
running config's time stays; the next good one clears it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb.reloads import Reloads
from tests.daemon_fixture import RunningDaemon
from tests.l7_backends import HOST, ThreadedBackends, free_port
from tests.names import name
from tests.test_systemd import LB_CONFIG


def test_an_exception_out_of_an_attempt_counts_a_failure() -> None:
    reloads = Reloads(started=100.0)
    assert (reloads.total, reloads.failures, reloads.last_ok, reloads.last_success) == (0, 0, True, 100.0)
    with pytest.raises(ValueError), reloads.attempt():
        raise ValueError("bad config")
    assert (reloads.total, reloads.failures, reloads.last_ok, reloads.last_success) == (1, 1, False, 100.0)
    with reloads.attempt():
        pass
    assert (reloads.total, reloads.failures, reloads.last_ok) == (2, 1, True)
    assert reloads.last_success > 100.0


def reload_metrics(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if s.name.startswith("lb_reload")}


def lb_reload(config_path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb", "reload", "-c", config_path], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.root
def test_a_rejected_reload_shows_in_the_metrics() -> None:
    lb_name = name("rld")
    metrics_port = free_port()
    with ThreadedBackends(("http", "b1")) as (b1,):
        text = LB_CONFIG.format(name=lb_name, host=HOST, port=free_port(), backend=b1.port, metrics=metrics_port)
        running = RunningDaemon(None, lb_name, text)
        try:
            started = time.time()
            running.start()
            first = reload_metrics(metrics_port)
            assert first["lb_reloads_total"] == 0 and first["lb_reload_failures_total"] == 0
            assert first["lb_reload_last_successful"] == 1
            assert started - 1 <= first["lb_reload_last_success_timestamp_seconds"] <= time.time()

            # A change only a restart can make: `lb reload` exits non-zero, the daemon counts it.
            running.write_config(text.replace("workers = 1", "workers = 2"))
            assert lb_reload(running.config_path).returncode != 0
            rejected = reload_metrics(metrics_port)
            assert rejected["lb_reloads_total"] == 1 and rejected["lb_reload_failures_total"] == 1
            assert rejected["lb_reload_last_successful"] == 0
            # An invalid file, by SIGHUP (`lb reload` would refuse it before asking the daemon).
            running.write_config(text.replace('protocol = "HTTP"\nport', 'protocol = "HTTP"\nport = "x"\nports', 1))
            assert running.proc is not None
            running.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while (rejected := reload_metrics(metrics_port))["lb_reloads_total"] < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert rejected["lb_reloads_total"] == 2 and rejected["lb_reload_failures_total"] == 2
            # A user's mistake: lb's message, no traceback (asyncio's "Task exception was never retrieved").
            assert "reload rejected" in running.logs() and "Traceback" not in running.logs()
            assert rejected["lb_reload_last_successful"] == 0
            assert rejected["lb_reload_last_success_timestamp_seconds"] == first[
                "lb_reload_last_success_timestamp_seconds"]

            running.write_config(text)
            applied = lb_reload(running.config_path)
            assert applied.returncode == 0, applied.stderr + running.logs()
            after = reload_metrics(metrics_port)
            assert after["lb_reloads_total"] == 3 and after["lb_reload_failures_total"] == 2
            assert after["lb_reload_last_successful"] == 1
            assert after["lb_reload_last_success_timestamp_seconds"] > first["lb_reload_last_success_timestamp_seconds"]
        finally:
            running.cleanup()

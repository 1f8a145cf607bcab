"""What the daemon's reloads came to, for the metrics (lb_reload_*).

    reloads = Reloads(started=time.time())
    with reloads.attempt():      # counts one reload; an exception out of it counts a failure
        apply()

Written on the daemon's event loop, read by the scrape thread: each field is
one int or float, assigned whole, so a scrape sees a consistent value of each
(Prometheus' own prometheus_config_last_reload_* gauges work the same way).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Reloads:
    def __init__(self, started: float) -> None:
        self.total = 0
        self.failures = 0
        self.last_ok = True  # the config loaded at start counts as applied
        self.last_success = started  # Unix time the running config was applied

    @contextmanager
    def attempt(self) -> Iterator[None]:
        self.total += 1
        try:
            yield
        except BaseException:
            self.failures += 1
            self.last_ok = False
            raise
        self.last_ok = True
        self.last_success = time.time()
